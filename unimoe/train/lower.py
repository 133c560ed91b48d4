r"""Lowers a config's sharded train step from abstract shapes and prints what it costs per device.

  python -m unimoe.train.lower --config=configs/paper_scale.py:experts=8,target=v5p-64 [--compile]

The model is built abstractly (`unimoe.models.abstract`), so a 7B model costs no memory. The
step is `jax.jit(step, in_shardings, out_shardings).lower(...)` on a mesh of the local devices
with the same axis names as `config.mesh`, scaled down to the local device count when the
planned mesh is larger (a pod's mesh on 8 simulated CPU devices); parameter and optimizer-state
memory per device is printed for both meshes. Nothing is executed.

`--compile` also compiles the step, on as many simulated CPU devices as the planned mesh has
(when no accelerator is present), and prints its memory plan per device from XLA's memory
analysis next to the memory of `config.target_device` (`MemoryPlan`, `DEVICE_MEMORY_GIB`); the
last line is `RESULT peak_gib=... device_gib=... lower_s=... compile_s=...`.
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


def _size(size: int) -> str:
    return f'{size / 2**30:.2f} GiB' if size >= 2**30 else f'{size / 2**20:.1f} MiB'


@dataclasses.dataclass(frozen=True)
class LoweringReport:
    account: accounting.StageAccount
    planned_mesh: dict[str, int]
    lowered_mesh: dict[str, int]
    # Bytes per device on (planned, lowered) mesh: params, gradients, optimizer state.
    param_bytes: tuple[int, int]
    grad_bytes: tuple[int, int]
    optimizer_bytes: tuple[int, int]
    batch_bytes: int  # per device of the lowered mesh
    seconds: float
    hlo_chars: int

    def format(self) -> str:
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
                f'| {label}: {axes} | {math.prod(shape.values())} | {_size(self.param_bytes[i])} '
                f'| {_size(self.grad_bytes[i])} | {_size(self.optimizer_bytes[i])} |'
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
    if stage.frozen_in_compute_dtype:
        rest = factory.frozen_in_compute_dtype(rest, model.cfg.llm.dtype)
    optim_cfg = trainer.stage_optim_config(stage)
    opt_state = jax.eval_shape(optim.make_optimizer(optim_cfg).init, trainable)
    batch = abstract_batch(experiment.data, stage.batch_size)
    step_fn = step_lib.train_step_fn(
        graphdef, stage.trains, optim_cfg, trainer.stage_loss_config(stage), stage.micro_batches
    )
    step = sharded.jit_step(plan, step_fn)
    lowered = step.lower(trainable, opt_state, rest, batch, jax.ShapeDtypeStruct((), jnp.int32))
    seconds = time.perf_counter() - started

    def per_device(tree):
        return tuple(rules_lib.shard_bytes(tree, s, rules) for s in (planned, lowered_shape))

    # The step's own parameters: trainable and frozen (these maybe in the compute dtype).
    params = (trainable, nnx.filter_state(rest, nnx.Param))
    report = LoweringReport(
        account=account,
        planned_mesh=planned,
        lowered_mesh=lowered_shape,
        param_bytes=per_device(params),
        grad_bytes=per_device(trainable),
        optimizer_bytes=per_device(opt_state),
        batch_bytes=sum(
            math.prod(plan.batch_sharding(x.shape).shard_shape(x.shape)) * x.dtype.itemsize
            for x in batch.values()
        ),
        seconds=seconds,
        hlo_chars=len(lowered.as_text()),
    )
    return report, lowered


# Memory one device offers a program, in GiB (2**30 bytes), by `config.target_device`: the
# GPUs' totals as nvidia-smi reports them (H100 SXM 81559 MiB, H200 143771 MiB, A100 80GB 81920
# MiB), not the decimal GB they are sold by ("80 GB"); the TPUs' HBM per chip (Cloud TPU docs).
# The runtime keeps some of it (CUDA context, JAX's GPU preallocation fraction): docs/design.md.
DEVICE_MEMORY_GIB = {
    'h100': 81559 / 1024,
    'h200': 143771 / 1024,
    'a100': 81920 / 1024,
    'v5p': 95.0,
    'v5e': 16.0,
    'v4': 32.0,
}


# The program is never run, so its machine code need not be optimised: LLVM at -O0 leaves XLA's
# HLO passes and buffer assignment (the memory figures) as they are and cut the tiny step's CPU
# compile from 40 s to 26 s (same bytes, docs/design.md).
PLANNING_COMPILER_OPTIONS = {'xla_backend_optimization_level': 0}


def device_memory_bytes(target_device: str | None) -> int | None:
    """Bytes of one `target_device` (a `DEVICE_MEMORY_GIB` key); None when no device is named."""
    if target_device is None:
        return None
    if target_device not in DEVICE_MEMORY_GIB:
        raise ValueError(
            f"config.target_device={target_device!r}: expected one of {sorted(DEVICE_MEMORY_GIB)}"
        )
    return round(DEVICE_MEMORY_GIB[target_device] * 2**30)


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Bytes one device needs for a compiled train step: XLA's memory analysis of the per-device
    SPMD program, its arguments split by what the shapes say they hold.

    peak = arguments + outputs - outputs aliased to (donated) arguments + temporaries + generated
    code: what XLA's buffer assignment allocates for one run of the program (its memory-usage
    report's total). Arguments and outputs are held for the whole run; the temporaries are one
    slab, sized by XLA's heap simulation of their lifetimes.
    Parameters, optimizer state and the batch are the per-device shards of the arguments by the
    rules; what remains of the arguments is RNG state and the step index. Gradients live among
    the temporaries: `grad_bytes` (the trainable shards) is shown, not added.
    """

    mesh: dict[str, int]
    # From shapes and the sharding rules.
    param_bytes: int
    optimizer_bytes: int
    batch_bytes: int
    grad_bytes: int
    # From XLA (`jax.stages.Compiled.memory_analysis()`).
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    generated_code_bytes: int
    device_bytes: int | None  # the target device's memory (`DEVICE_MEMORY_GIB`)
    lower_seconds: float
    compile_seconds: float

    @property
    def other_argument_bytes(self) -> int:
        return self.argument_bytes - self.param_bytes - self.optimizer_bytes - self.batch_bytes

    @property
    def peak_bytes(self) -> int:
        return (
            self.argument_bytes
            + self.output_bytes
            - self.alias_bytes
            + self.temp_bytes
            + self.generated_code_bytes
        )

    def format(self) -> str:
        """A markdown table (peak = the sum of the rows above it), then the RESULT line."""
        axes = ' '.join(f'{k}={v}' for k, v in self.mesh.items() if v > 1) or 'single'
        rows = [
            ('parameters', self.param_bytes),
            ('optimizer state', self.optimizer_bytes),
            ('batch', self.batch_bytes),
            ('other arguments (RNG state, step index)', self.other_argument_bytes),
            ('outputs not aliased to arguments (metrics)', self.output_bytes - self.alias_bytes),
            ('temporaries (activations, gradients, collectives)', self.temp_bytes),
            ('generated code', self.generated_code_bytes),
            ('peak (sum of the above)', self.peak_bytes),
            ('gradients (among the temporaries)', self.grad_bytes),
        ]
        if self.device_bytes is not None:
            rows.append(('device memory', self.device_bytes))
        lines = [f'compiled for {axes} (XLA memory analysis), per device:']
        lines += ['| | size | bytes |', '|---|---:|---:|']
        lines += [f'| {label} | {_size(size)} | {size:,} |' for label, size in rows]
        lines.append(
            f'lowered in {self.lower_seconds:.1f} s, compiled in {self.compile_seconds:.1f} s'
        )
        return '\n'.join(lines + [self.result_line()])

    def result_line(self) -> str:
        """device_gib is nan when the config names no target device."""
        device = math.nan if self.device_bytes is None else self.device_bytes / 2**30
        return (
            f'RESULT peak_gib={self.peak_bytes / 2**30:.3f} device_gib={device:.3f} '
            f'lower_s={self.lower_seconds:.1f} compile_s={self.compile_seconds:.1f}'
        )


