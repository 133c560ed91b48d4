"""Flax NNX model components: the decoder LM, encoders, connectors and LoRA."""
