"""Mixture-of-Experts FFN: routing, expert banks, dispatch and the MoE layer."""