def compile_stage(
    experiment: ExperimentConfig,
    name: str,
    device_bytes: int | None = None,
    devices: list[jax.Device] | None = None,
) -> tuple[LoweringReport, MemoryPlan]:
    """Lowers (`lower_stage`) and compiles stage `name`'s sharded train step: its memory plan
    per device of the lowered mesh, next to the target device's `device_bytes`."""
    report, lowered = lower_stage(experiment, name, devices)
    started = time.perf_counter()
    stats = lowered.compile(compiler_options=PLANNING_COMPILER_OPTIONS).memory_analysis()
    compile_seconds = time.perf_counter() - started
    if stats is None:
        raise RuntimeError(f"{jax.devices()[0].platform}: XLA reports no memory analysis")
    plan = MemoryPlan(
        mesh=report.lowered_mesh,
        param_bytes=report.param_bytes[1],
        optimizer_bytes=report.optimizer_bytes[1],
        batch_bytes=report.batch_bytes,
        grad_bytes=report.grad_bytes[1],
        argument_bytes=stats.argument_size_in_bytes,
        output_bytes=stats.output_size_in_bytes,
        alias_bytes=stats.alias_size_in_bytes,
        temp_bytes=stats.temp_size_in_bytes,
        generated_code_bytes=stats.generated_code_size_in_bytes,
        device_bytes=device_bytes,
        lower_seconds=report.seconds,
        compile_seconds=compile_seconds,
    )
    return report, plan


_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'A config with `mesh`, e.g. configs/paper_scale.py:experts=8,target=v5p-64'
)
config_lib.define_debug_flag()
_STAGE = flags.DEFINE_string('stage', None, 'Stage to lower (default: the last of stage_order).')
_COMPILE = flags.DEFINE_bool(
    'compile', False, 'Also compile the step and print its memory plan per device.'
)
flags.mark_flags_as_required(['config'])


def main(argv: list[str]) -> None:
    del argv
    experiment = experiment_lib.from_config_flag(_CONFIG)
    name = _STAGE.value or experiment.stage_order[-1]
    try:
        device_bytes = device_memory_bytes(_CONFIG.value.get('target_device'))
    except ValueError as e:
        config_lib.exit_on_user_error(e)
    # Simulated CPU devices (JAX has not started yet): 8 to lower, the planned mesh's count to
    # compile it whole (a scaled-down mesh would plan another program's memory).
    planned_devices = math.prod(experiment.mesh.values()) if experiment.mesh else 1
    jax.config.update('jax_num_cpu_devices', planned_devices if _COMPILE.value else 8)
    print(f'{jax.local_device_count()} local devices ({jax.devices()[0].platform})')
    if not _COMPILE.value:
        report, _ = lower_stage(experiment, name)
        print(report.format())
        return
    report, plan = compile_stage(experiment, name, device_bytes)
    print(report.format())
    print(plan.format())


if __name__ == '__main__':
    app.run(main, flags_parser=config_lib.parse_flags_or_exit)
