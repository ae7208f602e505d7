"""Kept for model cards already pushed, which name `hf_transfer.multimodal.load_two_tower`."""

from hf_transfer.sources.two_tower import ConcatFusion, GatedFusion, TwoTowerClassifier
from hf_transfer.tasks.multimodal import load_two_tower

__all__ = ["ConcatFusion", "GatedFusion", "TwoTowerClassifier", "load_two_tower"]
