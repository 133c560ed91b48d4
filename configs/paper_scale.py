r"""Uni-MoE 4E / 8E at paper scale with a device mesh: for lowering and memory planning.

  python -m unimoe.train.lower --config=configs/paper_scale.py:experts=8,target=v5p-64

Model: `configs/unimoe_paper_4e.py`'s (Vicuna-7B LM, CLIP ViT-L/14-336, Whisper-small encoder
and connector, experts on every layer, top-2, LoRA r8 on attention and experts) with 4 or 8
experts, Vicuna's 32000-token vocabulary plus the three media placeholders. The stage is
Uni-MoE's stage 3 (LoRA + routers + connectors trained, global batch 8 for 4E and 64 for 8E,
the Uni-MoE paper); training configs with data are experiments/paper.

`config.mesh` is the pod's mesh (`target`), `config.target_device` its device (whose memory
`unimoe.train.lower --compile` plans against, `lower.DEVICE_MEMORY_GIB`):
- v5p-64, v4-64, v5e-32: 32 chips (one JAX device per chip; v5p and v4 name TensorCores, 2 per
  chip): FSDP inside the slice, experts over `expert` (4E: fsdp=8 x expert=4; 8E: fsdp=4 x
  expert=8);
- 8xh100, 8xh200, 8xa100: one host of 8 GPUs (4E: fsdp=2 x expert=4; 8E: expert=8).
`unimoe.train.lower` lowers the same program on 8 simulated CPU devices with the mesh scaled
down to 8 devices (axes kept, sizes halved), and prints the per-device memory on both meshes;
with `--compile` it compiles the planned mesh whole on as many simulated devices.

`size=test` shrinks every width and depth (same code path; what tests/parallel lowers).
"""

import pathlib

import ml_collections

from unimoe import config as config_lib

BASE_CONFIG = pathlib.Path(__file__).resolve().parent / 'unimoe_paper_4e.py'
# target -> (device, devices in the pod).
TARGETS = {
    'v5p-64': ('v5p', 32),
    'v4-64': ('v4', 32),
    'v5e-32': ('v5e', 32),
    '8xh100': ('h100', 8),
    '8xh200': ('h200', 8),
    '8xa100': ('a100', 8),
}
# (devices in the pod, experts) -> the pod's mesh.
POD_MESHES = {
    (32, 4): dict(fsdp=8, expert=4),
    (32, 8): dict(fsdp=4, expert=8),
    (8, 4): dict(fsdp=2, expert=4),
    (8, 8): dict(expert=8),
}
# Vicuna's tokenizer.model (32000) + <image>, <video>, <audio> (`PretrainedTokenizer` appends them).
VOCAB_SIZE = 32003
BATCH_SIZE = {4: 8, 8: 64}
# Gradient accumulation: 8E's 64 sequences as 8 micro-batches of one per GPU (the memory plan:
# experiments/paper/README.md); 4E's 8 fit in one.
MICRO_BATCHES = {4: 1, 8: 8}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = config_lib.parse_arg(arg, experts=4, target='v5p-64', size='paper')
    if arg.target not in TARGETS:
        raise ValueError(f"target={arg.target!r}: expected one of {sorted(TARGETS)}")
    if arg.experts not in BATCH_SIZE:
        raise ValueError(f"experts={arg.experts}: expected one of {sorted(BATCH_SIZE)}")
    if arg.size not in ('paper', 'test'):
        raise ValueError(f"size={arg.size!r}: expected 'paper' or 'test'")
    c = config_lib.load_config(str(BASE_CONFIG))
    c.model.moe.num_experts = arg.experts
    s3 = c.stages.s3_moe
    s3.update(
        init_from='', experts_from='', batch_size=BATCH_SIZE[arg.experts],
        micro_batches=MICRO_BATCHES[arg.experts],
    )  # fmt: skip
    c.stages = ml_collections.ConfigDict({'s3_moe': s3})
    c.stage_order = 's3_moe'
    c.eval.stages = ''
    device, num_devices = TARGETS[arg.target]
    c.mesh = POD_MESHES[(num_devices, arg.experts)]
    # The dense weights over every device (ZeRO-3 style), not only `fsdp`: on 8 GPUs with
    # expert=8 they would otherwise be whole on each (experiments/paper/README.md, memory plan).
    c.sharding_rules = dict(embed=('fsdp', 'expert'))
    c.target_device = device
    c.vocab_size = VOCAB_SIZE
    if arg.size == 'test':
        c.vocab_size = 99
        c.model.llm.update(dim=64, num_layers=2, num_heads=4, num_kv_heads=4, ffn_dim=128)
        c.model.vision.update(image_size=28, patch_size=14, width=32, depth=2, num_heads=2)
        c.model.vision.mlp_dim = 64
        c.model.audio.update(max_frames=40, width=32, depth=1, num_heads=2, mlp_dim=64)
        c.model.audio_conn.update(num_queries=4, width=32, depth=1, num_heads=2, mlp_dim=64)
        c.data.update(seq_len=32, image_size=28, audio_frames=40, n_image_tokens=4)
        c.data.update(n_video_tokens=4, n_audio_tokens=4)
    return c
