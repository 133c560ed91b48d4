r"""The tiny recipe's ablation arms: the paper's claims at CPU scale (see experiments/tiny/README.md).

  python -m unimoe.main --config=experiments/tiny/config.py:arm=dense --workdir=DIR

Every arm is `configs/unimoe_tiny.py` (the `moe4` arm, what `make demo` runs) with its stage 3
replaced by one stage under its own name; stages 0-2 are the base arm's, so
`experiments/tiny/run.py` trains them once and links them into every arm's workdir. Arms:

- `moe4`: Uni-MoE 4E: experts from the four stage-2 single-modality FFNs, top-2, balance loss.
- `dense`: no MoE: the aligned dense model's FFNs and connectors trained on the same mixed data,
  steps and learning rate (the "dense on mixed modalities" baseline of the performance-bias claim).
- `no_stage2`: MoE whose experts are copies of the aligned LM's FFN (sparse upcycling): stage 2's
  modality-specific experts skipped.
- `no_progressive`: MoE straight from the stand-in pretrained LM and encoders: no connector
  alignment (stage 1) and no modality experts (stage 2); the connectors train in this stage.
- `moe8`: 8 experts, each stage-2 FFN twice (Uni-MoE 8E also repeats expert sources).
- `moe4_no_balance`, `moe8_no_balance`: the two above without the balance loss (Table 9's
  "+ Aux_loss" rows, reversed).
"""

from __future__ import annotations

import pathlib

import ml_collections

from unimoe import config as config_lib
from unimoe.data import tasks as tasks_lib

BASE_CONFIG = pathlib.Path(__file__).resolve().parents[2] / 'configs' / 'unimoe_tiny.py'
ARMS = (
    'moe4',
    'dense',
    'no_stage2',
    'no_progressive',
    'moe8',
    'moe4_no_balance',
    'moe8_no_balance',
)
_EXPERT_STAGES = tuple(f's2_{m}' for m in tasks_lib.EXPERT_MODALITIES)


def stage3_name(arm: str) -> str:
    """The stage an arm trains and evaluates (the base arm keeps the recipe's name)."""
    return 's3_moe' if arm == 'moe4' else f's3_{arm}'


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = config_lib.parse_arg(arg, arm='moe4', mode='demo')
    if arg.arm not in ARMS:
        raise ValueError(f'arm={arg.arm!r} is not one of {ARMS}')
    c = config_lib.load_config(f'{BASE_CONFIG}:mode={arg.mode}')
    if arg.arm == 'moe4':
        return c
    base = c.stages.s3_moe
    stage = ml_collections.ConfigDict(base.to_dict())
    stage_order = [s for s in c.stage_order.split(',') if s != 's3_moe']
    if arg.arm == 'dense':
        stage.update(trains='ffn+connectors', moe=False, lora_rank=0, experts_from='')
        stage.update(balance_coef=0.0, z_coef=0.0)
    elif arg.arm == 'no_stage2':
        stage.update(experts_from='s1_align', upcycle_mode='copies')
        stage_order = [s for s in stage_order if s not in _EXPERT_STAGES]
    elif arg.arm == 'no_progressive':
        stage.update(
            init_from='s0_llm,s0_vision,s0_audio,s0_sound', experts_from='s0_llm',
            upcycle_mode='copies',
        )
        stage_order = ['s0_llm', 's0_vision', 's0_audio', 's0_sound']
    if arg.arm.startswith('moe8'):
        c.model.moe.num_experts = 2 * len(_EXPERT_STAGES)
        stage.experts_from = ','.join(s for s in _EXPERT_STAGES for _ in range(2))
    if arg.arm.endswith('no_balance'):
        stage.balance_coef = 0.0
    name = stage3_name(arg.arm)
    del c.stages['s3_moe']
    c.stages[name] = stage
    c.stage_order = ','.join(stage_order + [name])
    c.eval.stages = name
    return c
