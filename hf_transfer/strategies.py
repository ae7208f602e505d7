"""Transfer strategies: a registry from a strategy's name to what it does.

Each `Strategy` says how it applies to a model (which parameters train, and any callback the loop
needs, such as gradual unfreezing), whether it trains backbone weights, whether the run saves an
adapter instead of whole weights, and how the model card describes it. A strategy sees only the
`TransferModel` interface (head parameters, backbone blocks from input to output), never a
particular architecture. Adding a strategy is one entry in `STRATEGIES` (and its name in the
recipe schema).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from hf_transfer.errors import HfTransferError
from hf_transfer.recipe import StrategyConfig
from hf_transfer.sources.base import TransferModel
from hf_transfer.training.plan import Callback

if TYPE_CHECKING:  # annotations only
    from hf_transfer.training.state import Loop


def _set_trainable(parameters, trainable: bool) -> None:
    for parameter in parameters:
        parameter.requires_grad_(trainable)


def _train_head(model: TransferModel, and_backbone: bool = False) -> None:
    """The new head trains; the backbone trains too, or is frozen."""
    _set_trainable((p for _, p in model.backbone_parameters()), and_backbone)
    _set_trainable((p for _, p in model.head_parameters()), True)


def _unfreeze_top_blocks(model: TransferModel, count: int) -> None:
    blocks = model.block_parameters()
    if count > len(blocks):
        raise HfTransferError(
            f"strategy.trainable_blocks is {count} but the backbone has {len(blocks)} blocks; "
            f"use at most {len(blocks)} (or strategy full)."
        )
    for block in blocks[len(blocks) - count:]:
        _set_trainable(block, True)


class GradualUnfreezing(Callback):
    """ULMFiT-style gradual unfreezing: one more backbone block, from the top, every N epochs."""

    unfreezes_parameters = True  # the optimiser must hold the frozen blocks from the start
    cuda_graphs_blocker = "trainable parameters change between epochs"

    def __init__(self, model: TransferModel, every: int):
        self.model = model
        self.every = max(1, every)

    def on_epoch_begin(self, loop, epoch: int) -> None:
        blocks = min(epoch // self.every, len(self.model.block_prefixes))
        if blocks:
            _unfreeze_top_blocks(self.model, blocks)


def _apply_full(model: TransferModel, config: StrategyConfig) -> list[Callback]:
    _train_head(model, and_backbone=True)
    return []


def _apply_freeze_backbone(model: TransferModel, config: StrategyConfig) -> list[Callback]:
    _train_head(model)
    return []


def _apply_partial(model: TransferModel, config: StrategyConfig) -> list[Callback]:
    _train_head(model)
    _unfreeze_top_blocks(model, config.trainable_blocks)
    return []


def _apply_gradual_unfreeze(model: TransferModel, config: StrategyConfig) -> list[Callback]:
    _train_head(model)
    return [GradualUnfreezing(model, config.unfreeze_every)]


def _apply_lora(model: TransferModel, config: StrategyConfig) -> list[Callback]:
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
    return []


def _describe_lora(s: StrategyConfig) -> str:
    targets = ", ".join(s.lora.target_modules) if s.lora.target_modules else "the default attention projections"
    merged = "; a merged copy in merged/" if s.merge_lora else ""
    settings = f"r={s.lora.r}, alpha={s.lora.alpha}, dropout={s.lora.dropout}"
    return f"LoRA ({settings}) on {targets}; the new head trains fully{merged}"


@dataclass(frozen=True)
class Strategy:
    apply: Callable[[TransferModel, StrategyConfig], list[Callback]]  # freezes in place; callbacks for the loop
    describe: Callable[[StrategyConfig], str]  # the model card's sentence
    trains_backbone: bool  # False: the frozen-feature cache can serve it
    saves_adapter: bool = False  # the output holds a peft adapter, not whole weights


STRATEGIES: dict[str, Strategy] = {
    "full": Strategy(
        _apply_full, lambda s: "full fine-tuning: every backbone parameter trains with the new head", True
    ),
    "freeze_backbone": Strategy(
        _apply_freeze_backbone,
        lambda s: "feature extraction: the backbone stays frozen, only the new head trains", False,
    ),
    "partial": Strategy(
        _apply_partial,
        lambda s: f"partial fine-tuning: the top {s.trainable_blocks} backbone block(s) train with the new head", True,
    ),
    "gradual_unfreeze": Strategy(
        _apply_gradual_unfreeze,
        lambda s: "gradual unfreezing: the head first, then one more backbone block, top down, "
        f"every {s.unfreeze_every} epoch(s)",
        True,
    ),
    "lora": Strategy(_apply_lora, _describe_lora, True, saves_adapter=True),
}


def describe_strategy(config: StrategyConfig) -> str:
    """The model card's sentence for the strategy."""
    strategy = get_strategy(config)
    frozen = config.freeze_word_embeddings and strategy.trains_backbone
    return strategy.describe(config) + ("; the word embeddings stay at their pretrained values" if frozen else "")


def get_strategy(config: StrategyConfig) -> Strategy:
    if config.name == "auto":  # the schema's one name that is not a strategy: a search over them (ladder/)
        raise HfTransferError("strategy auto is a search over strategies, not one: train it with `hf-transfer train` "
                              "or hf_transfer.ladder.run_ladder(recipe).")
    if config.name not in STRATEGIES:  # the schema's Literal lists the same names, and auto
        raise HfTransferError(f"Unknown strategy '{config.name}'; choose one of {', '.join(STRATEGIES)}.")
    return STRATEGIES[config.name]


class FrozenNormStatistics(Callback):
    """strategy.norm_statistics frozen: every BatchNorm layer normalises with its pretrained running statistics
    in training too (the loop's train mode is set per epoch, so this runs per batch, after it)."""

    def __init__(self, model: nn.Module):
        self.norms = [module for module in model.modules() if isinstance(module, _BatchNorm)]

    def on_batch(self, loop: Loop, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        for norm in self.norms:
            norm.eval()
        return batch


def apply_strategy(model: TransferModel, config: StrategyConfig) -> list[Callback]:
    """Freeze and unfreeze `model` in place (the word embeddings too, where asked); returns the callbacks the
    loop needs (gradual unfreezing, frozen BatchNorm statistics)."""
    strategy = get_strategy(config)
    callbacks = strategy.apply(model, config)
    if config.freeze_word_embeddings and strategy.trains_backbone:
        embeddings = model.word_embeddings()
        if embeddings is None:
            raise HfTransferError(f"strategy.freeze_word_embeddings is true, but {type(model.model).__name__} has no "
                                  "token embeddings; set it to false.")
        _set_trainable(embeddings.parameters(), False)
    if config.norm_statistics == "frozen" and strategy.trains_backbone:
        callbacks.append(FrozenNormStatistics(model))
    return callbacks


def merged_copy(library_model: nn.Module) -> nn.Module:
    """A copy of the model with LoRA folded into its weights, or the model itself when it has no adapter."""
    if hasattr(library_model, "merge_and_unload"):
        return copy.deepcopy(library_model).merge_and_unload()
    return library_model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total
