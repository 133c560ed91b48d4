r"""Answers and scores a benchmark with a finished stage.

  python -m unimoe.eval --config=configs/unimoe_paper_4e.py:... \
      --checkpoint=WORKDIR/s3_moe --benchmark=textvqa --data=eval_textvqa_llava.json \
      --answers=textvqa_annotations_val.json --media-root=DIR --output=DIR

`--checkpoint` is a finished stage's directory (WORKDIR/STAGE, as `python -m unimoe.main`
writes it) or a converted checkpoint (`python -m unimoe.convert from-unimoe ... OUT`: a released
Uni-MoE model, with `--config=configs/unimoe_released.py:variant=...,checkpoint=OUT`), built as
the config's last stage. Writes `<benchmark>.predictions.json` (the input records, each with
`prediction`) and `<benchmark>.scores.json` under `--output` (default: CHECKPOINT/eval); with
`--save-logits` also `<benchmark>.logits.npz`, each question's first-step logits keyed by its id.
`--protocol=official` decodes as the released variant's eval.py (`unimoe/eval/protocol.py`),
`ours` as this project's stages are evaluated. Benchmarks and their record fields:
`unimoe/eval/benchmarks.py`.
"""

import logging
import pathlib

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from unimoe import compilation_cache, config as config_lib, experiment
from unimoe.data import formats
from unimoe.eval import benchmarks, protocol as protocol_lib, run_benchmark

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "The experiment config the stage was trained with (PATH.py[:ARG]).",
    lock_config=True,
)
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "A finished stage's directory (WORKDIR/STAGE) or a converted checkpoint."
)
_PROTOCOL = flags.DEFINE_enum(
    "protocol",
    None,
    list(protocol_lib.PROTOCOLS),
    "Decoding: 'official' (the released variant's eval.py) or 'ours'. Default: config.eval.protocol.",
)
_DTYPE = flags.DEFINE_enum(
    "dtype",
    "auto",
    ["auto", "float32", "bfloat16", "float16"],
    "The LM's compute dtype for a converted checkpoint ('auto': the protocol's; float32 for "
    "parity checks).",
)
_SAVE_LOGITS = flags.DEFINE_bool(
    "save-logits", False, "Also write each question's first decode step's logits (.logits.npz)."
)
_BENCHMARK = flags.DEFINE_enum("benchmark", None, sorted(benchmarks.BENCHMARKS), "Benchmark name.")
_DATA = flags.DEFINE_string("data", None, "The benchmark's Uni-MoE eval JSON file.")
_ANSWERS = flags.DEFINE_string(
    "answers", None, "Official annotations file, for benchmarks whose records carry no answers."
)
_MEDIA_ROOT = flags.DEFINE_string(
    "media-root", None, "Folder or zip the records' media paths are under."
)
_OUTPUT = flags.DEFINE_string("output", None, "Output directory (default WORKDIR/STAGE/eval).")
_MAX_NEW_TOKENS = flags.DEFINE_integer(
    "max-new-tokens", None, "Answer length limit. Default: the protocol's (ours: 16)."
)
_TEMPERATURE = flags.DEFINE_float(
    "temperature", None, "Sampling temperature (0: greedy). Default: the protocol's."
)
_TOP_P = flags.DEFINE_float(
    "top-p", None, "Nucleus sampling mass (with a temperature > 0). Default: the protocol's."
)
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_BATCH_SIZE = flags.DEFINE_integer("batch-size", 8, "Prompts per generation batch.")
_LIMIT = flags.DEFINE_integer("limit", 0, "Evaluate only the first N records (0: all).")
_ON_ERROR = flags.DEFINE_enum(
    "on-error", "raise", ["raise", "skip"], "Bad records: stop, or skip and count them."
)
config_lib.define_debug_flag()
flags.mark_flags_as_required(["config", "checkpoint", "benchmark", "data"])


def main(argv: list[str]) -> None:
    del argv
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("unimoe").setLevel(logging.INFO)
    output = _OUTPUT.value or str(pathlib.Path(_CHECKPOINT.value) / "eval")
    typed_config = experiment.from_config_flag(_CONFIG)
    problems = [
        problem
        for problem in (
            formats.file_problem("--data", _DATA.value),
            formats.file_problem("--answers", _ANSWERS.value),
            _MEDIA_ROOT.value and formats.media_root_problem(_MEDIA_ROOT.value),
        )
        if problem
    ]
    if problems:  # before the model is built
        config_lib.exit_with_problems(problems)
    compilation_cache.enable(typed_config.compilation_cache_dir)
    try:
        scores = _evaluate(typed_config, output)
    except formats.RecordError as e:  # a bad record with --on-error=raise
        config_lib.exit_with_problems(
            [f"{e}; fix the record, or pass --on-error=skip to skip and count bad records"]
        )
    # Past the record checks, a ValueError / OSError is about the input: a checkpoint of another
    # model, a missing or damaged file.
    except (config_lib.UserError, ValueError, OSError) as e:
        config_lib.exit_on_user_error(e)
    predictions, scores_path = run_benchmark.output_paths(output, _BENCHMARK.value)
    print(f"{_BENCHMARK.value}: {scores['headline']} = {scores[scores['headline']]:.4f}")
    print(f"wrote {predictions} and {scores_path}")


def _evaluate(typed_config: experiment.ExperimentConfig, output: str) -> dict:
    return run_benchmark.evaluate_benchmark(
        typed_config,
        checkpoint=_CHECKPOINT.value,
        benchmark=_BENCHMARK.value,
        data=_DATA.value,
        output=output,
        answers=_ANSWERS.value,
        media_root=_MEDIA_ROOT.value,
        batch_size=_BATCH_SIZE.value,
        limit=_LIMIT.value,
        on_error=_ON_ERROR.value,
        request=run_benchmark.Request(
            protocol=_PROTOCOL.value,
            max_new_tokens=_MAX_NEW_TOKENS.value,
            temperature=_TEMPERATURE.value,
            top_p=_TOP_P.value,
            seed=_SEED.value,
            dtype=_DTYPE.value,
            save_logits=_SAVE_LOGITS.value,
        ),
    )


if __name__ == "__main__":
    app.run(main, flags_parser=config_lib.parse_flags_or_exit)
