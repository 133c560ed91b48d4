r"""Lowers a config's sharded train step from abstract shapes and prints what it costs per device.

  python -m unimoe.train.lower --config=configs/paper_scale.py:experts=8,target=v5p-64

The model is built abstractly (`unimoe.models.abstract`), so a 7B model costs no memory. The
step is `jax.jit(step, in_shardings, out_shardings).lower(...)` on a mesh of the local devices
with the same axis names as `config.mesh`, scaled down to the local device count when the
planned mesh is larger (a pod's mesh on 8 simulated CPU devices); parameter and optimizer-state
memory per device is printed for both meshes. Nothing is compiled or executed.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from unimoe import accounting, config as config_lib, experiment as experiment_lib, factory
from unimoe.data import shapes
from unimoe.experiment import ExperimentConfig
from unimoe.parallel import mesh as mesh_lib, rules as rules_lib, sharded
from unimoe.train import optim, step as step_lib, trainer


@dataclasses.dataclass(frozen=True)
class Vocabulary:
    """What the model builder reads from a tokenizer (ids as `PretrainedTokenizer` appends them)."""

    vocab_size: int

    @property
    def image_id(self) -> int:
        return self.vocab_size - 3

    @property
    def video_id(self) -> int:
        return self.vocab_size - 2

    @property
    def audio_id(self) -> int:
        return self.vocab_size - 1


def scaled_mesh_shape(planned: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """The planned mesh with the same axes on `num_devices`: the largest axis halved until it
    fits (the `expert` axis last: the expert-parallel layout is what lowering should show)."""
    shape = mesh_lib.mesh_shape(planned, math.prod(planned.values()))
    while math.prod(shape.values()) > num_devices:
        others = {k: v for k, v in shape.items() if k != 'expert' and v > 1}
        axis = max(others, key=others.get) if others else 'expert'
        if shape[axis] % 2:
            raise ValueError(f"mesh {planned}: cannot scale {axis}={shape[axis]} down by halving")
        shape[axis] //= 2
    if math.prod(shape.values()) != num_devices:
        raise ValueError(f"mesh {planned} does not scale down to exactly {num_devices} devices")
    return shape


def abstract_batch(data: shapes.BatchShapes, batch_size: int) -> dict[str, jax.Array]:
    """An image + speech chat batch of `config.data`'s shapes (the stage's widest input)."""
    sds = jax.ShapeDtypeStruct
    rows = (batch_size, data.seq_len)
    return {
        'tokens': sds(rows, jnp.int32),
        'attn_mask': sds(rows, jnp.bool_),
        'loss_mask': sds(rows, jnp.float32),
        'image': sds((batch_size, data.image_size, data.image_size, 3), jnp.float32),
        'audio_mel': sds((batch_size, data.audio_frames, data.num_mel_bins), jnp.float32),
    }


@dataclasses.dataclass(frozen=True)
class LoweringReport:
    account: accounting.StageAccount
    planned_mesh: dict[str, int]
    lowered_mesh: dict[str, int]
    # Bytes per device on (planned, lowered) mesh: params, gradients, optimizer state.
    param_bytes: tuple[int, int]
    grad_bytes: tuple[int, int]
    optimizer_bytes: tuple[int, int]
    seconds: float
    hlo_chars: int

    def format(self) -> str:
        gib = lambda b: f'{b / 2**30:.2f} GiB' if b >= 2**30 else f'{b / 2**20:.1f} MiB'  # noqa: E731
        a = self.account
        lines = [
            f'stage {a.name}: params {a.total_params:,} (trainable {a.trainable_params:,}), '
            f'active per token {a.active_params_per_token:,}',
            '| mesh | devices | params / device | grads / device | AdamW / device |',
            '|---|---:|---:|---:|---:|',
        ]
        for i, (label, shape) in enumerate(
            (('planned', self.planned_mesh), ('lowered', self.lowered_mesh))
        ):
            axes = ' '.join(f'{k}={v}' for k, v in shape.items() if v > 1) or 'single'
            lines.append(
                f'| {label}: {axes} | {math.prod(shape.values())} | {gib(self.param_bytes[i])} '
                f'| {gib(self.grad_bytes[i])} | {gib(self.optimizer_bytes[i])} |'
            )
        lines.append(f'lowered in {self.seconds:.1f} s, {self.hlo_chars:,} characters of StableHLO')
        return '\n'.join(lines)


def lower_stage(
    experiment: ExperimentConfig, name: str, devices: list[jax.Device] | None = None
) -> tuple[LoweringReport, jax.stages.Lowered]:
    """Lowers stage `name`'s sharded train step on `devices` (default: all local ones), its model
    of `config.vocab_size` tokens (no tokenizer is read)."""
    devices = jax.local_devices() if devices is None else devices
    rules = experiment.sharding_rules
    if not experiment.mesh:
        raise ValueError("config.mesh is not set: lowering plans a stage on a device mesh")
    planned = mesh_lib.mesh_shape(experiment.mesh, math.prod(experiment.mesh.values()))
    lowered_shape = scaled_mesh_shape(planned, len(devices))
    plan = sharded.Plan(mesh_lib.make_mesh(lowered_shape, devices), rules)
    stage = experiment.stage(name)
    started = time.perf_counter()
    model = factory.build_model(
        experiment.model,
        Vocabulary(experiment.vocab_size),
        moe=stage.moe,
        lora_rank=stage.lora_rank,
        seed=experiment.seed,
        abstract=True,
    )
    account = accounting.account_model(model, stage.trains, experiment.data.seq_len, name)
    graphdef, trainable, rest = nnx.split(model, factory.trainable_filter(stage.trains), ...)
    optim_cfg = trainer.stage_optim_config(stage)
    opt_state = jax.eval_shape(optim.make_optimizer(optim_cfg).init, trainable)
    batch = abstract_batch(experiment.data, stage.batch_size)
    step_fn = step_lib.train_step_fn(
        graphdef, stage.trains, optim_cfg, trainer.stage_loss_config(stage)
    )
    step = sharded.jit_step(plan, step_fn)
    lowered = step.lower(trainable, opt_state, rest, batch, jax.ShapeDtypeStruct((), jnp.int32))
    seconds = time.perf_counter() - started

    def per_device(tree):
        return tuple(rules_lib.shard_bytes(tree, s, rules) for s in (planned, lowered_shape))

    params = nnx.state(model, nnx.Param)
    report = LoweringReport(
        account=account,
        planned_mesh=planned,
        lowered_mesh=lowered_shape,
        param_bytes=per_device(params),
        grad_bytes=per_device(trainable),
        optimizer_bytes=per_device(opt_state),
        seconds=seconds,
        hlo_chars=len(lowered.as_text()),
    )
    return report, lowered


_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'A config with `mesh`, e.g. configs/paper_scale.py:experts=8,target=v5p-64'
)
config_lib.define_debug_flag()
_STAGE = flags.DEFINE_string('stage', None, 'Stage to lower (default: the last of stage_order).')
flags.mark_flags_as_required(['config'])


def main(argv: list[str]) -> None:
    del argv
    experiment = experiment_lib.from_config_flag(_CONFIG)
    name = _STAGE.value or experiment.stage_order[-1]
    print(f'{jax.local_device_count()} local devices ({jax.devices()[0].platform})')
    report, _ = lower_stage(experiment, name)
    print(report.format())


if __name__ == '__main__':
    # 8 simulated CPU devices unless the caller chose otherwise (before JAX starts).
    jax.config.update('jax_num_cpu_devices', 8)
    app.run(main, flags_parser=config_lib.parse_flags_or_exit)
