# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # MoE playground: swap routers and expert kinds by config
#
# One `unimoe.moe.layer.MoELayer` per variant, trained for a few steps on a toy task (tokens
# from four clusters, each cluster's target a different random linear map), then expert load and
# routing entropy per variant. Every variant is a `MoEConfig`: router, top-k / top-P, null and
# shared experts, dispatch. `TINY = True` keeps it to seconds on a CPU runtime.

# %% [markdown]
# **Setup.** On Colab the next cell clones the repository from `REPO_URL` (set the
# `UNIMOE_REPO_URL` environment variable, e.g. `%env UNIMOE_REPO_URL=https://github.com/...`, or
# edit the line), changes into the checkout and installs it with the `notebook` extra, keeping
# the runtime's GPU / TPU JAX (`unimoe/colab.py`). Run from a checkout, it does nothing.

# %%
import os
import subprocess
import sys

REPO_URL = os.environ.get("UNIMOE_REPO_URL", "https://github.com/YOUR_ORG/unimoe.git")
if "google.colab" in sys.modules:
    CHECKOUT = "/content/unimoe"
    if not os.path.isdir(CHECKOUT):
        if "YOUR_ORG" in REPO_URL:
            raise ValueError("set REPO_URL (or %env UNIMOE_REPO_URL=...) to the repository's URL")
        subprocess.run(["git", "clone", "--depth=1", REPO_URL, CHECKOUT], check=True)
    os.chdir(CHECKOUT)  # what %cd does: configs/, experiments/ and runs/ are read from here
    sys.path.insert(0, CHECKOUT)
    from unimoe import colab

    colab.install(CHECKOUT)

# %% tags=["parameters"]
TINY = True

# %%
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
import treescope
from flax import nnx

from unimoe.moe import routing
from unimoe.moe.config import MoEConfig
from unimoe.moe.layer import MoELayer

DIM, FFN, TOKENS = 32, 64, 256 if TINY else 2048
STEPS = 30 if TINY else 300
VARIANTS = {
    "top-2 softmax (Mixtral, Uni-MoE 4E)": MoEConfig(num_experts=8, top_k=2),
    "softmax top-2 renorm (Qwen2-MoE)": MoEConfig(
        num_experts=8, top_k=2, router="softmax_topk", renormalize=True
    ),
    "top-P 0.5 + 1 null (DCMoE)": MoEConfig(
        num_experts=8, router="top_p", top_p=0.5, k_max=4, num_null_experts=1
    ),
    "sigmoid + bias, aux-free (DeepSeek-V3)": MoEConfig(
        num_experts=8, top_k=2, router="sigmoid_bias", bias_update_rate=1e-3
    ),
    "top-2 + 1 shared expert": MoEConfig(num_experts=8, top_k=2, num_shared_experts=1),
    "capacity 1.0, drop by score": MoEConfig(
        num_experts=8, top_k=2, impl="capacity", capacity_factor=1.0, drop_policy="score"
    ),
}

# %%
rng = np.random.default_rng(0)
centers = rng.normal(size=(4, DIM)) * 2
maps = rng.normal(size=(4, DIM, DIM)) / np.sqrt(DIM)
cluster = rng.integers(0, 4, TOKENS)
x = centers[cluster] + rng.normal(size=(TOKENS, DIM))
y = np.einsum("nd,nde->ne", x, maps[cluster])
x_btd, y_btd = (jnp.asarray(a[None], jnp.float32) for a in (x, y))

# %% [markdown]
# The layer's structure, for the first variant (treescope renders the NNX module tree):

# %%
treescope.render_to_text(
    MoELayer(DIM, VARIANTS["top-2 softmax (Mixtral, Uni-MoE 4E)"], ffn_dim=FFN, rngs=nnx.Rngs(0))
)[:1500]


# %%
def train(cfg: MoEConfig):
    layer = MoELayer(DIM, cfg, ffn_dim=FFN, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(layer, optax.adam(3e-3), wrt=nnx.Param)

    @nnx.jit
    def step(layer, optimizer):
        def loss_fn(layer):
            out, aux = layer(x_btd)
            return jnp.mean((out - y_btd) ** 2) + 0.01 * aux.balance_loss, aux

        (loss, aux), grads = nnx.value_and_grad(loss_fn, has_aux=True)(layer)
        optimizer.update(layer, grads)
        if cfg.router == "sigmoid_bias":  # outside the optimizer, from the observed load
            bias = layer.router_bias
            bias.set_value(
                routing.bias_update(bias.get_value(), aux.expert_load, cfg.bias_update_rate)
            )
        return loss, aux

    history = [step(layer, optimizer) for _ in range(STEPS)]
    return [float(loss) for loss, _ in history], history[-1][1]


runs = {name: train(cfg) for name, cfg in VARIANTS.items()}
for name, (losses, aux) in runs.items():
    print(
        f"{name:40s} loss {losses[0]:.3f} -> {losses[-1]:.3f}  "
        f"experts/token {float(aux.experts_per_token):.2f}  "
        f"entropy {float(aux.router_entropy):.2f}  dropped {float(aux.dropped_fraction):.2f}"
    )

# %%
fig, (ax_loss, ax_load) = plt.subplots(1, 2, figsize=(12, 3.5))
for name, (losses, aux) in runs.items():
    ax_loss.plot(losses, label=name)
    ax_load.plot(np.asarray(aux.expert_load), marker="o", label=name)
ax_loss.set(xlabel="step", ylabel="loss", yscale="log", title="training loss")
ax_load.set(xlabel="expert", ylabel="share of routed assignments", title="expert load (last step)")
ax_load.axhline(1 / 8, color="gray", linestyle=":")
ax_loss.legend(fontsize=7)
fig.tight_layout()
plt.show()
