"""Parameters, active parameters, FLOPs and memory of each stage's model, without building weights.

The model is built under `nnx.eval_shape`, so a paper-scale config costs no memory. Conventions:
- active parameters per token: every LM parameter a text token passes through; an expert bank
  (base weights and its LoRA) counts K/E of its size (K routed experts of E; for top-P routing
  k_max, an upper bound), shared experts count fully;
- training FLOPs per token (PaLM, appendix B): 6 * (active parameters, less the input embedding
  table, which is a lookup) + 12 * layers * attention width * sequence length (attention scores
  and their weighted sum, forward and backward, over the full sequence);
- memory: float32 parameters, gradients of the trainable ones, and AdamW's two moments of the
  trainable ones. Activations are not estimated (they depend on batch size and rematerialisation);
- expert all-to-all (when `config.mesh` has an `expert` axis > 1): bytes each device puts into the
  expert-parallel exchanges per MoE layer and per step (`expert_parallel.exchange_bytes`: static
  buffers, so exact whatever the routing); a rematerialised forward pass would add its exchanges.
"""

from __future__ import annotations

import dataclasses
import math

import jax
from flax import nnx

from unimoe import checkpoint, factory
from unimoe.config import StageConfig
from unimoe.data import builtin
from unimoe.data.tokenizer import TextTokenizer
from unimoe.experiment import ExperimentConfig
from unimoe.models.unimoe import UniMoE
from unimoe.moe import expert_parallel
from unimoe.nn import sharding
from unimoe.parallel import mesh as mesh_lib

BYTES_PER_PARAM = 4  # float32 parameters, gradients and optimizer moments
# The components accounts report, as unions of the model's parts (`factory.PARTS`).
COMPONENTS: dict[str, tuple[str, ...]] = {
    'llm': factory.TRAINABLE_PARTS['llm'],
    'vision': ('vision',),
    'audio': ('audio', 'sound'),  # Whisper, and BEATs where the model has it
    'connectors': factory.TRAINABLE_PARTS['connectors'],
    'heads': ('image_head', 'audio_head', 'sound_head'),
}
_COMPONENT_OF_PART = {part: name for name, parts in COMPONENTS.items() for part in parts}


@dataclasses.dataclass(frozen=True)
class StageAccount:
    """What one stage's model costs."""

    name: str
    params_by_component: dict[str, int]
    trainable_params: int
    active_params_per_token: int
    train_flops_per_token: float
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int

    @property
    def total_params(self) -> int:
        return sum(self.params_by_component.values())

    @property
    def total_bytes(self) -> int:
        return self.param_bytes + self.grad_bytes + self.optimizer_bytes


def account_model(model: UniMoE, trains: str, seq_len: int, name: str = '') -> StageAccount:
    """Accounts an (abstract or concrete) model whose stage trains the parts `trains`."""
    llm_cfg = model.cfg.llm
    moe_cfg = llm_cfg.moe
    routed_fraction = min(moe_cfg.num_slots, moe_cfg.num_experts) / moe_cfg.num_experts
    is_trainable = factory.trainable_filter(trains)
    by_component = dict.fromkeys(COMPONENTS, 0)
    trainable = 0
    active = 0.0
    embedding = 0
    for path, value in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        path_text = checkpoint.path_str(path)
        size = int(value.get_value().size)
        by_component[_COMPONENT_OF_PART[factory.part_of(path_text)]] += size
        if is_trainable(path, value):
            trainable += size
        if not path_text.startswith('llm/'):
            continue
        if '/ffn/experts/' in path_text:
            active += size * routed_fraction
        else:
            active += size
        if path_text.startswith('llm/embed/'):
            embedding += size
    # A tied head reads the embedding table as a matmul: then it is not a lookup-only cost.
    matmul_active = active - (0 if llm_cfg.tie_embeddings else embedding)
    attention_width = llm_cfg.num_heads * llm_cfg.resolved_head_dim
    flops = 6 * matmul_active + 12 * llm_cfg.num_layers * attention_width * seq_len
    total = sum(by_component.values())
    return StageAccount(
        name=name,
        params_by_component=by_component,
        trainable_params=trainable,
        active_params_per_token=round(active),
        train_flops_per_token=float(flops),
        param_bytes=total * BYTES_PER_PARAM,
        grad_bytes=trainable * BYTES_PER_PARAM,
        optimizer_bytes=2 * trainable * BYTES_PER_PARAM,
    )


def _tokenizer(experiment: ExperimentConfig) -> TextTokenizer:
    """`config.tokenizer` (a pretrained LM's file) when set; else the built-in tokenizer, cached
    when the data was prepared, or the same one trained in memory."""
    return builtin.experiment_tokenizer(
        experiment.tokenizer, experiment.data.data_dir, on_missing='train'
    )


def _stage_models(experiment: ExperimentConfig, stages: list[StageConfig]) -> dict[str, UniMoE]:
    """{stage name: its model, built abstractly}; stages differ in their model only by
    (moe, lora_rank), so each kind is built once."""
    tokenizer = _tokenizer(experiment)
    kinds: dict[tuple[bool, int], UniMoE] = {}
    for stage in stages:
        kind = (stage.moe, stage.lora_rank)
        if kind not in kinds:
            kinds[kind] = factory.build_model(
                experiment.model,
                tokenizer,
                moe=stage.moe,
                lora_rank=stage.lora_rank,
                seed=experiment.seed,
                abstract=True,
            )
    return {stage.name: kinds[(stage.moe, stage.lora_rank)] for stage in stages}


