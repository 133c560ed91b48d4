"""Finished training stages for the converter's tests: written as the trainer leaves them, read
back as a model, and compared with transformers on the exported folder."""

import json
import pathlib

import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import nnx

from unimoe import factory
from unimoe.checkpoint import Checkpointer
from unimoe.data import builtin
from unimoe.experiment import from_config_dict


def write_stage(workdir: pathlib.Path, name: str, model: nnx.Module, defined: list[str]) -> None:
    """Saves `model` as the trainer leaves a finished stage (NAME/checkpoints with DONE.json)."""
    params = nnx.state(model, nnx.Param).to_pure_dict()
    with Checkpointer(workdir / name / "checkpoints", async_save=False) as ckpt:
        ckpt.save(3, {"params": params}, force=True)
        ckpt.mark_done({"final_step": 3, "defined_params": sorted(defined)})


def stage_model(workdir: pathlib.Path, name: str):
    """The stage's model with its checkpointed weights (LoRA unmerged), in eval mode."""
    experiment = from_config_dict(json.loads((workdir / "config.json").read_text()))
    tokenizer = builtin.experiment_tokenizer("", experiment.data.data_dir, on_missing="error")
    stage = experiment.stage(name)
    # Shapes only, every parameter from the checkpoint (eager init costs seconds).
    model = factory.build_model(
        experiment.model, tokenizer, moe=stage.moe, lora_rank=stage.lora_rank, seed=0, abstract=True
    )
    params, _ = Checkpointer(workdir / name / "checkpoints").final_params()
    factory.load_params(model, [(name, params)])
    return nnx.view(model, deterministic=True, raise_if_not_found=False)


def logits_diff(model, hf_dir: pathlib.Path) -> float:
    """max |our logits - transformers'| on the real positions of a right-padded batch."""
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        hf_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    rng = np.random.default_rng(0)
    tokens_bt = rng.integers(0, model.llm.cfg.vocab_size, (2, 11)).astype(np.int32)
    mask_bt = np.arange(11)[None, :] < np.array([[11], [7]])
    with torch.no_grad():
        theirs = hf_model(
            input_ids=torch.from_numpy(tokens_bt).long(),
            attention_mask=torch.from_numpy(mask_bt).long(),
        ).logits.numpy()
    ours = np.asarray(model.llm(model.llm.embed_tokens(jnp.asarray(tokens_bt)), mask_bt)[0])
    # Far from uniform, so a 1e-4 agreement is not an artefact of tiny logits.
    assert np.abs(theirs).max() > 1.0
    return float(np.abs(ours[mask_bt] - theirs[mask_bt]).max())
