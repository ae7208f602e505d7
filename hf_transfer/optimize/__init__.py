"""`hf-transfer optimize`: a finished run's model made smaller and faster for inference (prune, int8, ONNX)."""

from hf_transfer.optimize.pipeline import OptimizeRequest, OptimizeResult, optimize_run

__all__ = ["OptimizeRequest", "OptimizeResult", "optimize_run"]
