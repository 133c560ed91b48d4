"""Losses and the pure, jitted train step over `nnx.split` state."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from unimoe import factory
from unimoe.config import LossWeights
from unimoe.data.tasks import MODALITIES
from unimoe.models.unimoe import UniMoE
from unimoe.moe import routing
from unimoe.moe.aux_stats import MoEAux
from unimoe.parallel import sharded
from unimoe.train import optim

Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]

LOSS_KINDS = ('chat', 'lm_text', 'classify_image', 'classify_audio', 'classify_sound')


@dataclasses.dataclass(frozen=True, kw_only=True)
class LossConfig(LossWeights):
    """What the loss of a stage adds up: `kind`, one of LOSS_KINDS (it equals the data mode the
    stage reads), and the terms' weights (`unimoe.config.LossWeights`)."""

    kind: str = 'chat'

    def __post_init__(self):
        if self.kind not in LOSS_KINDS:
            raise ValueError(f"loss kind {self.kind!r} is not one of {LOSS_KINDS}")
        for name in ('balance_coef_end', 'dcmoe_coef_end'):
            if getattr(self, name) is not None and self.balance_decay_steps < 1:
                raise ValueError(
                    f"{name}={getattr(self, name)} needs balance_decay_steps >= 1, "
                    f"got {self.balance_decay_steps}"
                )


def next_token_loss(
    logits_btv: jax.Array, tokens_bt: jax.Array, loss_mask_bt: jax.Array
) -> tuple[jax.Array, Metrics]:
    """Mean cross-entropy of token t+1 given positions <= t, over supervised tokens only.

    Position t is scored against token t+1 with the last position weighted 0, rather than
    slicing logits[:, :-1]: the slice would copy the [B, T, V] logits (and pad their gradient
    back), the largest tensor of a step.
    """
    logits = logits_btv.astype(jnp.float32)
    targets = jnp.pad(tokens_bt[:, 1:], ((0, 0), (0, 1)))
    weights = jnp.pad(loss_mask_bt[:, 1:].astype(jnp.float32), ((0, 0), (0, 1)))
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    denom = jnp.maximum(weights.sum(), 1.0)
    correct = (logits.argmax(-1) == targets).astype(jnp.float32)
    return (ce * weights).sum() / denom, {
        'token_accuracy': (correct * weights).sum() / denom,
        'supervised_tokens': weights.sum(),
    }


def classification_loss(logits_bc: jax.Array, labels_b: jax.Array) -> tuple[jax.Array, Metrics]:
    """Cross-entropy over the examples that have a label (label >= 0)."""
    valid = (labels_b >= 0).astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(
        logits_bc.astype(jnp.float32), jnp.maximum(labels_b, 0)
    )
    denom = jnp.maximum(valid.sum(), 1.0)
    correct = (logits_bc.argmax(-1) == labels_b).astype(jnp.float32)
    return (ce * valid).sum() / denom, {'accuracy': (correct * valid).sum() / denom}


def expert_usage_by_modality(counts_lbe: jax.Array, modality_b: jax.Array) -> jax.Array:
    """float32 [M, E]: each modality's share of routed assignments per expert (rows sum to 1).

    The matrix behind Uni-MoE's expert-specialization figures; rows of absent modalities are 0.
    """
    onehot_bm = jax.nn.one_hot(modality_b, len(MODALITIES), dtype=jnp.float32)
    counts_me = jnp.einsum('be,bm->me', counts_lbe.sum(0), onehot_bm)
    return counts_me / jnp.maximum(counts_me.sum(-1, keepdims=True), 1.0)


def metric_axes(model: UniMoE) -> dict[str, tuple]:
    """The axes of the step's array metrics, for `metrics.MetricsWriter(axes=)`: the MoE
    statistics per MoE layer, labelled by the decoder layer it is (`layer3`), and per expert;
    `expert_usage_by_modality` per modality (by name) and expert."""
    moe_layers = [f'layer{i}' for i in model.llm.cfg.moe_layers]
    return {
        **MoEAux.metric_axes(moe_layers),
        'expert_usage_by_modality': (MODALITIES, 'expert'),
    }


