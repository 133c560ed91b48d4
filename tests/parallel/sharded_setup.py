"""The tiny model, batches and train state shared by the sharding tests and the multi-process
worker (4 experts so that expert axes of 2 and 4 divide them)."""

import jax
import numpy as np
from flax import nnx

from tests.tiny_model import TOKEN_IDS, model_dict, random_module
from unimoe import checkpoint, factory
from unimoe.models.unimoe import ModelSpec, UniMoE, UniMoEConfig
from unimoe.train import optim, step as step_lib

# Everything but the probe heads trains, so gradients flow through every kind of sharded weight.
TRAINS = 'llm+vision+audio+connectors'
OPTIM = optim.OptimConfig(learning_rate=1e-3, total_steps=4)
LOSS = step_lib.LossConfig(kind='chat', balance_coef=0.01, z_coef=0.001)
BATCH, SEQ = 8, 16


def tiny_config() -> UniMoEConfig:
    md = model_dict()
    md.moe = dict(num_experts=4, top_k=2, router='topk_softmax')
    return UniMoEConfig.for_stage(
        ModelSpec.from_dict(md),
        vocab_size=41, token_ids=TOKEN_IDS, num_labels=(5, 7), moe=True, lora_rank=2
    )


def make_batch(seed: int = 0, image: bool = True) -> dict[str, np.ndarray]:
    """8 rows: 9 image placeholders (the ViT's patches) then text, some rows right-padded.

    `image=False`: no image, so the ViT is not in the program (faster to compile); the
    placeholders are then plain token embeddings."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(6, 41, size=(BATCH, SEQ)).astype(np.int32)
    tokens[:, :9] = TOKEN_IDS['image_token_id']
    attn_mask = np.ones((BATCH, SEQ), bool)
    attn_mask[seed % 3 :: 3, 13:] = False
    batch = {
        'tokens': tokens,
        'attn_mask': attn_mask,
        'loss_mask': (attn_mask & (np.arange(SEQ) >= 9)).astype(np.float32),
        'image': rng.normal(size=(BATCH, 12, 12, 3)).astype(np.float32),
    }
    if not image:
        del batch['image']
    return batch


def initial_state() -> tuple[nnx.GraphDef, tuple]:
    """(graphdef, (trainable, opt_state, rest)) on the host, the same in every process."""
    model = random_module(lambda: UniMoE(tiny_config(), rngs=nnx.Rngs(0)), scale=0.1)
    graphdef, trainable, rest = nnx.split(model, factory.trainable_filter(TRAINS), ...)
    opt_state = optim.make_optimizer(OPTIM).init(trainable)
    return graphdef, jax.device_get((trainable, opt_state, rest))


def flat_params(trainable) -> dict[str, np.ndarray]:
    return {checkpoint.path_str(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(trainable)}
