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
# # Inference: ask the MoE about an image, a spoken question, an audio clip
#
# Loads the stage-3 MoE of the tiny recipe (trained by the quickstart notebook when `WORKDIR` is
# the same; trained here otherwise) and answers held-out questions with greedy decoding, then a
# question of your own about one of the images.
#
# Real weights: convert CLIP / Whisper / Vicuna folders with `python -m unimoe.convert from-hf`
# and name them in `configs/unimoe_paper_4e.py` (see its docstring); `python -m unimoe.convert
# parity DIR` checks a conversion against `transformers` first.

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
from unimoe.data import conversation, pipeline
from unimoe.eval import evaluate

config = config_lib.load_config("configs/unimoe_tiny.py:mode=" + ("test" if TINY else "demo"))
run.run_experiment(config, WORKDIR)  # finished stages are skipped
typed = experiment.from_config_dict(config)  # the config's sections as typed dataclasses
tokenizer = run.prepare_data(typed)
model = evaluate.load_finished_stage(typed, "s3_moe", pathlib.Path(WORKDIR), tokenizer)

# %%
TASKS = ["image_qa", "speech_qa", "audio_qa", "image_speech_qa"]
examples = pipeline.load_eval_examples(typed.data, tokenizer, TASKS)
picked = [next(ex for ex in examples if ex["task"] == task) for task in TASKS]
records = evaluate.predict(
    model, picked, tokenizer, batch_size=len(picked), max_new_tokens=8, desc="ask"
)

fig, axes = plt.subplots(1, len(picked), figsize=(4 * len(picked), 3.2))
for ax, example, record in zip(axes, picked, records):
    question = tokenizer.decode(example["tokens"][: example["prompt_len"]]).split("USER:")[-1]
    if example["modality"] in ("image", "image_speech"):
        ax.imshow(np.clip(example["image"], 0, 1))
    else:
        ax.imshow(example["audio_mel"].T, origin="lower", aspect="auto")
        ax.set_ylabel("mel bin")
    title = f"{example['task']}\nQ:{question.replace('ASSISTANT:', '').strip()[:40]}"
    ax.set_title(
        f"{title}\nmodel: {record['prediction']!r} (truth {record['answer']!r})", fontsize=8
    )
    ax.set_xticks([])
plt.tight_layout()
plt.show()

# %% [markdown]
# Your own question about the first image: the `<image>` tag marks where the image goes, and the
# Vicuna v1 template wraps the turn as the model was trained.

# %%
QUESTION = "<image>\nWhat color is the shape?"
prompt = conversation.build_prompt(
    [{"from": "human", "value": QUESTION}],
    tokenizer,
    n_image_tokens=typed.data.n_image_tokens,
    n_video_tokens=typed.data.n_video_tokens,
    n_audio_tokens=typed.data.n_audio_tokens,
)
own = dict(picked[0])
own["tokens"] = np.full_like(own["tokens"], tokenizer.pad_id)
own["tokens"][: len(prompt)] = prompt
own["attn_mask"] = own["tokens"] != tokenizer.pad_id
own["prompt_len"] = np.int32(len(prompt))
answer = evaluate.predict(model, [own], tokenizer, batch_size=1, max_new_tokens=8, desc="own")
print(QUESTION.replace("<image>\n", ""), "->", answer[0]["prediction"])
