"""Training: optimizer, checkpoints, metrics, train state and step, stages."""
