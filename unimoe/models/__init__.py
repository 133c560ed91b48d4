"""Flax NNX model components: the decoder LM, encoders and connectors."""
