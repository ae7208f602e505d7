"""Domain adaptation with the backbone in the loop, for strategies that train it (partial, full, lora, ...).

The task's own classifier trains, as a plain run would: the source task loss, plus the method's
domain loss on the features its head reads, both backpropagated into whatever the strategy left
trainable (the backbone at training.backbone_lr, the head and any domain discriminator at the head's
rate). Two callbacks plug this into the shared loop:

- `TargetBatches` adds, to every source batch, an unlabelled target batch of the same size drawn from
  the target's training split (training augmentation included), its keys prefixed `target_`;
- the `DomainObjective` (objective.py) reads the step's `DomainBatch` from `backbone_view`: the source's head
  input and logits, caught by a hook as the loop's forward passes, and the target's, from one more forward.

The two domains go through the model in separate passes, so each BatchNorm layer normalises a batch
of one domain (text batches are padded per domain, too). The run saves the task's normal folder
(no discriminator, which only trains), so `predict`, `evaluate` and the stock libraries load it like
any other run. The whole target, without augmentation, is evaluated each epoch; the last epoch is kept.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader

from hf_transfer.adaptation.features import load_target_task
from hf_transfer.adaptation.head import method_discriminator
from hf_transfer.adaptation.losses import DomainBatch
from hf_transfer.adaptation.norms import (
    PerDomainNormStatistics,
    estimate_statistics,
    norm_statistics,
    per_domain_statistics,
)
from hf_transfer.adaptation.objective import DomainObjective
from hf_transfer.console import say
from hf_transfer.errors import HfTransferError
from hf_transfer.recipe import Recipe
from hf_transfer.sources.base import TransferModel
from hf_transfer.training.compact_embeddings import train_rows_of_both
from hf_transfer.training.metrics import evaluate
from hf_transfer.training.plan import Callback, Plan

TARGET_PREFIX = "target_"
DISCRIMINATOR = "domain_discriminator"  # its attribute on the task's model: trained at the head's rate, never saved


class HeadInput:
    """The input (features) and output (logits) of the model's head module at its latest forward pass.

    A hook on the head itself, so the features are exactly what the classifier reads, for any
    architecture and under peft's wrappers (whose copy of the head keeps the head's name).
    """

    def __init__(self, model: TransferModel):
        head = model.head_modules[-1]
        matches = [(name, module) for name, module in model.model.named_modules()
                   if name == head or name.endswith(f".{head}")]
        if not matches:
            raise HfTransferError(f"Cannot find the head module {head!r} of {type(model.model).__name__}.")
        _, module = min(matches, key=lambda match: match[0].count("."))  # the outermost: peft's wrapper, if any
        self.features: torch.Tensor | None = None
        self.logits: torch.Tensor | None = None
        module.register_forward_hook(self._catch)

    def _catch(self, _module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        features = args[0]
        self.features = features[:, 0] if features.dim() == 3 else features  # a token sequence: its first token
        self.logits = output


def backbone_view(head_input: HeadInput) -> Callable[[nn.Module, dict[str, torch.Tensor]], DomainBatch]:
    """The step's domain batch: the source's head input and logits from the loop's forward, the target's from one more."""

    def view(model: nn.Module, inputs: dict[str, torch.Tensor]) -> DomainBatch:
        source_features, source_logits = head_input.features, head_input.logits
        model(**{k[len(TARGET_PREFIX):]: v for k, v in inputs.items() if k.startswith(TARGET_PREFIX)})
        return DomainBatch(source_features.float(), head_input.features.float(), source_logits, head_input.logits)

    return view


def _set_epoch(loader: DataLoader, epoch: int) -> None:
    """Pin the order (and augmentation) of a loader's samplers to `epoch`."""
    for sampler in (loader.sampler, loader.batch_sampler, getattr(loader.batch_sampler, "sampler", None)):
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)


