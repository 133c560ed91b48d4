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
# # unimoe quickstart: the tiny three-stage Uni-MoE recipe
#
# Trains the built-in recipe (`configs/unimoe_tiny.py`): stand-in encoders and LM (stage 0),
# connector alignment (stage 1), one dense model per modality (stage 2), and the 4-expert MoE
# with LoRA upcycled from them (stage 3); then evaluates and plots the loss curves.
#
# On Colab the setup cell below clones and installs the repository (the first time, it may ask
# for one restart of the runtime). Locally, `make demo` does the same as this notebook at full
# tiny size (~11 min on a 2-core CPU). `TINY = True` runs a few steps per stage (a couple of
# minutes on a CPU runtime); set it to False for the real tiny recipe (same code on a GPU or TPU
# runtime).

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
WORKDIR = "runs/colab_quickstart"

# %%
import json
import pathlib

import matplotlib.pyplot as plt

from unimoe import config as config_lib
from unimoe import run
from unimoe.train import metrics

config = config_lib.load_config("configs/unimoe_tiny.py:mode=" + ("test" if TINY else "demo"))
print("stages:", config.stage_order)

# %% [markdown]
# The config is code (`ml_collections`): change any value before running, e.g.
# `config.stages.s3_moe.steps = 100` or `config.model.moe.top_k = 1`.

# %%
table = run.run_experiment(config, WORKDIR)
print(table)

# %% [markdown]
# Exact-match accuracy per task on the held-out split, for each stage-2 model and the MoE. The
# chance row is what guessing the most frequent answer would get.

# %%
stages = config.stage_order.split(",")
fig, axes = plt.subplots(1, len(stages), figsize=(3 * len(stages), 2.6), sharey=False)
for ax, name in zip(axes, stages):
    rows = metrics.read_metrics(pathlib.Path(WORKDIR) / name)
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows])
    ax.set_title(name, fontsize=9)
    ax.set_xlabel("step")
axes[0].set_ylabel("loss")
fig.tight_layout()
plt.show()

# %%
results = json.loads((pathlib.Path(WORKDIR) / "results.json").read_text())
s3 = results["models"]["s3_moe"]["tasks"]
print({task: round(score["accuracy"], 3) for task, score in s3.items()})
