"""Structured pruning of a timm CNN: channels removed physically, with Torch-Pruning (pip torch-pruning).

A channel cannot go from one convolution alone: the batch norm after it, the depthwise convolution
and squeeze-excitation that read it, a residual addition that joins it to another block, all must
lose the same channel. Torch-Pruning traces the model once to find these groups (its dependency
graph), scores each group by the L2 norm of its weights, and removes the lowest `ratio` of every
layer's channels. Checked with torch-pruning 1.6.1 on torch 2.14 with timm's EfficientNet, ResNet
and EfficientNet-Lite. The classifier keeps its outputs (the classes); attention models (ViT) are refused.
"""

from __future__ import annotations

from importlib.metadata import version

import torch
from torch import nn

from hf_transfer.errors import HfTransferError
from hf_transfer.inference.optimized import require

METHOD = "structured: convolution channels by L2 weight magnitude (Torch-Pruning dependency groups), removed physically"


def _check_convolutional(model: nn.Module) -> None:
    attention = sorted({type(m).__name__ for m in model.modules() if "Attention" in type(m).__name__})
    if attention:
        raise HfTransferError(
            f"--prune: {type(model).__name__} has attention layers ({', '.join(attention)}); image pruning covers "
            "convolutional networks (EfficientNet, ResNet, ...). Use --quantize int8 and/or --onnx for this run."
        )


def _channels(model: nn.Module) -> list[int]:
    return [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]


def prune_cnn(model: nn.Module, ratio: float, pixel_values: torch.Tensor) -> dict:
    """Remove `ratio` of the channels of every convolution group in place; what was kept.

    Not under no_grad: Torch-Pruning traces the dependency graph through autograd."""
    require("torch_pruning", "--prune on an image model")
    import torch_pruning

    _check_convolutional(model)
    before = _channels(model)
    pruner = torch_pruning.pruner.MetaPruner(
        model, pixel_values[:1], importance=torch_pruning.importance.MagnitudeImportance(p=2),
        pruning_ratio=ratio, ignored_layers=[model.get_classifier()],
    )
    pruner.step()
    model.eval()
    return {
        "ratio": ratio, "method": METHOD, "library": f"torch-pruning {version('torch-pruning')}",
        "conv_channels": {"before": sum(before), "after": sum(_channels(model))},
    }
