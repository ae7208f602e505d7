"""Transfer strategies: which parameters train, and with which learning rates.

Shared by every modality: a strategy sees only the `TransferModel` interface (head parameters,
backbone blocks from input to output), never a particular architecture.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from hf_transfer.errors import HfTransferError
from hf_transfer.recipe import StrategyConfig, TrainingConfig
from hf_transfer.sources.base import TransferModel

EpochHook = Callable[[int], None]


def _set_trainable(parameters, trainable: bool) -> None:
    for parameter in parameters:
        parameter.requires_grad_(trainable)


def _unfreeze_top_blocks(model: TransferModel, count: int) -> None:
    blocks = model.block_parameters()
    if count > len(blocks):
        raise HfTransferError(
            f"strategy.trainable_blocks is {count} but the backbone has {len(blocks)} blocks; "
            f"use at most {len(blocks)} (or strategy full)."
        )
    for block in blocks[len(blocks) - count:]:
        _set_trainable(block, True)


class GradualUnfreezing:
    """ULMFiT-style gradual unfreezing: one more backbone block, from the top, every N epochs."""

    def __init__(self, model: TransferModel, every: int):
        self.model = model
        self.every = max(1, every)

    def __call__(self, epoch: int) -> None:
        blocks = min(epoch // self.every, len(self.model.block_prefixes))
        if blocks:
            _unfreeze_top_blocks(self.model, blocks)


def _apply_lora(model: TransferModel, config: StrategyConfig) -> None:
    from peft import LoraConfig, get_peft_model

    lora = config.lora
    targets = lora.target_modules or model.lora_targets
    peft_config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        task_type=model.peft_task_type,
        # the new head trains fully and is saved with the adapter, so it reloads with its weights
        modules_to_save=None if model.peft_task_type else list(model.head_modules),
    )
    try:
        model.model = get_peft_model(model.model, peft_config)
    except ValueError as error:
        raise HfTransferError(
            f"LoRA cannot adapt this model: {error}. Set strategy.lora.target_modules to names of its "
            "linear layers (e.g. [query, value] for BERT, [qkv] for a timm ViT)."
        ) from None


def apply_strategy(model: TransferModel, config: StrategyConfig) -> EpochHook | None:
    """Freeze and unfreeze `model` in place; returns a hook to call at each epoch's start, if any."""
    if config.name == "lora":
        _apply_lora(model, config)
        return None
    full = config.name == "full"
    _set_trainable((p for _, p in model.backbone_parameters()), full)
    _set_trainable((p for _, p in model.head_parameters()), True)
    if config.name == "partial":
        _unfreeze_top_blocks(model, config.trainable_blocks)
    if config.name == "gradual_unfreeze":
        return GradualUnfreezing(model, config.unfreeze_every)
    return None


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def set_train_mode(model: nn.Module) -> None:
    """`model.train()`, except that fully frozen BatchNorm layers stay in eval mode.

    `train()` would switch them back to batch statistics and keep updating their running means,
    so a "frozen" backbone would drift; this is the classic feature-extraction trap.
    """
    model.train()
    for module in model.modules():
        if isinstance(module, _BatchNorm) and not any(p.requires_grad for p in module.parameters()):
            module.eval()


def parameter_groups(
    model: TransferModel, config: TrainingConfig, include_frozen: bool = False
) -> list[dict]:
    """Optimiser groups: head and backbone with their learning rates, no decay on biases and norms.

    `include_frozen` adds parameters frozen now but unfrozen later (gradual unfreezing); the
    optimiser skips them while they have no gradient.
    """
    groups: dict[tuple[str, bool], list[torch.nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        if not (parameter.requires_grad or include_frozen):
            continue
        part = "head" if model.is_head_parameter(name) else "backbone"
        decay = parameter.ndim > 1
        groups.setdefault((part, decay), []).append(parameter)
    lrs = {"head": config.head_lr or config.lr, "backbone": config.backbone_lr or config.lr}
    return [
        {
            "params": params,
            "lr": lrs[part],
            "weight_decay": config.weight_decay if decay else 0.0,
            "name": f"{part}{'' if decay else '_no_decay'}",
        }
        for (part, decay), params in groups.items()
    ]
