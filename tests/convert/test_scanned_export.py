"""The converter on the scanned layout (`config.model.llm.scan_layers`): a stage trained with its
layers stacked exports to the Hugging Face folder transformers runs to our logits, and that folder
reads back into a scanned model that gives transformers' logits again."""

import pathlib

import numpy as np
import pytest
from flax import nnx

from tests.convert.stages import logits_diff, stage_model, write_stage
from tests.tiny_model import random_module
from unimoe import config as config_lib, factory
from unimoe.checkpoint import path_str
from unimoe.convert import core
from unimoe.convert.cli import main
from unimoe.data import builtin
from unimoe.experiment import from_config_dict

TINY = pathlib.Path(__file__).parents[2] / "configs" / "unimoe_tiny.py"


@pytest.fixture(scope="module")
def scanned_workdir(tmp_path_factory) -> pathlib.Path:
    """The tiny recipe with its 3 layers scanned (full remat) and one finished MoE + LoRA stage."""
    workdir = tmp_path_factory.mktemp("scanned_export") / "run"
    config = config_lib.load_config(f"{TINY}:mode=test")
    config.data.data_dir = str(workdir.parent / "data")
    config.model.lora.dropout = 0.0  # `random_module` holds Params only
    config.model.sound_conn.update(dropout_rate=0.0, attention_dropout_rate=0.0)
    config.model.llm.update(scan_layers=True, remat='full')
    workdir.mkdir()
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
    tokenizer = builtin.load_or_train_tokenizer(workdir.parent / "data" / builtin.TOKENIZER_FILE)
    experiment = from_config_dict(config)
    model = random_module(
        lambda: factory.build_model(experiment.model, tokenizer, moe=True, lora_rank=8, seed=0)
    )
    paths = [path_str(p) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))]
    assert any(p.startswith("llm/blocks/layers/0/") for p in paths)  # the layers are stacked
    write_stage(workdir, "s3_moe", model, paths)
    return workdir


def test_a_scanned_stage_exports_and_reads_back_into_the_scanned_layout(scanned_workdir, tmp_path):
    model = stage_model(scanned_workdir, "s3_moe")
    assert model.llm.cfg.scan_layers
    out = tmp_path / "hf"
    assert main(["to-hf", str(scanned_workdir / "s3_moe"), str(out)]) == 0
    assert logits_diff(model, out / "llm") <= 1e-4
    # from-hf writes the unrolled layer paths; a scanned model stacks them as it loads.
    assert main(["from-hf", str(out / "llm"), str(tmp_path / "back")]) == 0
    back = core.load(tmp_path / "back").params
    assert "llm/layers/2/attn/q/kernel" in back
    reloaded = stage_model(scanned_workdir, "s3_moe")
    factory.load_params(reloaded, [("back", back)])
    for _, adapter in nnx.to_flat_state(nnx.state(reloaded, nnx.LoRAParam)):
        # The merged kernels hold the adapters' update already.
        adapter.set_value(np.zeros_like(adapter.get_value()))
    assert logits_diff(reloaded, out / "llm") <= 1e-4
    # LoRA was merged on export: the reloaded kernels differ from the stage's, the logits do not.
    params = factory.final_params(scanned_workdir, "s3_moe")
    q = "llm/layers/1/attn/q/kernel"
    assert np.abs(back[q] - params[q]).max() > 1e-2