def compute_loss(
    model: UniMoE, batch: Batch, cfg: LossConfig, step: jax.Array
) -> tuple[jax.Array, Metrics]:
    if cfg.kind == 'classify_image':
        return classification_loss(model.classify_image(batch['image']), batch['image_label'])
    if cfg.kind == 'classify_audio':
        return classification_loss(model.classify_audio(batch['audio_mel']), batch['audio_label'])
    if cfg.kind == 'classify_sound':
        logits = model.classify_sound(
            batch['sound_fbank'], batch['sound_frame_mask'], batch['sound_chunk_mask']
        )
        return classification_loss(logits, batch['audio_label'])
    answer_bt = batch['loss_mask'] > 0
    token_weight_bt = batch['attn_mask'] * jnp.where(answer_bt, cfg.answer_token_weight, 1.0)
    logits, aux = model(batch, token_weight_bt=token_weight_bt)
    ce, metrics = next_token_loss(logits, batch['tokens'], batch['loss_mask'])
    balance_weight = routing.aux_weight(
        step, start=cfg.balance_coef, end=cfg.balance_coef_end, decay_steps=cfg.balance_decay_steps
    )
    dcmoe_weight = routing.aux_weight(
        step, start=cfg.dcmoe_coef, end=cfg.dcmoe_coef_end, decay_steps=cfg.balance_decay_steps
    )
    loss = (
        ce
        + balance_weight * aux.balance_loss
        + dcmoe_weight * aux.dcmoe_balance_loss
        + cfg.z_coef * aux.z_loss
    )
    moe_metrics = aux.metrics()
    if 'modality' in batch:
        moe_metrics['expert_usage_by_modality'] = expert_usage_by_modality(
            aux.expert_counts_be, batch['modality']
        )
    weights = {'balance_weight': balance_weight, 'dcmoe_weight': dcmoe_weight}
    return loss, {**metrics, **moe_metrics, 'ce': ce, **weights}


def update_router_biases(model: UniMoE, expert_load_le: jax.Array) -> None:
    """Aux-loss-free balancing (DeepSeek-V3): nudge each selection bias toward balanced load.

    Outside the optimizer on purpose: the bias is a `RouterBias` variable, not a Param.
    """
    lm = model.llm
    if lm.cfg.scan_layers:
        # One stacked [blocks, E] bias per MoE layer of the block; its loads are every
        # (MoE layers per block)-th row, in layer order.
        moe_ffns = [layer.ffn for layer in lm.blocks.layers if layer.is_moe]
        update = jax.vmap(routing.bias_update, in_axes=(0, 0, None))
        loads = [expert_load_le[k :: len(moe_ffns)] for k in range(len(moe_ffns))]
    else:
        moe_ffns = [layer.ffn for layer in lm.layers if layer.is_moe]
        update, loads = routing.bias_update, list(expert_load_le)
    for ffn, load in zip(moe_ffns, loads, strict=True):
        bias = getattr(ffn, 'router_bias', None)
        if bias is not None:
            bias.set_value(update(bias.get_value(), load, ffn.cfg.bias_update_rate))


TrainStep = Callable[
    [nnx.State, Any, nnx.State, Batch, jax.Array], tuple[nnx.State, Any, nnx.State, Metrics]
]
# Keys of a train step's metrics that are the non-finite guard's flags, not values to log.
NONFINITE_KEYS = ('nonfinite_loss', 'nonfinite_grads')


def _keep_if(ok: jax.Array, new: Any, old: Any) -> Any:
    """`new` where `ok`, else `old`, leaf by leaf; leaves the step passed through are not copied."""
    return jax.tree.map(lambda n, o: n if n is o else jax.lax.select(ok, n, o), new, old)


def make_train_step(
    plan: sharded.Plan,
    graphdef: nnx.GraphDef,
    trains: str,
    optim_cfg: optim.OptimConfig,
    loss_cfg: LossConfig,
    micro_batches: int = 1,
) -> TrainStep:
    """`train_step_fn` jitted on the plan's mesh (one device without `config.mesh`). Buffers are
    donated: callers must use the returned state."""
    return sharded.jit_step(
        plan, train_step_fn(graphdef, trains, optim_cfg, loss_cfg, micro_batches)
    )


def make_loss_fn(
    graphdef: nnx.GraphDef, trains: str, loss_cfg: LossConfig
) -> Callable[
    [nnx.State, nnx.State, Batch, jax.Array], tuple[jax.Array, tuple[Metrics, nnx.State]]
]:
    """`loss_fn(trainable, rest, batch, step_index) -> (loss, (metrics, new_rest))`, pure."""
    is_trainable = factory.trainable_filter(trains)

    def loss_fn(trainable, rest, batch, step_index):
        # copy=True makes fresh Variables at this trace level, so dropout may advance its RNG count.
        model = nnx.merge(graphdef, trainable, rest, copy=True)
        loss, metrics = compute_loss(model, batch, loss_cfg, step_index)
        # Dropout advanced its RNG counters: hand the new `rest` back out of the pure function.
        _, _, new_rest = nnx.split(model, is_trainable, ...)
        return loss, (metrics, new_rest)

    return loss_fn


