"""Inference: one loader of a saved run (loader.py), used by predict and evaluate."""
