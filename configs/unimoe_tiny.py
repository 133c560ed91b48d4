r"""Uni-MoE's progressive recipe at tiny scale, on the built-in offline multimodal dataset.

Launch (this is what `make demo` runs):

  python -m unimoe.main --config=configs/unimoe_tiny.py --workdir=runs/demo

Arms (`--config=configs/unimoe_tiny.py:mode=test`): `mode=demo` (default) is the full tiny
experiment; `mode=test` shrinks data, steps and eval to what the end-to-end test needs. Stages:
docs/design.md, "Scale of the built-in experiment". Wall time and held-out accuracy of every
`make demo` run (last: 7 min 31 s with the sound tower, 2026-12-07, 2-core CPU):
benchmarks/HISTORY.md.
"""

import os

import ml_collections

from unimoe import compilation_cache, config as config_lib
from unimoe.data import tasks as tasks_lib
from unimoe.moe.config import MoEConfig


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = config_lib.parse_arg(arg, mode='demo')
    if arg.mode not in ('demo', 'test'):
        raise ValueError(f"mode={arg.mode!r}: expected 'demo' or 'test'")
    test = arg.mode == 'test'

    def steps(demo: int, test_steps: int = 4) -> int:
        return test_steps if test else demo

    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data = dict(
        data_dir=os.environ.get('UNIMOE_DATA_DIR', os.path.join('.cache', 'unimoe_data')),
        builder_config='test' if test else 'tiny',
        seq_len=80,
        batch_size=32,
        image_size=32,
        num_frames=4 if test else 8,
        audio_frames=300,
        num_mel_bins=32,
        n_image_tokens=16,
        n_video_tokens=16,
        n_audio_tokens=8,
        # Uni-MoE-audio's tower for non-speech audio: the sound tasks' clips go to BEATs +
        # Q-Former (one 3-s chunk of 32 Kaldi bins each), speech stays on Whisper.
        sound_tasks=('audio_caption', 'audio_qa'),
        n_sound_tokens=8,
        skip_too_long=False,
        worker_count=0,  # grain processes preparing batches ahead (0: in the training process)
        seed=0,
    )

    c.model = dict(
        # scan_layers: layers stacked and scanned (one compiled block); remat: what the backward
        # recomputes (unimoe/models/layer_stack.py). Unrolled and kept at this size.
        llm=dict(
            dim=96, num_layers=3, num_heads=4, num_kv_heads=2, ffn_dim=192, scan_layers=False,
            remat='none',
        ),
        vision=dict(
            image_size=32,
            patch_size=8,
            width=64,
            depth=3,
            num_heads=4,
            mlp_dim=128,
            select_layer=-2,
        ),
        audio=dict(num_mel_bins=32, max_frames=300, width=64, depth=2, num_heads=4, mlp_dim=128),
        audio_conn=dict(num_queries=8, width=64, depth=1, num_heads=4, mlp_dim=128),
        # A tiny BEATs stand-in (BEATs_iter3+'s switches: deep norm, gated relative positions),
        # 36 tokens per chunk, and a 2-layer Q-Former cross-attending on layer 0.
        sound=dict(
            input_patch_size=16, embed_dim=32, encoder_layers=2, encoder_embed_dim=64,
            encoder_ffn_embed_dim=128, encoder_attention_heads=4, conv_pos=16, conv_pos_groups=4,
            relative_position_embedding=True, num_buckets=32, max_distance=64, gru_rel_pos=True,
            deep_norm=True, num_mel_bins=32,
        ),
        sound_conn=dict(
            num_queries=8, width=64, depth=2, num_heads=4, mlp_dim=128, dropout_rate=0.1,
            attention_dropout_rate=0.1,
        ),
        moe_layers='all',
        # Every MoEConfig field, so each can be set: --config.model.moe.kernel_impl=ragged_dot.
        moe=config_lib.declared(
            MoEConfig(num_experts=len(tasks_lib.EXPERT_MODALITIES), top_k=2, router='topk_softmax')
        ),
        lora=dict(alpha=16.0, dropout=0.05),
    )

    all_tasks = tasks_lib.INSTRUCTION_TASKS + tasks_lib.ALIGNMENT_TASKS
    c.stage_order = ','.join(
        ['s0_llm', 's0_vision', 's0_audio', 's0_sound', 's1_align']
        + [f's2_{m}' for m in tasks_lib.EXPERT_MODALITIES]
        + ['s3_moe']
    )
    c.stages = ml_collections.ConfigDict()
    c.stages.s0_llm = config_lib.stage(
        trains='llm', mode='lm_text', tasks=all_tasks, steps=steps(200), learning_rate=3e-3
    )
    c.stages.s0_vision = config_lib.stage(
        trains='vision',
        mode='classify_image',
        tasks=('image_qa', 'image_caption'),
        steps=steps(300),
        learning_rate=2e-3,
    )
    c.stages.s0_audio = config_lib.stage(
        trains='audio',
        mode='classify_audio',
        tasks=('speech_transcript', 'speech_qa'),
        steps=steps(200),
        learning_rate=2e-3,
    )
    c.stages.s0_sound = config_lib.stage(
        trains='sound',
        mode='classify_sound',
        tasks=('audio_caption', 'audio_qa'),
        steps=steps(200),
        learning_rate=2e-3,
    )
    c.stages.s1_align = config_lib.stage(
        trains='connectors',
        mode='chat',
        tasks=tasks_lib.ALIGNMENT_TASKS,
        steps=steps(200),
        learning_rate=2e-3,
        init_from=('s0_llm', 's0_vision', 's0_audio', 's0_sound'),
    )
    for m in tasks_lib.EXPERT_MODALITIES:
        c.stages[f's2_{m}'] = config_lib.stage(
            trains='ffn+connectors',
            mode='chat',
            tasks=tasks_lib.EXPERT_TASKS[m],
            steps=steps(250),
            learning_rate=1e-3,
            init_from=('s1_align',),
        )
    c.stages.s3_moe = config_lib.stage(
        trains='lora+router+connectors',
        mode='chat',
        tasks=all_tasks,
        steps=steps(400, test_steps=12),
        learning_rate=1e-3,
        init_from=('s1_align',),
        experts_from=tuple(f's2_{m}' for m in tasks_lib.EXPERT_MODALITIES),
        moe=True,
        lora_rank=8,
        balance_coef=0.01,
        z_coef=0.001,
    )

    c.eval = dict(
        stages=','.join([f's2_{m}' for m in tasks_lib.EXPERT_MODALITIES] + ['s3_moe']),
        tasks=','.join(tasks_lib.INSTRUCTION_TASKS),
        batch_size=64,
        max_new_tokens=4,
    )
    c.log_every = 10 if test else 25
    c.checkpoint_every = 5 if test else 200
    # True: go on in a workdir whose trained stages had another config (docs/design.md).
    c.allow_changed_config = False
    # Compiled programs kept for the next run (docs/design.md, "Compilation cache"); '': off.
    c.compilation_cache_dir = compilation_cache.default_dir()
    return c
