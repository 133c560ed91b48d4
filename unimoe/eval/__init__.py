"""Evaluation: greedy generation, answer scoring, result tables."""
