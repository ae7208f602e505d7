"""Kept for model cards already pushed, which name `hf_transfer.adapted_model.load_adapted_model`."""

from hf_transfer.adaptation.model import AdaptedClassifier, load_adapted_model

__all__ = ["AdaptedClassifier", "load_adapted_model"]
