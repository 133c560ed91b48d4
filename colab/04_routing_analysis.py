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
# # Routing analysis: which experts each modality uses, layer by layer
#
# Uni-MoE's specialization figures show, per MoE layer, how each modality's tokens spread over
# the experts. This notebook trains (or reuses) the tiny recipe's stage-3 MoE, runs it on the
# held-out prompts of every task, and draws one heatmap per layer: rows are modalities, columns
# experts (expert e was initialised from the stage-2 FFN named below it), cells the share of that
# modality's routed assignments. Reuses the quickstart notebook's run when `WORKDIR` is the same.

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
import pathlib

import matplotlib.pyplot as plt
import numpy as np

from unimoe import config as config_lib
from unimoe import experiment, run
from unimoe.data import pipeline
from unimoe.eval import evaluate
from unimoe.eval.routing_analysis import expert_usage_by_layer

config = config_lib.load_config("configs/unimoe_tiny.py:mode=" + ("test" if TINY else "demo"))
run.run_experiment(config, WORKDIR)  # finished stages are skipped

# %%
typed = experiment.from_config_dict(config)  # the config's sections as typed dataclasses
tokenizer = run.prepare_data(typed)
model = evaluate.load_finished_stage(typed, "s3_moe", pathlib.Path(WORKDIR), tokenizer)
examples = pipeline.load_eval_examples(typed.data, tokenizer, list(typed.eval.tasks))
usage = expert_usage_by_layer(model, pipeline.collate(examples, typed.eval.batch_size))
modalities = sorted(usage)
experts = list(typed.stage("s3_moe").experts_from)
print({m: np.round(u.mean(0), 3).tolist() for m, u in usage.items()})

# %%
num_layers = next(iter(usage.values())).shape[0]
fig, axes = plt.subplots(1, num_layers, figsize=(4 * num_layers, 3), squeeze=False)
for layer, ax in enumerate(axes[0]):
    grid = np.stack([usage[m][layer] for m in modalities])
    image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis")
    ax.set_title(f"MoE layer {layer}")
    ax.set_xticks(range(len(experts)), [e.removeprefix("s2_") for e in experts], rotation=45)
    ax.set_yticks(range(len(modalities)), modalities)
    for (row, col), share in np.ndenumerate(grid):
        ax.text(col, row, f"{share:.2f}", ha="center", va="center", fontsize=7, color="w")
fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="share of routed assignments")
plt.show()

# %% [markdown]
# A uniform row (every cell near 1 / experts) means the router mixes the experts for that modality;
# a bright cell under the expert of the same name means the modality went back to the expert that
# was trained on it. At the tiny scale the experts start as modality experts but the router does
# not learn to send modalities to them strongly; see `experiments/` for the longer runs.