# Metrics of micro-batches that add up (the others are averaged).
_SUMMED_METRICS = ('supervised_tokens',)


def accumulated_grads(
    loss_fn: Callable, trainable: nnx.State, rest: nnx.State, batch: Batch,
    step_index: jax.Array, micro_batches: int,
) -> tuple[tuple[jax.Array, tuple[Metrics, nnx.State]], nnx.State]:
    """`jax.value_and_grad(loss_fn, has_aux=True)` over `micro_batches` slices of the batch in
    turn (`lax.scan`: one micro-batch's activations live at a time), gradients and losses
    averaged (each micro-batch weighs the same, as DeepSpeed and Hugging Face accumulate).

    Micro-batch `a` takes rows `a, a + micro_batches, ...`: with the batch split over devices in
    contiguous blocks, every micro-batch keeps rows on every device."""
    value_and_grad = jax.value_and_grad(loss_fn, has_aux=True)
    if micro_batches == 1:
        return value_and_grad(trainable, rest, batch, step_index)
    micro = jax.tree.map(
        lambda x: x.reshape(-1, micro_batches, *x.shape[1:]).swapaxes(0, 1), batch
    )

    def one(carry, batch):
        grads_sum, rest = carry
        (loss, (metrics, rest)), grads = value_and_grad(trainable, rest, batch, step_index)
        return (jax.tree.map(jnp.add, grads_sum, grads), rest), (loss, metrics)

    zeros = jax.tree.map(jnp.zeros_like, trainable)
    (grads_sum, rest), (losses, metrics) = jax.lax.scan(one, (zeros, rest), micro)
    metrics = {
        name: value.sum(0) if name in _SUMMED_METRICS else value.mean(0)
        for name, value in metrics.items()
    }
    grads = jax.tree.map(lambda g: g / micro_batches, grads_sum)
    return (losses.mean(), (metrics, rest)), grads


@functools.lru_cache(maxsize=None)
def train_step_fn(
    graphdef: nnx.GraphDef,
    trains: str,
    optim_cfg: optim.OptimConfig,
    loss_cfg: LossConfig,
    micro_batches: int = 1,
) -> TrainStep:
    """Pure `step(trainable, opt_state, rest, batch, step_index)`. `step_index` (0-based) drives
    the aux-weight schedule. Cached, so jitting it again (the next same-shaped stage, a resume)
    hits JAX's compilation cache.

    `trainable` are the Params selected by `trains` (see `factory.trainable_filter`); `rest` is
    everything else (frozen params, RNG state for dropout).

    Non-finite guard: a step whose loss or any gradient leaf is NaN / Inf returns its inputs
    unchanged (no update, no optimizer or RNG advance). Its metrics carry the flags
    `nonfinite_loss` (bool) and `nonfinite_grads` (bool [leaves of `trainable`], in
    `jax.tree.leaves` order), read by `unimoe.train.nonfinite.NonFiniteGuard`. The check reuses the
    per-leaf squared norms of `grad_norm` (a leaf whose squared norm overflows float32 counts as
    non-finite: clipping by an infinite norm would zero or NaN the update).

    `micro_batches` > 1 accumulates the gradients of that many slices of the batch
    (`accumulated_grads`) before one update.
    """
    tx = optim.make_optimizer(optim_cfg)
    is_trainable = factory.trainable_filter(trains)

    loss_fn = make_loss_fn(graphdef, trains, loss_cfg)

    def step(trainable, opt_state, rest, batch, step_index):
        (loss, (metrics, new_rest)), grads = accumulated_grads(
            loss_fn, trainable, rest, batch, step_index, micro_batches
        )
        sq_norms = jnp.stack(
            [jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(grads)]
        )
        nonfinite_grads = ~jnp.isfinite(sq_norms)
        ok = jnp.isfinite(loss) & ~jnp.any(nonfinite_grads)
        updates, new_opt_state = tx.update(grads, opt_state, trainable)
        new_trainable = optax.apply_updates(trainable, updates)
        if 'expert_load' in metrics and metrics['expert_load'].shape[0]:
            model = nnx.merge(graphdef, new_trainable, new_rest, copy=True)
            update_router_biases(model, jax.lax.stop_gradient(metrics['expert_load']))
            _, _, new_rest = nnx.split(model, is_trainable, ...)
        return (
            _keep_if(ok, new_trainable, trainable),
            _keep_if(ok, new_opt_state, opt_state),
            _keep_if(ok, new_rest, rest),
            {
                **metrics,
                'loss': loss,
                'grad_norm': jnp.sqrt(jnp.sum(sq_norms)),
                'nonfinite_loss': ~jnp.isfinite(loss),
                'nonfinite_grads': nonfinite_grads,
            },
        )

    return step
