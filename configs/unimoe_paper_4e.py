r"""Uni-MoE 4E (speech) at paper scale, assembled from converted pretrained checkpoints.

Convert the three Hugging Face folders once (local copies; nothing is downloaded):

  python -m unimoe.convert from-hf clip-vit-large-patch14-336 ckpt/clip
  python -m unimoe.convert from-hf whisper-small ckpt/whisper --num-queries 50
  python -m unimoe.convert from-hf vicuna-7b-v1.5 ckpt/vicuna

then name them in the config arg:

  --config=configs/unimoe_paper_4e.py:vicuna=ckpt/vicuna,clip=ckpt/clip,whisper=ckpt/whisper

`config.pretrained` maps those labels to the directories; `unimoe.convert.core.pretrained_params`
merges them into one flat source for `unimoe.factory.load_params` (the converted
directories hold exactly the 'llm/', 'vision/' and 'audio/' + 'audio_conn/' parameters of this
model, shape-checked by tests/convert/test_paper_config.py against the published config.json
files). Stage 1 starts from that source; the connectors' own parts (the vision projector, the 50
query embeddings and the speech projection) start new, as in Uni-MoE.

Shapes (the Uni-MoE paper and its release, github.com/HITsz-TMG/Uni-MoE): Vicuna-7B (4096 wide, 32 layers, 32 heads, FFN
11008, vocab 32000), CLIP ViT-L/14-336 (576 patch tokens of hidden_states[-2]), Whisper-small
encoder (3000 mel frames of 80 bins) and decoder as the speech connector (50 queries), experts on
every layer, top-2 of 4 with the softmax over the top-k logits, LoRA r8 / alpha 16 / dropout 0.05.
Stage 3: lr 4e-5, global batch 8, cosine, warmup 3%, weight decay 0, balance loss 0.01 (8E's
value; the 4E code has none). Uni-MoE released only stage-3 scripts, so the stage-1/2 learning
rates and every stage's step count here are this project's choices, to be set per data mixture.

`tokenizer=PATH` (Vicuna's `tokenizer.model`) gives the model Vicuna's vocabulary plus the three
media placeholders; `--dry_run` then accounts the paper model exactly. To train, prepare
Uni-MoE's JSON files with `unimoe.data.json_builder.prepare`, set `config.json_data` and give each
stage `json_sources` (the trainer refuses a pretrained tokenizer on built-in-data stages); the
stages below still name the built-in tasks, and the paper's data mixtures are issue 8's configs.
"""

import os

import ml_collections

from unimoe import compilation_cache, config as config_lib
from unimoe.data import tasks as tasks_lib
from unimoe.moe.config import MoEConfig

ALL_TASKS = tasks_lib.INSTRUCTION_TASKS + tasks_lib.ALIGNMENT_TASKS


def stage(**kwargs) -> ml_collections.ConfigDict:
    """Paper-scale defaults: instruction data, global batch 8, warmup 3% (Uni-MoE's scripts)."""
    return config_lib.stage(**{'batch_size': 8, 'warmup_fraction': 0.03, **kwargs})


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = config_lib.parse_arg(arg, vicuna='', clip='', whisper='', tokenizer='')

    c = ml_collections.ConfigDict()
    c.seed = 0
    c.pretrained = dict(llm=arg.vicuna, vision=arg.clip, audio=arg.whisper)
    # Vicuna's tokenizer.model (or tokenizer.json): sets the LM's vocabulary (32000 + the 3 media
    # placeholders, whose embedding rows start new when the converted LM is loaded).
    c.tokenizer = arg.tokenizer
    c.data = dict(
        data_dir=os.environ.get('UNIMOE_DATA_DIR', os.path.join('.cache', 'unimoe_data')),
        builder_config='tiny',
        seq_len=2048,
        batch_size=8,
        image_size=336,
        num_frames=8,
        audio_frames=3000,
        num_mel_bins=80,
        n_image_tokens=576,
        n_video_tokens=576,
        n_audio_tokens=50,
        skip_too_long=False,
        seed=0,
    )
    c.model = dict(
        llm=dict(
            dim=4096,
            num_layers=32,
            num_heads=32,
            num_kv_heads=32,
            ffn_dim=11008,
            rope_theta=10000.0,
            norm_eps=1e-5,
            dtype='bfloat16',
            # One compiled block for the 32 layers, each recomputed in the backward pass from its
            # input (unimoe/models/layer_stack.py; the memory plan: docs/design.md).
            scan_layers=True,
            remat='full',
        ),
        vision=dict(
            image_size=336,
            patch_size=14,
            width=1024,
            depth=24,
            num_heads=16,
            mlp_dim=4096,
            select_layer=-2,
        ),
        audio=dict(
            num_mel_bins=80, max_frames=3000, width=768, depth=12, num_heads=12, mlp_dim=3072
        ),
        audio_conn=dict(num_queries=50, width=768, depth=12, num_heads=12, mlp_dim=3072),
        moe_layers='all',
        # Every MoEConfig field, so each can be set: --config.model.moe.kernel_impl=ragged_dot.
        moe=config_lib.declared(
            MoEConfig(num_experts=len(tasks_lib.EXPERT_MODALITIES), top_k=2, router='topk_softmax')
        ),
        lora=dict(alpha=16.0, dropout=0.05),
    )

    c.stage_order = ','.join(
        ['s1_align'] + [f's2_{m}' for m in tasks_lib.EXPERT_MODALITIES] + ['s3_moe']
    )
    c.stages = ml_collections.ConfigDict()
    c.stages.s1_align = stage(
        trains='connectors', tasks=tasks_lib.ALIGNMENT_TASKS, steps=10_000, learning_rate=1e-3
    )
    for m in tasks_lib.EXPERT_MODALITIES:
        c.stages[f's2_{m}'] = stage(
            trains='ffn+connectors',
            tasks=tasks_lib.EXPERT_TASKS[m],
            steps=10_000,
            learning_rate=2e-5,
            init_from=('s1_align',),
        )
    c.stages.s3_moe = stage(
        trains='lora+router+connectors',
        tasks=ALL_TASKS,
        steps=20_000,
        learning_rate=4e-5,
        init_from=('s1_align',),
        experts_from=tuple(f's2_{m}' for m in tasks_lib.EXPERT_MODALITIES),
        moe=True,
        lora_rank=8,
        balance_coef=0.01,
        # The frozen LM (experts included) in bf16, as its matmuls read it: half the memory.
        frozen_in_compute_dtype=True,
    )
    c.eval = dict(
        stages=','.join([f's2_{m}' for m in tasks_lib.EXPERT_MODALITIES] + ['s3_moe']),
        tasks='text_qa,image_qa,video_qa,speech_qa,audio_qa,image_speech_qa',
        batch_size=8,
        max_new_tokens=64,
    )
    # Sharding (README "Scaling out"): data-parallel over every device unless overridden, e.g.
    # --config.mesh.expert=4; several hosts: --config.distributed.auto=True on a TPU pod.
    c.mesh = dict(data=-1, fsdp=1, expert=1, tensor=1)
    c.distributed = dict(auto=False, coordinator_address='', num_processes=1)
    c.log_every = 50
    c.checkpoint_every = 1000
    # True: go on in a workdir whose trained stages had another config (docs/design.md).
    c.allow_changed_config = False
    # Compiled programs kept for the next run (docs/design.md, "Compilation cache"); '': off.
    c.compilation_cache_dir = compilation_cache.default_dir()
    return c
