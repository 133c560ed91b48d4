"""experiments/paper: every Table 9 row's config validates; the table's dry run scores the fixtures."""

import collections
import importlib.util
import json
import pathlib

import pytest

from unimoe import config as config_lib, experiment
from unimoe.eval import metrics
from unimoe.train import validate

PAPER = pathlib.Path(__file__).parent.parent / "experiments" / "paper"
FIXTURES = pathlib.Path(__file__).parent / "data" / "fixtures" / "unimoe_formats"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"paper_{name}", PAPER / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ROWS = load("config").ROWS


@pytest.mark.parametrize("row", sorted(ROWS))
def test_every_row_config_validates(row):
    config = config_lib.load_config(
        f"{PAPER / 'config.py'}:row={row},tokenizer=tokenizer.model,data_dir=data"
    )
    typed = experiment.from_config_dict(config)
    validate.validate_stages(typed)
    spec = ROWS[row]
    assert config.paper.eval_stage in typed.stage_order
    if spec.experts:
        s3 = config.stages.s3_moe
        assert typed.stage('s3_moe').experts_from == tuple(spec.experts)
        assert (s3.learning_rate, s3.lora_rank) == (4e-5, 8)
        assert config.model.moe.num_experts == len(spec.experts)
        # epochs x records / global batch (the Uni-MoE paper)
        assert s3.steps == -(-spec.records * spec.epochs // s3.batch_size)
        assert s3.batch_size == (64 if len(spec.experts) == 8 else 8)
        assert s3.balance_coef == (0.01 if row.endswith("_aux") else 0.0)
    if spec.audio_model:  # Uni-MoE-audio: BEATs + Q-Former for all audio, MoE on even layers
        assert typed.model.moe_layers == tuple(range(0, 32, 2))
        assert typed.model.llm.lora.dense_ffn
        assert typed.model.sound.deep_norm and typed.model.sound_conn.num_queries == 50
        every_source = {s for name in typed.stage_order for s in typed.stage(name).json_sources}
        assert set(typed.json_data.sound_sources) == every_source
        assert (typed.json_data.sound_chunk_samples, typed.json_data.max_sound_chunks) == (
            480_000, 20
        )
    else:
        assert typed.model.sound is None and not typed.json_data.sound_sources


def test_table_dry_run_end_to_end(tmp_path):
    table = load("table")
    text = table.main(["--dry-run", "--output", str(tmp_path)])
    lines = text.splitlines()
    assert lines[0].split(" | ")[1:4] == ["AOK", "OK", "VQAv2"]
    assert "MMVet (ours: exact-match proxy)" in lines[0]
    assert "AN-QA (ours: exact-match proxy)" in lines[0]
    paper_row = next(
        line
        for line in lines
        if line.startswith("| Uni-MoE MoE-Task4 8E (I,T,S,V) + Aux_loss: paper")
    )
    assert paper_row.split(" | ")[1] == "70.7"
    # The oracle row: A-OK-VQA's most common human answer per question, scored independently.
    records = json.loads((FIXTURES / "eval_aokvqa.json").read_text())
    aok = [
        metrics.vqa_accuracy(collections.Counter(r["gt"]).most_common(1)[0][0], r["gt"])
        for r in records
    ]
    oracle = next(line for line in lines if "fixture answers" in line).split(" | ")
    assert oracle[1] == f"{100 * sum(aok) / len(aok):.2f}"
    assert oracle[4] == "100.00" and oracle[2] == "-"  # MMB letters; OK-VQA has no fixture answers
    assert (tmp_path / "table.md").read_text() == text
    raw = json.loads((tmp_path / "table.json").read_text())
    assert raw["dry run: constant 'A' (no model)"]["mmvet"]["metric_label"].startswith(
        "exact-match proxy"
    )


def test_released_predictions_sit_under_the_paper_row_they_reproduce(tmp_path):
    table = load("table")
    records = json.loads((FIXTURES / "eval_aokvqa.json").read_text())
    folder = tmp_path / "released" / "8e"
    folder.mkdir(parents=True)
    # Every question answered with its most common human answer but the first, answered wrongly.
    predictions = [
        {**r, "prediction": collections.Counter(r["gt"]).most_common(1)[0][0] if i else "zzz"}
        for i, r in enumerate(records)
    ]
    (folder / "aokvqa.predictions.json").write_text(json.dumps(predictions))
    lines = table.main(["--released", str(tmp_path / "released"), "--output", str(tmp_path)]).splitlines()
    paper = next(i for i, line in enumerate(lines) if "MoE-Task4 8E (I,T,S,V): paper" in line)
    released = lines[paper + 1].split(" | ")
    assert released[0] == "| Uni-MoE MoE-Task4 8E (I,T,S,V): released 8e (official protocol)"
    expected = [metrics.vqa_accuracy(p["prediction"], p["gt"]) for p in predictions]
    assert released[1] == f"{100 * sum(expected) / len(expected):.2f}" and released[2] == "-"
    assert sum("released" in line for line in lines) == 1
