r"""Uni-MoE's progressive recipe at tiny scale, on the built-in offline multimodal dataset.

Launch (this is what `make demo` runs):

  python -m unimoe.main --config=configs/unimoe_tiny.py --workdir=runs/demo

Arms (`--config=configs/unimoe_tiny.py:mode=test`): `mode=demo` (default) is the full tiny
experiment; `mode=test` shrinks data, steps and eval to what the end-to-end test needs.

Stages: s0 pretrains stand-ins for the pretrained LM / CLIP / Whisper that cannot be downloaded;
s1 aligns the connectors on caption pairs; s2 trains one dense model's FFNs per modality; s3
upcycles the four s2 FFNs into 4 experts per layer (Uni-MoE 4E: top-2, softmax over the top-k
logits) and trains LoRA + routers + connectors on all instruction data with the balance loss.

Measured (`make demo` on a clean checkout with the venv installed, dataset generated from scratch,
the project's 2-core CPU machine, no accelerator, 2026-11-24): 11 min 11 s wall in all; dataset
generation about 40 s; stage seconds s0_llm 40, s0_vision 17, s0_audio 53, s1_align 60,
s2_image 39, s2_video 37, s2_speech 72, s2_audio 69, s3_moe 200; start-up and evaluation of the
five models about 30 s.

Exact-match accuracy (%) on the held-out split (60 questions per task):

| model | text_qa | image_qa | video_qa | speech_qa | audio_qa | image_speech_qa |
|---|---:|---:|---:|---:|---:|---:|
| s2_image | 16.7 | 53.3 | 50.0 | 11.7 | 36.7 | 13.3 |
| s2_video | 21.7 | 36.7 | 78.3 | 26.7 | 0.0 | 5.0 |
| s2_speech | 18.3 | 30.0 | 15.0 | 90.0 | 26.7 | 33.3 |
| s2_audio | 18.3 | 6.7 | 0.0 | 0.0 | 98.3 | 0.0 |
| s3_moe | 31.7 | 55.0 | 71.7 | 96.7 | 88.3 | 46.7 |
| chance | 12.5 | 27.8 | 33.3 | 20.4 | 37.5 | 27.8 |

Each stage-2 model is good at its own modality only; the stage-3 MoE built from all four answers
every modality above chance. (Re-run after the MoE library landed, issue 3: 10 min 23 s with the
dataset already generated; the stage-2 rows are bit-identical, stage 3 as shown. Its expert load
per layer stays within 0.22-0.29 of the assignments. Re-run again after the fused tile SwiGLU,
blocked attention and huge pages, dataset cached, machine otherwise idle: 8 min 04 s, experiment
472 s; stage-2 rows bit-identical again, s3_moe 28.3 / 51.7 / 73.3 / 95.0 / 90.0 / 46.7, the
fused expert kernel sums in another order. After generation moved to the KV cache and the
trainer gained the non-finite guard and RNG-state checkpoints (issues 8, 10), on a clean clone
with the venv installed: 9 min 19 s, experiment 553 s; stage-2 rows bit-identical, s3_moe
30.0 / 51.7 / 71.7 / 96.7 / 88.3 / 45.0, a question or two per task from the previous run.
After `Linear` switched to 2-D matmuls (another summation order), clean clone, venv installed,
machine partly shared: 10 min 57 s, experiment 649 s. Every row moves by at most four questions
of 60: s2_image 15.0 / 53.3 / 48.3 / 11.7 / 35.0 / 11.7, s2_speech 31.7 on image_qa, s2_audio
5.0 on image_qa, s3_moe 25.0 / 51.7 / 75.0 / 95.0 / 88.3 / 51.7. After the chunked tile SwiGLU,
clean clone, venv installed: every row identical to that run; 13 min 46 s, experiment 819 s, on a
slower spell of the VM: every stage took 14-45% longer, the non-MoE s0 stages included. After
the dispatch moved into the expert loop (`gmm.gathered_swiglu`; the per-token sum now runs in
expert order), clean clone, venv installed: 11 min 39 s, experiment 689 s, s3_moe stage 207 s;
stage-2 rows identical, s3_moe 23.3 / 51.7 / 75.0 / 96.7 / 90.0 / 51.7, at most one question per
task from the previous run. After weight gradients moved to a materialised x.T (`lora.matmul`:
another summation order in every `Linear`'s d_w) and a lone leftover tile joined the last
chunk, clean clone, venv installed: 9 min 37 s, experiment 571 s (s2_speech 70 s, s3_moe 178 s).
s2_video and s2_speech identical; s2_image 13.3 / 53.3 / 46.7 / 11.7 / 33.3 / 11.7, s2_audio 3.3
on image_qa, s3_moe 30.0 / 51.7 / 76.7 / 96.7 / 90.0 / 48.3: at most four questions of 60 per
task from the previous run. After the written-out attention backward (`llm.masked_attention`),
clean clone, venv installed, on a slower day of the VM: 11 min 50 s, experiment 702 s (s2_speech
76 s, s3_moe 225 s); s2_image, s2_video and s2_audio identical, s2_speech 31.7 on image_qa,
s3_moe 25.0 / 51.7 / 75.0 / 98.3 / 90.0 / 48.3: at most three questions of 60 per task. With the
locked environment (`requirements/lock.txt`, 2026-12-06), fresh clone, the runtime-only venv built
by `make demo`, dataset generated: 9 min 46 s in all, experiment 542 s; every stage-2 row equal to
the table above, s3_moe 25.0 / 53.3 / 71.7 / 96.7 / 90.0 / 46.7: at most four questions of 60 per
task from the previous run.)
"""

import os

import ml_collections

from unimoe import config as config_lib
from unimoe.data import tasks as tasks_lib


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
        skip_too_long=False,
        worker_count=0,  # grain processes preparing batches ahead (0: in the training process)
        seed=0,
    )

    c.model = dict(
        llm=dict(dim=96, num_layers=3, num_heads=4, num_kv_heads=2, ffn_dim=192),
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
        moe_layers='all',
        moe=dict(num_experts=len(tasks_lib.EXPERT_MODALITIES), top_k=2, router='topk_softmax'),
        lora=dict(alpha=16.0, dropout=0.05),
    )

    all_tasks = tasks_lib.INSTRUCTION_TASKS + tasks_lib.ALIGNMENT_TASKS
    c.stage_order = ','.join(
        ['s0_llm', 's0_vision', 's0_audio', 's1_align']
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
        tasks=('speech_transcript', 'audio_caption', 'speech_qa', 'audio_qa'),
        steps=steps(200),
        learning_rate=2e-3,
    )
    c.stages.s1_align = config_lib.stage(
        trains='connectors',
        mode='chat',
        tasks=tasks_lib.ALIGNMENT_TASKS,
        steps=steps(200),
        learning_rate=2e-3,
        init_from=('s0_llm', 's0_vision', 's0_audio'),
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
    return c
