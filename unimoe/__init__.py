"""unimoe: multimodal Mixture-of-Experts LLMs in JAX/Flax."""
