"""Hugging Face <-> unimoe weight conversion, parity checks and dense -> MoE upcycling."""