class TargetBatches(Callback):
    """Adds an unlabelled target batch (keys prefixed `target_`) to every training batch.

    The target loader restarts at each epoch in the order its (seed, epoch) gives, and starts over
    (one pass later) when the source has more batches than the target. A run resumed mid-epoch draws
    that epoch's target batches from the start again. Every process draws the same target batches.
    """

    def __init__(self, loader: DataLoader):
        self.loader = loader
        self.batches: Iterator[dict[str, torch.Tensor]] | None = None
        self.passes = 0

    def _restart(self, epoch: int) -> None:
        _set_epoch(self.loader, epoch * 1000 + self.passes)  # each pass of an epoch its own order
        self.batches = iter(self.loader)

    def on_epoch_begin(self, loop, epoch: int) -> None:
        self.epoch, self.passes = epoch, 0
        self._restart(epoch)

    def on_batch(self, loop, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        try:
            target = next(self.batches)
        except StopIteration:
            self.passes += 1
            self._restart(self.epoch)
            target = next(self.batches)
        device = loop.accelerator.device
        # the target's labels never enter the batch: they only score the evaluation
        extra = {f"{TARGET_PREFIX}{k}": v.to(device) for k, v in target.items() if k not in ("labels", "label")}
        return {**batch, **extra}


@contextlib.contextmanager
def source_statistics(model: TransferModel, source: Plan, device: torch.device) -> Iterator[None]:
    """The source's own BatchNorm statistics in the model (estimated over its training examples, without
    augmentation) while the source validation is scored; the target's back afterwards."""
    saved = norm_statistics(model)
    estimate_statistics(model, source.feature_source.loader("train", None), device)
    try:
        yield
    finally:
        model.load_state_dict(saved, strict=False)


def whole_target_loader(target: Plan, batch_size: int) -> DataLoader:
    """Every target example (its train and validation splits), without augmentation, in a fixed order."""
    parts = [target.feature_source.loader(split, None) for split in ("train", "validation")]
    return DataLoader(ConcatDataset([part.dataset for part in parts]), batch_size=batch_size, shuffle=False,
                      collate_fn=parts[0].collate_fn)


def backbone_adaptation_plan(recipe: Recipe, source: Plan, accelerator: Accelerator) -> Plan:
    """The task's own classifier, trained on the source with the domain loss on both domains' head input."""
    config = recipe.adaptation
    target = load_target_task(recipe, source.label_names)
    if target.feature_source is None:
        raise HfTransferError(f"The {recipe.task} task cannot read a target domain yet.")
    model = source.model
    callbacks: list[Callback] = []
    if config.method != "none":
        head_input = HeadInput(model)
        with torch.no_grad():  # the head's width, from one source example
            probe = next(iter(source.feature_source.loader("validation", None)))
            model.eval()(**{k: v[:1] for k, v in probe.items() if k not in ("labels", "label")})
        discriminator = method_discriminator(config, head_input.features.shape[1], len(source.label_names))
        if discriminator is not None:
            setattr(model, DISCRIMINATOR, discriminator)  # in the optimiser's groups, beside the head
            model.head_prefixes = [*model.head_prefixes, f"{DISCRIMINATOR}."]
        callbacks = [TargetBatches(target.train_loader), DomainObjective(config, backbone_view(head_input), discriminator)]
    target_examples = whole_target_loader(target, recipe.training.eval_batch_size)
    train_rows_of_both(source.callbacks, target.callbacks)  # the target's texts train the word embeddings too
    per_domain = per_domain_statistics(recipe, model)
    if per_domain:
        callbacks.append(PerDomainNormStatistics(target_examples))

    def report(accelerator: Accelerator) -> dict:
        with source_statistics(model, source, accelerator.device) if per_domain else contextlib.nullcontext():
            source_validation = evaluate(model, accelerator.prepare(source.eval_loader), accelerator, source.label_names)
        return {"adaptation": {
            "method": config.method,
            "backbone": f"trained ({recipe.strategy.name})",
            "source_path": recipe.data.path,
            "target_path": config.target_path,
            "features": config.features,
            "norm_statistics": "per_domain" if per_domain else "shared",
            "source_validation_accuracy": source_validation["accuracy"],
        }}

    say(accelerator, f"domain adaptation {config.method} with the backbone in the loop ({recipe.strategy.name}): "
                     f"{len(source.train_labels)} source and {len(target.train_labels)} unlabelled target training examples")
    return Plan(
        model=model,
        train_loader=source.train_loader,
        train_loader_for=source.train_loader_for,
        eval_loader=target_examples,  # reported, never used to choose
        label_names=source.label_names,
        train_labels=source.train_labels,
        save=source.save,
        card=source.card,
        callbacks=[*source.callbacks, *callbacks],
        epoch_rule="last",
        summary=lambda accelerator: source.summary(accelerator) | report(accelerator),
    )
