"""Each domain normalised by its own BatchNorm statistics (adaptation.norm_statistics per_domain).

AdaBN (Li et al. 2016, "Revisiting batch normalization for practical domain adaptation"): a network's
BatchNorm statistics carry much of what differs between domains, so each domain is normalised by its
own: the source by the source's, the target by the target's. With the backbone in the loop, a callback
keeps every layer on its batch's statistics while training and re-estimates the running ones on the
target before each evaluation; with a frozen backbone, each domain's features are extracted under its
own re-estimated statistics (features.py).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader

from hf_transfer.errors import HfTransferError
from hf_transfer.recipe import Recipe
from hf_transfer.training.plan import Callback


def batch_norm_layers(model: nn.Module) -> list[_BatchNorm]:
    return [module for module in model.modules() if isinstance(module, _BatchNorm)]


def per_domain_statistics(recipe: Recipe, model: nn.Module) -> bool:
    """Whether each domain gets its own statistics: per_domain (refused for a model without BatchNorm), or auto
    where a method adapts (method none stays the source-only baseline), the model has BatchNorm layers and
    strategy.norm_statistics does not keep the pretrained ones."""
    setting = recipe.adaptation.norm_statistics
    if setting == "per_domain" and not batch_norm_layers(model):
        raise HfTransferError(
            f"adaptation.norm_statistics per_domain re-estimates BatchNorm statistics, but {recipe.model.name} has no "
            "BatchNorm layer (transformers normalise each example on its own); set it to auto or shared."
        )
    if setting == "auto":
        return (recipe.adaptation.method != "none" and bool(batch_norm_layers(model))
                and recipe.strategy.norm_statistics != "frozen")
    return setting == "per_domain"


class PerDomainNormStatistics(Callback):
    """Per-domain statistics with the backbone in the loop.

    While training, every BatchNorm layer (frozen ones too) reads the statistics of the batch it sees, and
    each pass is one domain's batch, so the source is normalised by the source's statistics, the target by
    the target's. After the epoch's last update, before the evaluation, each layer's running statistics
    are re-estimated over `target` (every unlabelled target example, no augmentation): what the
    evaluation and the saved model use. Training never reads them, so nothing needs to be put back.
    """

    def __init__(self, target: DataLoader):
        self.target = target
        self.layers: list[_BatchNorm] = []

    def on_train_begin(self, loop) -> None:
        self.layers = batch_norm_layers(loop.accelerator.unwrap_model(loop.model))

    def on_batch(self, loop, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # after the loop's set_train_mode, which keeps frozen layers on their pretrained statistics
        for layer in self.layers:
            layer.train()
        return batch

    def on_update(self, loop, end_of_epoch: bool) -> None:
        if end_of_epoch:
            with loop.untimed():
                estimate_statistics(loop.accelerator.unwrap_model(loop.model), self.target, loop.accelerator.device)


@torch.no_grad()
def estimate_statistics(model: nn.Module, loaders: DataLoader | list[DataLoader], device: torch.device) -> None:
    """Every BatchNorm layer's running statistics, re-estimated as the plain average over the loaders' batches."""
    layers = batch_norm_layers(model)
    momenta = [layer.momentum for layer in layers]
    was_training = model.training
    model.eval()
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # a cumulative average: every batch weighs the same
        layer.train()
    # a loader's iterator draws its base seed from torch's global generator: forked, so that a run reading the
    # statistics from the feature store trains exactly as the run that estimated them
    with torch.random.fork_rng(devices=[]):
        for loader in loaders if isinstance(loaders, list) else [loaders]:
            for batch in loader:
                model(**{k: v.to(device) for k, v in batch.items() if k not in ("labels", "label")})
    for layer, momentum in zip(layers, momenta):
        layer.momentum = momentum
    model.train(was_training)


def norm_statistics(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every BatchNorm layer's buffers (running statistics, batch count), by state-dict name: what a frozen run
    saves and the feature store keeps."""
    return {f"{prefix}.{name}" if prefix else name: buffer.detach().cpu().clone()
            for prefix, layer in model.named_modules() if isinstance(layer, _BatchNorm)
            for name, buffer in layer.named_buffers(recurse=False) if buffer is not None}
