"""BatchNorm folded into the convolution before it, for passes that only read a frozen backbone.

In evaluation mode a BatchNorm layer is a fixed per-channel scale and shift, so it can be folded into
the weights and bias of the convolution that feeds it (torch's `fuse_conv_bn_eval` does the
arithmetic), leaving one convolution where there were two passes over the activations. On this
CPU a frozen EfficientNet-Lite0 in channels-last computes its features 1.46x faster folded
(benchmarks/BENCHMARKS.md, issue 12). torch.fx's own fusion would find the pairs from the traced
graph, but it matches plain BatchNorm2d only (timm's layers fuse BatchNorm with the activation) and
cannot trace every timm model, so the pairs are found among a module's children instead: a
convolution directly followed by a BatchNorm of its width. That reading of the order of children is
a guess about the forward pass, so the folded copy is used only where it computes the original's
features on the first batch.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

# what the folded copy may differ by, relative to the largest feature: float32 rounding of the folded
# weights is about 1e-5 of it (measured on EfficientNet-Lite0 / ResNet); a wrong pairing is of order 1
TOLERANCE = 1e-3


def _after_norm(norm: nn.BatchNorm2d) -> nn.Module:
    """What a BatchNorm layer does after normalising: timm's BatchNormAct2d applies its dropout and activation."""
    rest = [module for module in (getattr(norm, "drop", None), getattr(norm, "act", None)) if module is not None]
    return nn.Sequential(*rest) if rest else nn.Identity()


def _neighbours(parent: nn.Module) -> list[tuple[tuple[str, nn.Module], tuple[str, nn.Module]]]:
    children = list(parent.named_children())
    return list(zip(children, children[1:]))


def fold_batch_norms(model: nn.Module) -> nn.Module | None:
    """A copy of `model` in evaluation mode with every BatchNorm that directly follows a convolution of its
    width (in the order of a module's children) folded into it; None where there is no such pair."""
    pairs = [(parent, conv_name, norm_name)
             for parent in model.modules()
             for (conv_name, conv), (norm_name, norm) in _neighbours(parent)
             if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d)
             and norm.track_running_stats and norm.num_features == conv.out_channels]
    if not pairs:
        return None
    paths = {id(module): name for name, module in model.named_modules()}
    folded = copy.deepcopy(model).eval()
    for parent, conv_name, norm_name in pairs:
        target = folded.get_submodule(paths[id(parent)])
        norm = getattr(target, norm_name)
        setattr(target, conv_name, fuse_conv_bn_eval(getattr(target, conv_name), norm))
        setattr(target, norm_name, _after_norm(norm))
    return folded


@torch.no_grad()
def folded_if_same(model: nn.Module, compute: str, inputs: dict[str, torch.Tensor]) -> nn.Module:
    """`model`'s folded copy where its method `compute` gives the same output on the first two examples of
    `inputs` (in float32), else `model`."""
    folded = fold_batch_norms(model)
    if folded is None:
        return model
    inputs = {name: value[:2] for name, value in inputs.items()}
    expected = getattr(model.eval(), compute)(**inputs).float()
    got = getattr(folded, compute)(**inputs).float()
    scale = expected.abs().max().clamp_min(1e-6)
    return folded if bool(((got - expected).abs().max() <= TOLERANCE * scale)) else model
