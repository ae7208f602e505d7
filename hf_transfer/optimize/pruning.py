"""Structured pruning that removes work: whole attention heads and FFN neurons of BERT-family layers
(text); channels of a CNN's convolutions (images, optimize/cnn_pruning.py).

torch.nn.utils.prune only masks weights (the matrices keep their size, nothing gets faster) and
transformers 5 dropped `prune_heads`, so the layers are shrunk here by hand: the kept rows of the
query/key/value and intermediate layers, the kept columns of the attention output and FFN output
layers, copied into smaller nn.Linear layers. BERT's attention reshapes by head size, not head count
(`view(..., -1, head_size)`), so a layer with fewer heads runs unchanged.

Importance is weight magnitude, which needs no data: a head scores ||W_value[h]|| * ||W_out[:, h]||
(its value-to-output path carries its whole contribution), an FFN neuron ||W_in[j]|| * ||W_out[:, j]||.
The config keeps the original sizes (BertConfig has one head count and one FFN width for every
layer); the loader rebuilds the shrunken layers from the saved weights' shapes.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from hf_transfer.errors import HfTransferError
from hf_transfer.export.layout import IMAGE, TEXT
from hf_transfer.inference.optimized import require

# model types whose layers are BERT's: encoder.layer[i].attention.self.{query,key,value}, ...
BERT_LAYOUT = ("bert", "roberta", "xlm-roberta", "camembert", "electra")
METHOD = "structured: attention heads and FFN neurons by weight magnitude, removed physically"


def parameter_count(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def _layers(model: nn.Module) -> list[nn.Module]:
    encoder = getattr(model, "base_model", model)  # a classifier's encoder, or a mean-pooled model's
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    layers = getattr(getattr(encoder, "encoder", None), "layer", None)
    if model_type not in BERT_LAYOUT or layers is None:
        raise HfTransferError(
            f"--prune: {type(encoder).__name__} (model type {model_type}) has no BERT-style layers to prune; "
            f"pruning covers the model types {', '.join(BERT_LAYOUT)}. Use --quantize int8 and/or --onnx instead."
        )
    return list(layers)


def _kept_rows(linear: nn.Linear, rows: torch.Tensor) -> nn.Linear:
    smaller = nn.Linear(linear.in_features, len(rows), bias=linear.bias is not None)
    smaller.weight.data = linear.weight.data[rows].clone()
    if linear.bias is not None:
        smaller.bias.data = linear.bias.data[rows].clone()
    return smaller


def _kept_columns(linear: nn.Linear, columns: torch.Tensor) -> nn.Linear:
    smaller = nn.Linear(len(columns), linear.out_features, bias=linear.bias is not None)
    smaller.weight.data = linear.weight.data[:, columns].clone()
    if linear.bias is not None:
        smaller.bias.data = linear.bias.data.clone()
    return smaller


def _keep_count(total: int, ratio: float) -> int:
    return max(1, total - math.floor(total * ratio))  # at least one head / neuron stays


def _prune_heads(layer: nn.Module, head_size: int, ratio: float) -> int:
    attention, output = layer.attention.self, layer.attention.output.dense
    heads = attention.query.out_features // head_size
    value = attention.value.weight.view(heads, head_size, -1)
    out = output.weight.view(output.out_features, heads, head_size)
    scores = value.flatten(1).norm(dim=1) * out.permute(1, 0, 2).flatten(1).norm(dim=1)
    kept = scores.topk(_keep_count(heads, ratio)).indices.sort().values
    rows = (kept[:, None] * head_size + torch.arange(head_size)).flatten()
    for name in ("query", "key", "value"):
        setattr(attention, name, _kept_rows(getattr(attention, name), rows))
    layer.attention.output.dense = _kept_columns(output, rows)
    attention.num_attention_heads, attention.all_head_size = len(kept), len(rows)  # for readers of these fields
    return len(kept)


def _prune_ffn(layer: nn.Module, ratio: float) -> int:
    inner, outer = layer.intermediate.dense, layer.output.dense
    scores = inner.weight.norm(dim=1) * outer.weight.norm(dim=0)
    kept = scores.topk(_keep_count(inner.out_features, ratio)).indices.sort().values
    layer.intermediate.dense = _kept_rows(inner, kept)
    layer.output.dense = _kept_columns(outer, kept)
    return len(kept)


@torch.no_grad()
def prune_transformer(model: nn.Module, ratio: float) -> dict:
    """Remove `ratio` of every layer's attention heads and FFN neurons in place; what was kept, per layer."""
    layers = _layers(model)
    config = model.config
    head_size = config.hidden_size // config.num_attention_heads
    kept = [{"heads": _prune_heads(layer, head_size, ratio), "ffn_neurons": _prune_ffn(layer, ratio)} for layer in layers]
    return {
        "ratio": ratio, "method": METHOD,
        "original": {"heads": config.num_attention_heads, "ffn_neurons": config.intermediate_size},
        "kept_per_layer": kept,
    }


def check_prunable(kind: str) -> None:
    """Refuse, before any work, pruning that cannot run here (an image model without Torch-Pruning)."""
    if kind == IMAGE:
        require("torch_pruning", "--prune on an image model")


def _prune_image(model: nn.Module, ratio: float, batch: dict[str, torch.Tensor]) -> dict:
    from hf_transfer.optimize.cnn_pruning import prune_cnn

    return prune_cnn(model, ratio, batch["pixel_values"])


# the run's kind -> how its model is pruned in place (given a batch for tracing), and what was kept
PRUNERS: dict[str, Callable[[nn.Module, float, dict[str, torch.Tensor]], dict]] = {
    TEXT: lambda model, ratio, _batch: prune_transformer(model, ratio),
    IMAGE: _prune_image,
}


def prune_model(kind: str, model: nn.Module, ratio: float, batch: dict[str, torch.Tensor]) -> dict:
    """Prune `model` in place as its kind is pruned; the parameter counts before and after included."""
    before = parameter_count(model)
    report = PRUNERS[kind](model, ratio, batch)
    return {**report, "parameters_before": before, "parameters_after": parameter_count(model)}
