"""Structured pruning that removes work: whole attention heads and FFN neurons of BERT-family layers
(text); channels of a CNN's convolutions (images, optimize/cnn_pruning.py).

torch.nn.utils.prune only masks weights (the matrices keep their size, nothing gets faster) and
transformers 5 dropped `prune_heads`, so the layers are shrunk here by hand: the kept rows of the
query/key/value and intermediate layers, the kept columns of the attention output and FFN output
layers, copied into smaller nn.Linear layers. BERT's attention reshapes by head size, not head count
(`view(..., -1, head_size)`), so a layer with fewer heads runs unchanged.

Importance is first-order Taylor (Molchanov et al. 2019) on a sample of the run's training split: the
loss change removing a head or neuron would cause, estimated from its weights times their gradients.
Weight norms, which need no data, were tried first: at ratio 0.2 they cost MiniLM 3.2 points of SST-2
dev accuracy where Taylor scores cost none (BENCHMARKS.md, issue 16).
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
from hf_transfer.inference.saved import SavedModel
from hf_transfer.optimize.measure import training_sample

# model types whose layers are BERT's: encoder.layer[i].attention.self.{query,key,value}, ...
BERT_LAYOUT = ("bert", "roberta", "xlm-roberta", "camembert", "electra")
METHOD = ("structured: attention heads and FFN neurons by first-order Taylor importance on training batches, "
          "removed physically")


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


def _rows_times_gradient(linear: nn.Linear) -> torch.Tensor:
    """Per output row, the sum of weight x gradient (bias included): removing the row changes the loss by
    about minus this."""
    product = (linear.weight * linear.weight.grad).sum(dim=1)
    return product + linear.bias * linear.bias.grad if linear.bias is not None else product


def _columns_times_gradient(linear: nn.Linear) -> torch.Tensor:
    """Per input column, the sum of weight x gradient: the same estimate for removing that input."""
    return (linear.weight * linear.weight.grad).sum(dim=0)


def _taylor_contributions(layer: nn.Module, head_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This batch's first-order estimate of the loss change from removing each head and each FFN neuron
    (Molchanov et al. 2019, "Importance Estimation for Neural Network Pruning": the group's sum of weight x
    gradient)."""
    attention = layer.attention.self
    rows = sum(_rows_times_gradient(getattr(attention, name)) for name in ("query", "key", "value"))
    head = (rows + _columns_times_gradient(layer.attention.output.dense)).view(-1, head_size).sum(dim=1)
    neuron = _rows_times_gradient(layer.intermediate.dense) + _columns_times_gradient(layer.output.dense)
    return head, neuron


def _taylor_scores(model: nn.Module, layers: list[nn.Module], head_size: int,
                   batches: list[dict[str, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, (head scores, FFN neuron scores): the absolute first-order loss change of removing each,
    summed over `batches` (labelled training batches), so what the task needs is kept, not what is large."""
    from hf_transfer.training.metrics import split_batch

    model.eval()  # dropout off: the gradients of the model that will be served
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    head_scores, neuron_scores = [0.0] * len(layers), [0.0] * len(layers)
    for batch in batches:
        inputs, labels = split_batch(batch)
        model.zero_grad(set_to_none=False)
        with torch.enable_grad():
            nn.functional.cross_entropy(model(**inputs).logits.float(), labels).backward()
        with torch.no_grad():
            for index, layer in enumerate(layers):
                head, neuron = _taylor_contributions(layer, head_size)
                head_scores[index] = head_scores[index] + head.abs()
                neuron_scores[index] = neuron_scores[index] + neuron.abs()
    model.zero_grad(set_to_none=True)
    return list(zip(head_scores, neuron_scores))


def _prune_heads(layer: nn.Module, head_size: int, ratio: float, scores: torch.Tensor) -> int:
    attention, output = layer.attention.self, layer.attention.output.dense
    heads = attention.query.out_features // head_size
    kept = scores.topk(_keep_count(heads, ratio)).indices.sort().values
    rows = (kept[:, None] * head_size + torch.arange(head_size)).flatten()
    for name in ("query", "key", "value"):
        setattr(attention, name, _kept_rows(getattr(attention, name), rows))
    layer.attention.output.dense = _kept_columns(output, rows)
    attention.num_attention_heads, attention.all_head_size = len(kept), len(rows)  # for readers of these fields
    return len(kept)


def _prune_ffn(layer: nn.Module, ratio: float, scores: torch.Tensor) -> int:
    inner, outer = layer.intermediate.dense, layer.output.dense
    kept = scores.topk(_keep_count(inner.out_features, ratio)).indices.sort().values
    layer.intermediate.dense = _kept_rows(inner, kept)
    layer.output.dense = _kept_columns(outer, kept)
    return len(kept)


def prune_transformer(model: nn.Module, ratio: float, batches: list[dict[str, torch.Tensor]]) -> dict:
    """Remove `ratio` of every layer's attention heads and FFN neurons in place, the least important by
    first-order Taylor scores on labelled training `batches`; what was kept, per layer."""
    layers = _layers(model)
    config = model.config
    head_size = config.hidden_size // config.num_attention_heads
    scores = _taylor_scores(model, layers, head_size, batches)
    with torch.no_grad():
        kept = [{"heads": _prune_heads(layer, head_size, ratio, head_scores),
                 "ffn_neurons": _prune_ffn(layer, ratio, ffn_scores)}
                for layer, (head_scores, ffn_scores) in zip(layers, scores)]
    return {
        "ratio": ratio, "method": METHOD, "scored_on": f"{sum(len(b['labels']) for b in batches)} training examples",
        "original": {"heads": config.num_attention_heads, "ffn_neurons": config.intermediate_size},
        "kept_per_layer": kept,
    }


def check_prunable(kind: str) -> None:
    """Refuse, before any work, pruning that cannot run here (an image model without Torch-Pruning)."""
    if kind == IMAGE:
        require("torch_pruning", "--prune on an image model")


# how many training examples score a transformer's heads and neurons: on the SST-2 sample, 256 took a few
# seconds and kept 86.2% of dev at ratio 0.2 (85.7% before pruning; weight norms: 82.5%); BENCHMARKS.md, issue 16
TAYLOR_EXAMPLES = 256


def _prune_text(model: nn.Module, ratio: float, saved: SavedModel) -> dict:
    return prune_transformer(model, ratio, training_sample(saved, TAYLOR_EXAMPLES))


def _prune_image(model: nn.Module, ratio: float, saved: SavedModel) -> dict:
    from hf_transfer.optimize.cnn_pruning import prune_cnn

    return prune_cnn(model, ratio, training_sample(saved, 1, batch_size=1)[0]["pixel_values"])  # traced on one image


# the run's kind -> how its model is pruned in place (with the run's data at hand), and what was kept
PRUNERS: dict[str, Callable[[nn.Module, float, SavedModel], dict]] = {TEXT: _prune_text, IMAGE: _prune_image}


def prune_model(kind: str, model: nn.Module, ratio: float, saved: SavedModel) -> dict:
    """Prune `model` in place as its kind is pruned; the parameter counts before and after included."""
    before = parameter_count(model)
    report = PRUNERS[kind](model, ratio, saved)
    return {**report, "parameters_before": before, "parameters_after": parameter_count(model)}
