"""Base layers under both `models` and `moe`: Linear with LoRA, normalisation."""
