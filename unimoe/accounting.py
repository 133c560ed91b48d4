"""Parameters, active parameters, FLOPs and memory of each stage's model, without building weights.

The model is built under `nnx.eval_shape`, so a paper-scale config costs no memory. Conventions:
- active parameters per token: every LM parameter a text token passes through; an expert bank
  (base weights and its LoRA) counts K/E of its size (K routed experts of E; for top-P routing
  k_max, an upper bound), shared experts count fully;
- training FLOPs per token (PaLM, appendix B): 6 * (active parameters, less the input embedding
  table, which is a lookup) + 12 * layers * attention width * sequence length (attention scores
  and their weighted sum, forward and backward, over the full sequence);
- memory: float32 parameters, gradients of the trainable ones, and AdamW's two moments of the
  trainable ones. Activations are not estimated (they depend on batch size and rematerialisation).
"""

from __future__ import annotations

import dataclasses
import pathlib

import ml_collections
from flax import nnx

from unimoe.data import tasks as tasks_lib
from unimoe.data.tokenizer import PretrainedTokenizer, Tokenizer
from unimoe.models.unimoe import UniMoE
from unimoe.train import stages, trainer

BYTES_PER_PARAM = 4  # float32 parameters, gradients and optimizer moments
COMPONENTS = ('llm', 'vision', 'audio', 'connectors', 'heads')


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


def _component(path: str) -> str:
    top = path.split('/', 1)[0]
    if top in ('llm', 'vision', 'audio'):
        return top
    if top in ('image_proj', 'audio_conn'):
        return 'connectors'
    return 'heads'


def account_model(model: UniMoE, trains: str, seq_len: int, name: str = '') -> StageAccount:
    """Accounts an (abstract or concrete) model whose stage trains the parts `trains`."""
    llm_cfg = model.cfg.llm
    moe_cfg = llm_cfg.moe
    routed_fraction = min(moe_cfg.num_slots, moe_cfg.num_experts) / moe_cfg.num_experts
    is_trainable = stages.trainable_filter(trains)
    by_component = dict.fromkeys(COMPONENTS, 0)
    trainable = 0
    active = 0.0
    embedding = 0
    for path, value in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        path_text = stages.path_str(path)
        size = int(value.get_value().size)
        by_component[_component(path_text)] += size
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


def _tokenizer(config: ml_collections.ConfigDict) -> Tokenizer | PretrainedTokenizer:
    """`config.tokenizer` (a pretrained LM's file) when set; else the built-in tokenizer, cached
    when the data was prepared, or the same one trained in memory."""
    if config.get('tokenizer'):
        return PretrainedTokenizer(config.tokenizer)
    # Imported here: run -> trainer -> ...; accounting is imported by run.
    from unimoe import run

    path = pathlib.Path(config.data.data_dir) / run.TOKENIZER_FILE
    if path.exists():
        return Tokenizer.from_file(path)
    return Tokenizer.train(tasks_lib.tokenizer_corpus())


def account_stages(config: ml_collections.ConfigDict) -> list[StageAccount]:
    """One account per stage of `config.stage_order`, models built abstractly."""
    tokenizer = _tokenizer(config)
    # Stages differ in their model only by (moe, lora_rank): build each kind once.
    models: dict[tuple[bool, int], UniMoE] = {}
    accounts = []
    for name in trainer.split_list(config.stage_order):
        stage = config.stages[name]
        kind = (bool(stage.moe), int(stage.lora_rank))
        if kind not in models:
            models[kind] = trainer.build_model(
                config, tokenizer, moe=kind[0], lora_rank=kind[1], seed=config.seed, abstract=True
            )
        accounts.append(account_model(models[kind], stage.trains, config.data.seq_len, name))
    return accounts


def _human(count: float, unit: str = '') -> str:
    for scale, suffix in ((1e12, 'T'), (1e9, 'G'), (1e6, 'M'), (1e3, 'k')):
        if abs(count) >= scale:
            return f'{count / scale:.2f}{suffix}{unit}'
    return f'{count:.0f}{unit}'


def format_accounts(accounts: list[StageAccount]) -> str:
    """A markdown table, one row per stage."""
    header = (
        '| stage | params | llm | vision | audio | connectors | trainable | active/token '
        '| train FLOPs/token | memory (params+grads+AdamW) |'
    )
    lines = [header, '|' + '---|' * 10]
    for a in accounts:
        parts = [a.params_by_component[c] for c in ('llm', 'vision', 'audio', 'connectors')]
        lines.append(
            f'| {a.name} | {_human(a.total_params)} | '
            + ' | '.join(_human(p) for p in parts)
            + f' | {_human(a.trainable_params)} | {_human(a.active_params_per_token)} '
            f'| {_human(a.train_flops_per_token)} | {_human(a.total_bytes, "B")} |'
        )
    return '\n'.join(lines)
