"""Stage accounting: hand-counted parameters, active parameters, FLOPs and memory; the CLI."""

import subprocess
import sys

from flax import nnx

from tests.tiny_model import model_config
from unimoe import accounting, experiment
from unimoe.models.unimoe import UniMoE

# tests.tiny_model LLM: vocab 41, dim 24, 2 layers, 3 heads of 8 (1 kv head), FFN 20, untied head;
# MoE: 3 experts, top-2; LoRA rank 2 on attention and experts.
EMBED = 41 * 24
ATTN = 24 * 24 + 24 * 8 + 24 * 8 + 24 * 24  # q, k, v, o
FFN = 3 * 24 * 20
NORMS = 2 * 24
LORA_ATTN = (24 * 2 + 2 * 24) * 2 + (24 * 2 + 2 * 8) * 2  # q, o; k, v
LORA_EXPERT = (24 * 2 + 2 * 20) * 2 + (20 * 2 + 2 * 24)  # gate, up; down
ROUTER = 24 * 3


def test_dense_and_moe_llm_counts_match_hand_counts():
    dense = nnx.eval_shape(lambda: UniMoE(model_config(), rngs=nnx.Rngs(0)))
    account = accounting.account_model(dense, 'llm', seq_len=10)
    llm = 2 * EMBED + 2 * (ATTN + FFN + NORMS) + 24
    assert account.params_by_component['llm'] == llm
    assert account.active_params_per_token == llm
    assert account.trainable_params == llm
    assert account.train_flops_per_token == 6 * (llm - EMBED) + 12 * 2 * 24 * 10
    total = account.total_params
    assert account.param_bytes == 4 * total and account.optimizer_bytes == 8 * llm

    moe = nnx.eval_shape(lambda: UniMoE(model_config(moe=True, lora_rank=2), rngs=nnx.Rngs(0)))
    account = accounting.account_model(moe, 'lora+router', seq_len=10)
    experts = 3 * (FFN + LORA_EXPERT)
    per_layer = ATTN + LORA_ATTN + NORMS + ROUTER + experts
    assert account.params_by_component['llm'] == 2 * EMBED + 2 * per_layer + 24
    # Top-2 of 3: a token passes through 2/3 of each expert bank (base and adapters).
    active = 2 * EMBED + 2 * (per_layer - experts + experts * 2 / 3) + 24
    assert account.active_params_per_token == round(active)
    assert account.trainable_params == 2 * (LORA_ATTN + 3 * LORA_EXPERT + ROUTER)
    # The encoders do not change with the LLM's FFN kind.
    dense_account = accounting.account_model(dense, 'llm', seq_len=10)
    for part in ('vision', 'audio', 'connectors'):
        assert account.params_by_component[part] == dense_account.params_by_component[part] > 0


def test_dry_run_prints_one_row_per_stage_and_trains_nothing(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            '-m',
            'unimoe.main',
            '--config=configs/unimoe_tiny.py:mode=test',
            '--dry_run',
            f'--config.data.data_dir={tmp_path / "absent"}',
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    rows = [line for line in result.stdout.splitlines() if line.startswith('| s')][1:]
    assert [row.split('|')[1].strip() for row in rows] == [
        's0_llm', 's0_vision', 's0_audio', 's0_sound', 's1_align',
        's2_image', 's2_video', 's2_speech', 's2_audio', 's3_moe',
    ]  # fmt: skip
    assert 'config (after command-line overrides)' in result.stdout
    assert not (tmp_path / 'absent').exists()  # no dataset, tokenizer or checkpoint written


def test_a_pretrained_tokenizer_sets_the_vocabulary(tmp_path):
    import tokenizers

    from unimoe import config as config_lib

    vocab = {'<unk>': 0, '<s>': 1, '</s>': 2, **{f'w{i}': i + 3 for i in range(997)}}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token='<unk>'))
    backend.save(str(tmp_path / 'tokenizer.json'))
    config = config_lib.load_config('configs/unimoe_tiny.py:mode=test')
    config.stage_order = 's0_llm'
    config.data.data_dir = str(tmp_path / 'absent')
    typed = experiment.from_config_dict(config)
    builtin_vocab = accounting._tokenizer(typed).vocab_size
    builtin_llm = accounting.account_stages(typed)[0].params_by_component['llm']
    config.tokenizer = str(tmp_path / 'tokenizer.json')
    typed = experiment.from_config_dict(config)
    llm = accounting.account_stages(typed)[0].params_by_component['llm']
    # 1000 file tokens + 3 media placeholders, in the embedding and the untied head (dim 96).
    assert llm - builtin_llm == 2 * 96 * (1003 - builtin_vocab)
    assert builtin_vocab < 1003


def test_expert_exchange_per_layer_and_step_follow_the_formula(tmp_path):
    from unimoe import config as config_lib

    config = config_lib.load_config('configs/unimoe_tiny.py:mode=test')
    config.data.data_dir = str(tmp_path / 'absent')
    typed = experiment.from_config_dict(config)
    assert accounting.account_expert_exchange(typed) == []  # no mesh, no exchange
    config.mesh = dict(data=2, expert=-1)  # -1: the other 4 of the 8 test devices
    typed = experiment.from_config_dict(config)
    (account,) = accounting.account_expert_exchange(typed)  # s3_moe, the only MoE stage
    stage, llm = config.stages.s3_moe, config.model.llm
    assert account.name == 's3_moe' and account.num_devices == 8
    tokens = stage.batch_size * config.data.seq_len // 8  # tokens split over data x expert
    assert account.local_tokens == tokens
    # Dropless default: C = every local assignment; buffers [4, C, dim] float32 and [4, C] int32.
    rows = 4 * tokens * config.model.moe.top_k
    assert account.per_layer.capacity == tokens * config.model.moe.top_k
    assert account.per_layer.forward == 2 * rows * llm.dim * 4 + 4 * rows
    assert account.per_layer.backward == 2 * rows * llm.dim * 4
    assert account.moe_layers == llm.num_layers  # moe_layers='all'
    assert account.per_step == llm.num_layers * (account.per_layer.forward + rows * llm.dim * 8)
    table = accounting.format_exchange([account])
    assert table.splitlines()[2].startswith('| s3_moe | ')
