"""What the loop optimises with: parameter groups, optimiser, schedule, class weights, train mode."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from transformers import get_scheduler

from hf_transfer.errors import HfTransferError
from hf_transfer.recipe import TrainingConfig
from hf_transfer.sources.base import TransferModel

if TYPE_CHECKING:  # annotations only
    from hf_transfer.training.plan import Callback


def _block_depths(model: TransferModel) -> dict[str, int]:
    """Backbone parameter name -> how many blocks lie above its own (0 for the top block)."""
    depths = {}
    blocks = model.block_prefixes
    for index, prefixes in enumerate(blocks):
        for name, _ in model.backbone_parameters():
            if name not in depths and any(name.startswith(prefix) for prefix in prefixes):
                depths[name] = len(blocks) - 1 - index
    return depths


def parameter_groups(model: TransferModel, config: TrainingConfig, include_frozen: bool = False) -> list[dict]:
    """Optimiser groups: head and backbone with their learning rates, no decay on biases and norms,
    and with training.layer_decay one backbone group per block, lower blocks at lower rates.

    `include_frozen` adds parameters frozen now but unfrozen later (gradual unfreezing); the
    optimiser skips them while they have no gradient.

    Not timm's `param_groups_weight_decay` / `param_groups_layer_decay`: they need timm's own group
    matchers, while transfer needs the head and the backbone at their own rates for any source (text
    encoders too); the layer rule is timm's (top block: backbone_lr x decay, one factor more per block).
    """
    depths = _block_depths(model) if config.layer_decay else {}
    deepest = max(depths.values(), default=0)
    groups: dict[tuple[str, int, bool], list[torch.nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        if not (parameter.requires_grad or include_frozen):
            continue
        part = "head" if model.is_head_parameter(name) else "backbone"
        # a backbone parameter outside every block counts as the lowest block (the stem)
        depth = -1 if part == "head" or not config.layer_decay else depths.get(name, deepest)
        groups.setdefault((part, depth, parameter.ndim > 1), []).append(parameter)
    lrs = {"head": config.head_lr or config.lr, "backbone": config.backbone_lr or config.lr}
    return [
        {
            "params": params,
            "lr": lrs[part] * (config.layer_decay ** (depth + 1) if depth >= 0 else 1.0),
            "weight_decay": config.weight_decay if decay else 0.0,
            "name": f"{part}{f'_block-{depth}' if depth >= 0 else ''}{'' if decay else '_no_decay'}",
        }
        for (part, depth, decay), params in groups.items()
    ]


def own_rate_key(group: dict) -> str:
    """The key that may give a group of `parameter_groups` a rate of its own (`head_lr` or
    `backbone_lr`); where it is null the group trains at training.lr (times its layer decay)."""
    return "head_lr" if group["name"].startswith("head") else "backbone_lr"


def build_optimizer(
    model: TransferModel, config: TrainingConfig, include_frozen: bool, capturable: bool = False
) -> torch.optim.Optimizer:
    """`capturable`: an optimiser whose step can be recorded in a CUDA graph (see cuda_graphs.py)."""
    groups = parameter_groups(model, config, include_frozen)
    if not groups:
        raise HfTransferError("The strategy left no parameter to train; check strategy.name.")
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)
    optimizer_class = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    # the fused kernel updates every tensor in one pass instead of one op per tensor: on a CUDA
    # device one launch per step, on a CPU about 5x faster than the default (22.6M parameters,
    # MiniLM's shape: 53 ms vs 301 ms per step); it needs every parameter on one kind of device
    devices = {p.device.type for g in groups for p in g["params"]}
    fused = True if devices in ({"cuda"}, {"cpu"}) else None
    return optimizer_class(groups, lr=config.lr, fused=fused, capturable=capturable)


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainingConfig, steps_per_epoch: int):
    """Returns (scheduler, steps per optimiser step?): step and one-cycle by epoch / by step."""
    total = config.epochs * steps_per_epoch
    if config.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.step_size, gamma=config.gamma), False
    if config.scheduler == "onecycle":
        max_lrs = [g["lr"] for g in optimizer.param_groups]
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lrs, total_steps=total), True
    name = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[config.scheduler]
    warmup = math.ceil(config.warmup_ratio * total)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total), True


def class_weights(setting: str | list[float] | None, train_labels: list[int], num_classes: int) -> torch.Tensor | None:
    """Loss weights per class: given, or 'auto' = inverse frequency (n / (k * count_c))."""
    if setting is None:
        return None
    if setting == "auto":
        counts = Counter(train_labels)
        return torch.tensor(
            [len(train_labels) / (num_classes * max(counts.get(c, 0), 1)) for c in range(num_classes)]
        )
    if len(setting) != num_classes:
        raise HfTransferError(f"training.class_weights has {len(setting)} values for {num_classes} classes.")
    return torch.tensor(setting, dtype=torch.float)


def training_loss(logits: torch.Tensor, labels: torch.Tensor, model: nn.Module, inputs: dict[str, torch.Tensor],
                  config: TrainingConfig, weights: torch.Tensor | None, callbacks: Sequence[Callback],
                  progress: float) -> torch.Tensor:
    """The objective a training step minimises: the task's cross-entropy plus what callbacks add (a domain loss).

    One definition, so the learning-rate range test minimises what the loop will.
    """
    loss = torch.nn.functional.cross_entropy(logits.float(), labels, weight=weights, label_smoothing=config.label_smoothing)
    for callback in callbacks:
        extra = callback.extra_loss(model, inputs, progress)
        if extra is not None:
            loss = loss + extra
    return loss


def set_train_mode(model: nn.Module) -> None:
    """`model.train()`, except that fully frozen BatchNorm layers stay in eval mode.

    `train()` would switch them back to batch statistics and keep updating their running means,
    so a "frozen" backbone would drift; this is the classic feature-extraction trap.
    Not timm's `freeze_batch_norm_2d`: it swaps the layers for FrozenBatchNorm2d for good, which gradual
    unfreezing could not undo, and it serves 2-D BatchNorm in timm models only.
    """
    model.train()
    for module in model.modules():
        if isinstance(module, _BatchNorm) and not any(p.requires_grad for p in module.parameters()):
            module.eval()
