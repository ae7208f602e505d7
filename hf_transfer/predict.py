"""Kept for model cards already pushed, which name `hf_transfer.predict.load_saved_model`."""

from hf_transfer.inference.loader import load_saved_model
from hf_transfer.inference.predict import Prediction, format_prediction, predict

__all__ = ["Prediction", "format_prediction", "load_saved_model", "predict"]
