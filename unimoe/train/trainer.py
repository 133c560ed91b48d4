"""Runs an experiment's stages in order: build, initialise, train, checkpoint, resume, skip done.

Resume is exact: a checkpoint holds every Param, the other model variables (dropout RNG state,
router biases), the optimizer state (its step count drives the learning-rate schedule), the
stage's counters and the data iterator position, so an interrupted and resumed stage logs the same
losses and ends with the same parameters as an uninterrupted one. See docs/design.md,
"Reliability".
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import time
import zlib
from typing import Any

import jax
import numpy as np
from flax import nnx

from unimoe import factory, storage
from unimoe.checkpoint import Checkpointer, path_str
from unimoe.config import LossWeights, StageConfig
from unimoe.data import json_pipeline, pipeline
from unimoe.experiment import ExperimentConfig
from unimoe.data.tokenizer import TextTokenizer
from unimoe.parallel import mesh as mesh_lib, sharded
from unimoe.train import metrics as metrics_lib, nonfinite, optim, preemption, step as step_lib
from unimoe.train import throughput, workdir as workdir_lib

log = logging.getLogger(__name__)


def json_data_config(
    experiment: ExperimentConfig, stage: StageConfig, seed: int
) -> json_pipeline.JsonDataConfig:
    """The real-data pipeline of a stage with `json_sources`: `config.json_data` (data_dir,
    media_root, on_error, workers, ...; the shapes of `config.data`) with the stage's sources,
    weights and batch size."""
    return dataclasses.replace(
        experiment.json_data,
        sources=stage.json_sources,
        weights=stage.json_weights,
        batch_size=stage.batch_size,
        seed=seed,
    )


def stage_optim_config(stage: StageConfig) -> optim.OptimConfig:
    return optim.OptimConfig(
        learning_rate=stage.learning_rate,
        total_steps=stage.steps,
        warmup_steps=stage.warmup_steps,
        weight_decay=stage.weight_decay,
        grad_clip=stage.grad_clip,
    )


def stage_loss_config(stage: StageConfig) -> step_lib.LossConfig:
    """The stage's loss: `mode` is its kind, the weights (`LossWeights`) are the stage's own."""
    weights = {f.name: getattr(stage, f.name) for f in dataclasses.fields(LossWeights)}
    return step_lib.LossConfig(kind=stage.mode, **weights)


def stage_loader(
    experiment: ExperimentConfig, stage: StageConfig, tokenizer: TextTokenizer, seed: int
) -> Any:
    """The stage's training batches: this process's shard of the records and of every batch."""
    shards = dict(shard_index=jax.process_index(), shard_count=jax.process_count())
    if stage.json_sources:
        return json_pipeline.make_dataset(
            json_data_config(experiment, stage, seed), tokenizer, **shards
        )
    return pipeline.make_train_loader(
        dataclasses.replace(experiment.data, batch_size=stage.batch_size),
        tokenizer,
        list(stage.tasks),
        stage.mode,
        seed=seed,
        **shards,
    )


class TrainState:
    """What a step changes and a checkpoint holds: the model split into its trainable Params and
    the rest (frozen Params, dropout RNG state, router biases), the optimizer state and the
    stage's counters (bad records the real-data pipeline skipped, steps the non-finite guard
    skipped, since the stage started)."""

    def __init__(
        self, model: nnx.Module, stage: StageConfig, plan: sharded.Plan, tx: Any
    ):
        self.model, self.is_trainable = model, factory.trainable_filter(stage.trains)
        self.graphdef, trainable, rest = nnx.split(model, self.is_trainable, ...)
        if stage.frozen_in_compute_dtype:
            rest = factory.frozen_in_compute_dtype(rest, model.cfg.llm.dtype)
        # Parameters loaded from earlier stages arrive as host arrays: back into their shards.
        self.trainable, self.rest = sharded.place(plan, trainable), sharded.place(plan, rest)
        self.opt_state = sharded.init_optimizer(plan, tx, self.trainable)
        self.counters = {'skipped_records': np.int32(0), 'nonfinite_steps': np.int32(0)}

    def checkpoint(self) -> dict[str, Any]:
        merged = nnx.merge(self.graphdef, self.trainable, self.rest)
        return {
            'params': nnx.state(merged, nnx.Param),
            # Dropout RNG keys and counts, router biases: what a resumed step needs besides Params.
            'model_state': nnx.state(merged, nnx.Not(nnx.Param)),
            'opt_state': self.opt_state,
            'counters': self.counters,
        }

    def restore_latest(self, ckpt: Checkpointer, data_iter: Any, plan: sharded.Plan) -> int:
        """Restores the latest restorable checkpoint (each process its shards, straight into
        place) and the data iterator; returns its step, 0 when there is none."""
        abstract_state = sharded.with_shardings(plan, jax.eval_shape(self.checkpoint))
        restored = ckpt.restore_latest(abstract_state, data_iter)
        if restored is None:
            return 0
        step, state = restored
        nnx.update(self.model, state['params'], state['model_state'])
        self.graphdef, self.trainable, self.rest = nnx.split(self.model, self.is_trainable, ...)
        self.opt_state = state['opt_state']
        self.counters = {k: np.int32(v) for k, v in state['counters'].items()}
        return step

    def apply(self, train_step: step_lib.TrainStep, batch: Any, step: int) -> Any:
        """One train step on this state; returns its metrics."""
        self.trainable, self.opt_state, self.rest, metrics = train_step(
            self.trainable, self.opt_state, self.rest, batch, np.int32(step - 1)
        )
        return metrics


def train_stage(
    experiment: ExperimentConfig,
    name: str,
    workdir: pathlib.Path,
    tokenizer: TextTokenizer,
    signals: preemption.PreemptionGuard | None = None,
) -> dict[str, Any]:
    """Trains one stage to its last step, resuming from its latest restorable checkpoint.

    If `signals` has caught SIGTERM / SIGINT, saves a checkpoint after the current step and raises
    `preemption.Preempted`.
    """
    stage = experiment.stage(name)
    # Sharded init, state and step on `config.mesh` (one device without it).
    plan = sharded.make_plan(experiment.mesh, experiment.sharding_rules)
    model, origin = factory.build_stage_model(experiment, name, workdir, tokenizer, plan)
    optim_cfg, loss_cfg = stage_optim_config(stage), stage_loss_config(stage)
    state = TrainState(model, stage, plan, optim.make_optimizer(optim_cfg))
    log.info('stage %s: mesh %s', name, mesh_lib.describe(plan.mesh))
    defined = sorted(set(origin) | {path_str(p) for p, _ in nnx.to_flat_state(state.trainable)})
    num_trainable = sum(x.size for x in jax.tree.leaves(state.trainable))
    log.info('stage %s: %d trainable params (%s)', name, num_trainable, stage.trains)
    seed = experiment.seed + zlib.crc32(name.encode()) % 1000
    data_iter = iter(stage_loader(experiment, stage, tokenizer, seed))

    # Closing waits for a save in flight, also when training stops on an error. A write failing
    # for want of storage (checkpoint, metrics, records) stops the run with one line.
    with (
        factory.stage_checkpointer(workdir, name) as ckpt,
        storage.storage_errors(workdir / name, ckpt.kept_message),
    ):
        start_step = state.restore_latest(ckpt, data_iter, plan)
        if start_step:
            log.info('stage %s: resumed at step %d', name, start_step)
        if jax.process_index() == 0:
            workdir_lib.record_stage_start(experiment, name, workdir, start_step)
        loop = StepLoop(experiment, stage, name, state, ckpt, data_iter)
        train_step = step_lib.make_train_step(
            plan, state.graphdef, stage.trains, optim_cfg, loss_cfg, stage.micro_batches
        )
        started = time.perf_counter()
        last = loop.run(plan, train_step, start_step, workdir / name, signals)
        summary = {
            'final_step': stage.steps,
            'seconds': time.perf_counter() - started,
            **{k: float(v) for k, v in last.items() if np.ndim(v) == 0},
        }
        # Not in the returned summary (it is long): what later stages may take from this one.
        ckpt.mark_done({**summary, 'defined_params': defined})
        return summary


class StepLoop:
    """A stage's steps from its start (or resume) step to its last: logging every `log_every`
    steps, checkpoints every `checkpoint_every` and at the end, the non-finite guard, and a
    checkpoint then `preemption.Preempted` when SIGTERM / SIGINT arrived."""

    def __init__(
        self,
        experiment: ExperimentConfig,
        stage: StageConfig,
        name: str,
        state: TrainState,
        ckpt: Checkpointer,
        data_iter: Any,
    ):
        self.stage, self.name, self.state, self.ckpt = stage, name, state, ckpt
        self.data_iter = data_iter
        self.log_every = experiment.log_every
        self.seq_len = experiment.data.seq_len
        self.checkpoint_every = experiment.checkpoint_every
        self.schedule = optim.learning_rate_schedule(stage_optim_config(stage))
        self.guard = nonfinite.NonFiniteGuard(
            experiment.nonfinite,
            nonfinite.leaf_paths(state.trainable),
            name,
            skipped_steps=int(state.counters['nonfinite_steps']),
        )

    def save(self, step: int, force: bool = False) -> None:
        self.guard.check()  # in 'stop' mode, never checkpoint past a bad step unnoticed
        self.state.counters['nonfinite_steps'] = np.int32(self.guard.skipped_steps)
        self.ckpt.save(step, self.state.checkpoint(), self.data_iter, force=force)

    def run(
        self,
        plan: sharded.Plan,
        train_step: step_lib.TrainStep,
        start_step: int,
        logdir: pathlib.Path,
        signals: preemption.PreemptionGuard | None,
    ) -> dict[str, Any]:
        """Runs the steps after `start_step`; returns the last logged metrics."""
        stage, counters, last = self.stage, self.state.counters, {}
        axes = step_lib.metric_axes(self.state.model)
        devices = plan.mesh.devices.flat
        meter = throughput.stage_meter(self.state.model, stage, self.seq_len, devices)
        with metrics_lib.MetricsWriter(
            logdir, total_steps=stage.steps, desc=self.name, initial_step=start_step, axes=axes
        ) as writer:
            for step in range(start_step + 1, stage.steps + 1):
                batch = dict(next(self.data_iter))
                # Skipped records travel in the batches (on_error='skip'), never into the step.
                counters['skipped_records'] += np.int32(np.sum(batch.pop('num_skipped', 0)))
                meter.count(batch)
                if step == start_step + 1:
                    log.info('compiling %s ...', self.name)  # the first call compiles the step
                metrics = self.state.apply(train_step, sharded.shard_batch(plan, batch), step)
                if step == start_step + 1:
                    seconds = meter.restart_after(metrics)  # its compile stays out of the rates
                    log.info('stage %s: compiled in %.1f s (step included)', self.name, seconds)
                self.guard.add(step, metrics)
                writer.update(1)
                if step % self.log_every == 0 or step == stage.steps:
                    last = self.log(writer, step, metrics, meter)
                if signals is not None and signals.requested and step < stage.steps:
                    self.save(step, force=True)
                    self.ckpt.wait()
                    raise preemption.Preempted(self.name, step, signals.requested)
                if step % self.checkpoint_every == 0 and step < stage.steps:
                    self.save(step)
        self.save(stage.steps, force=True)
        self.ckpt.wait()
        return last

    def log(
        self,
        writer: metrics_lib.MetricsWriter,
        step: int,
        metrics: Any,
        meter: throughput.StepMeter,
    ) -> dict[str, Any]:
        """Writes step `step`'s metrics and the rates of the steps since the last log (the
        non-finite guard checked first); returns the step's metrics."""
        bad_steps = self.guard.check()
        last = {k: np.asarray(v) for k, v in jax.device_get(metrics).items()}
        rates = meter.rates()  # after the read-back, which waited for the steps it covers
        # A skipped step's NaN / Inf values are not logged; its step is counted instead.
        last = {k: v for k, v in last.items() if np.all(np.isfinite(v))}
        # Skipped steps do not advance the optimizer, nor so its schedule.
        applied = step - 1 - self.guard.skipped_steps + (step in bad_steps)
        extra = {'learning_rate': self.schedule(applied)}
        if self.guard.mode == 'skip':
            extra['nonfinite_steps'] = self.guard.skipped_steps
        if self.stage.json_sources:
            extra['skipped_records'] = self.state.counters['skipped_records']
        writer.write(step, {**last, **extra, **rates})
        return last


def run_stages(
    experiment: ExperimentConfig, workdir: pathlib.Path, tokenizer: TextTokenizer
) -> None:
    """Trains every unfinished stage of a validated experiment (`train.validate`); SIGTERM /
    SIGINT raise `preemption.Preempted` after saving."""
    with preemption.PreemptionGuard() as signals:
        for name in experiment.stage_order:
            ckpt = factory.stage_checkpointer(workdir, name)
            done, latest = ckpt.is_done(), ckpt.latest_step()
            ckpt.close()
            if done:
                log.info('stage %s: finished earlier, skipping', name)
                continue
            if signals.requested:  # arrived after the previous stage's last step
                raise preemption.Preempted(name, latest or 0, signals.requested)
            summary = train_stage(experiment, name, workdir, tokenizer, signals)
            log.info('stage %s done: %s', name, summary)
        if signals.requested:  # arrived during the last stage's last step: stop before evaluating
            raise preemption.Preempted(name, experiment.stage(name).steps, signals.requested)