def account_stages(experiment: ExperimentConfig) -> list[StageAccount]:
    """One account per stage of `config.stage_order`, models built abstractly."""
    stages = experiment.ordered_stages()
    models = _stage_models(experiment, stages)
    seq_len = experiment.data.seq_len
    return [account_model(models[s.name], s.trains, seq_len, s.name) for s in stages]


# The parameter columns of `format_accounts` (components of `StageAccount.params_by_component`).
_PARTS = ('llm', 'vision', 'audio', 'connectors')


def _human(count: float, unit: str = '') -> str:
    for scale, suffix in ((1e12, 'T'), (1e9, 'G'), (1e6, 'M'), (1e3, 'k')):
        if abs(count) >= scale:
            return f'{count / scale:.2f}{suffix}{unit}'
    return f'{count:.0f}{unit}'


def _markdown_table(columns: list[str], rows: list[list[str]]) -> str:
    lines = ['| ' + ' | '.join(columns) + ' |', '|' + '---|' * len(columns)]
    return '\n'.join(lines + ['| ' + ' | '.join(row) + ' |' for row in rows])


def format_accounts(accounts: list[StageAccount]) -> str:
    """A markdown table, one row per stage."""
    columns = ['stage', 'params', *_PARTS, 'trainable', 'active/token', 'train FLOPs/token']
    columns.append('memory (params+grads+AdamW)')
    rows = [
        [
            a.name,
            _human(a.total_params),
            *(_human(a.params_by_component[c]) for c in _PARTS),
            _human(a.trainable_params),
            _human(a.active_params_per_token),
            _human(a.train_flops_per_token),
            _human(a.total_bytes, 'B'),
        ]
        for a in accounts
    ]
    return _markdown_table(columns, rows)


@dataclasses.dataclass(frozen=True)
class ExchangeAccount:
    """Expert all-to-all traffic of one MoE stage's training step."""

    name: str
    moe_layers: int
    local_tokens: int
    per_layer: expert_parallel.ExchangeBytes
    num_devices: int

    @property
    def per_step(self) -> int:
        """Bytes one device exchanges per step, forward and backward, all MoE layers."""
        return self.moe_layers * self.per_layer.total


ACTIVATION_BYTES = {'float32': 4, 'bfloat16': 2, 'float16': 2}


def account_expert_exchange(experiment: ExperimentConfig) -> list[ExchangeAccount]:
    """One account per MoE stage when `config.mesh` splits the experts (`expert` axis > 1).

    Tokens per device: the stage's global batch * seq_len over the token shards (the sharding
    rules' batch and sequence axes, `nn.sharding.token_axes`), as
    `expert_parallel.expert_parallel_dispatch` splits them. A mesh without -1 is accounted at its
    own size, whatever this machine has (a pod's mesh planned on a laptop).
    """
    planned = experiment.mesh or {}
    num_devices = jax.device_count() if -1 in planned.values() else math.prod(planned.values())
    sizes = mesh_lib.mesh_shape(planned, num_devices)
    if sizes['expert'] < 2:
        return []
    token_axes = sharding.token_axes(list(sizes), experiment.sharding_rules)
    shards = math.prod(sizes[a] for a in token_axes)
    stages = [stage for stage in experiment.ordered_stages() if stage.moe]
    accounts = []
    for name, model in _stage_models(experiment, stages).items():
        llm_cfg = model.cfg.llm
        if llm_cfg.moe.expert_parallel not in ('auto', 'all_to_all'):
            continue  # no all-to-all: 'off', or the all-gather / reduce-scatter exchange
        stage = experiment.stage(name)  # one accumulated micro-batch at a time
        local_tokens = stage.batch_size // stage.micro_batches * experiment.data.seq_len // shards
        per_layer = expert_parallel.exchange_bytes(
            local_tokens,
            llm_cfg.moe.num_slots,
            llm_cfg.dim,
            sizes['expert'],
            llm_cfg.moe.ep_capacity_factor,
            ACTIVATION_BYTES[llm_cfg.dtype],
        )
        accounts.append(
            ExchangeAccount(name, len(llm_cfg.moe_layers), local_tokens, per_layer, num_devices)
        )
    return accounts


def format_exchange(accounts: list[ExchangeAccount]) -> str:
    """A markdown table, one row per MoE stage (bytes per device unless said otherwise)."""
    columns = ['stage', 'MoE layers', 'expert axis', 'tokens/device', 'C', 'forward/layer']
    columns += ['backward/layer', 'per step', 'per step, off-device', 'per step, whole mesh']
    rows = []
    for a in accounts:
        layer = a.per_layer
        rows.append(
            [a.name, str(a.moe_layers), str(layer.ep_size), str(a.local_tokens)]
            + [str(layer.capacity), _human(layer.forward, 'B'), _human(layer.backward, 'B')]
            + [_human(a.per_step, 'B'), _human(a.moe_layers * layer.off_device, 'B')]
            + [_human(a.per_step * a.num_devices, 'B')]
        )
    return _markdown_table(columns, rows)
