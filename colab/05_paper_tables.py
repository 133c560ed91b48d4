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
# # Paper tables: Table 9 at paper scale, and the claims at CPU scale
#
# `experiments/paper/` holds one config per Table 9 row this codebase can train (a `row=`
# argument over `configs/unimoe_paper_4e.py`) and `table.py`, which scores the prediction files
# `python -m unimoe.eval` writes and prints Table 9 in the paper's column order with the paper's
# numbers beside ours. Training those rows needs the converted 7B checkpoints, Uni-MoE's data and
# accelerators; here we look at what each row trains and run the scoring path on the eval
# fixtures. `experiments/tiny/` tests the paper's claims with the tiny recipe: this notebook
# runs two of its arms (the full set is `python -m experiments.tiny.run`) and shows the
# recorded results of all of them.

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

from IPython.display import Image, Markdown, display

from experiments.paper import config as paper_config
from experiments.paper import table as paper_table
from experiments.tiny import config as tiny_config
from experiments.tiny import run as tiny_run
from unimoe import config as config_lib

# %% [markdown]
# ## The Table 9 rows and what their stage 3 trains

# %%
lines = [
    "| row | Table 9 row | experts | sources | balance coef | lr | batch | steps |",
    "|---" * 8 + "|",
]
for name, row in paper_config.ROWS.items():
    config = config_lib.load_config(f"experiments/paper/config.py:row={name}")
    stage = config.stages[row.eval_stage]
    experts = len(stage.experts_from.split(",")) if stage.experts_from else "dense"
    lines.append(
        f"| `{name}` | {row.title} | {experts} | {stage.get('json_sources', '')} | "
        f"{stage.balance_coef} | {stage.learning_rate} | {stage.batch_size} | {stage.steps} |"
    )
display(Markdown("\n".join(lines)))

# %% [markdown]
# ## Scoring, end to end on the fixtures (no model)
#
# The dry run writes prediction files from two labelled non-model predictors (the fixtures' own
# answers, "oracle", and a constant "A") and scores them exactly as model predictions are scored:
# VQA soft accuracy for A-OKVQA, option accuracy for MMBench, and the exact-match proxy for the
# GPT-graded MM-Vet (its header says so).

# %%
table = paper_table.main(["--dry-run", "--output", str(pathlib.Path(WORKDIR) / "paper_dry_run")])
display(Markdown(table))

# %% [markdown]
# ## The claims at CPU scale
#
# Each arm of `experiments/tiny/config.py` replaces the tiny recipe's stage 3 with one ablation;
# stages 0-2 come from the quickstart's run in `WORKDIR`. With `TINY` the arms train a few steps
# (the numbers mean nothing); otherwise every arm runs at the recipe's size (~4 min each on a
# 2-core CPU).

# %%
arms = ["moe4", "dense"] if TINY else list(tiny_config.ARMS)
claims_dir = pathlib.Path(WORKDIR) / "tiny_claims"
summary = tiny_run.run_arms(
    arms, claims_dir, "test" if TINY else "demo", pathlib.Path(WORKDIR), claims_dir
)
display(Markdown(summary))
display(Image(filename=str(claims_dir / "expert_usage.png")))

# %% [markdown]
# The recorded run of every arm at the recipe's size, and which claims it reproduces
# (`experiments/tiny/README.md`):

# %%
readme = pathlib.Path("experiments/tiny/README.md").read_text()
results = readme[readme.index("## Results") :]
display(Markdown("\n".join(line for line in results.splitlines() if not line.startswith("!["))))
display(Image(filename="experiments/tiny/expert_usage.png"))
