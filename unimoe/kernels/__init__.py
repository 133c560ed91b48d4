"""Pallas kernels with pure-XLA references of the same signature (docs/design.md "Kernels"):
`gmm` (grouped matmul and its weight gradient), `routing` (fused router, counts and sort)."""
