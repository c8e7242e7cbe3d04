"""Scoring runs: metrics reports, modality ablation, compare, linear probes, plots."""
