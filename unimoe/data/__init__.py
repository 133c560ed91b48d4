"""Data: the built-in synthetic dataset (`media`, `tasks`, `builtin`, `pipeline`) and real Uni-MoE data
(`formats`, `preprocess`, `vicuna`, `json_builder`, `json_pipeline`, `check`)."""
