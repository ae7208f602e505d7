"""Fine-tuning that starts from the linear probe: the head is fitted on frozen features before the backbone moves.

A new head starts at zero, so the first fine-tuning steps push uninformed gradients into the
pretrained backbone while the head is still learning what the features mean; on a small data set
the features are distorted before the head is any good (Kumar et al., ICLR 2022, "Fine-Tuning can
Distort Pretrained Features and Underperform Out-of-Distribution": linear probing, then fine-tuning,
LP-FT). fastai's `fine_tune` trains the head alone for an epoch first for the same reason. Here the
head is fitted to convergence by the solver (solver.py) on the frozen backbone's cached features,
which costs one pass over the training images (read from the store if a frozen run cached them),
and the loop then fine-tunes from there as the strategy says.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from hf_transfer.cache.head import (
    CachedFeatures,
    FeatureExtraction,
    HeadOnlyModel,
    cached_loader,
    cached_training_features,
    cached_validation_features,
    feature_cache_dir,
    logits_mismatch,
)
from hf_transfer.cache.solver import fit_logistic_head
from hf_transfer.cache.store import FeatureStore
from hf_transfer.console import say
from hf_transfer.errors import HfTransferError
from hf_transfer.recipe import Recipe, TrainingConfig
from hf_transfer.strategies import get_strategy
from hf_transfer.training.metrics import evaluate
from hf_transfer.training.optim import class_weights
from hf_transfer.training.plan import Plan


def head_first_blocker(recipe: Recipe, plan: Plan) -> str | None:
    """Why the head cannot be fitted first in this run, or None when it can."""
    strategy, model = get_strategy(recipe.strategy), plan.model
    if not strategy.trains_backbone:
        return f"strategy {recipe.strategy.name} keeps the backbone frozen (the head is all that trains)"
    if strategy.saves_adapter:
        return f"strategy {recipe.strategy.name} wraps the head in an adapter"
    if recipe.training.cache_features is False:
        return "training.cache_features is false"
    if plan.feature_source is None:
        return f"the {recipe.task} task does not provide features"
    if len(model.head_modules) != 1:
        return f"the head is {len(model.head_modules)} modules, not one"
    head = model.model.get_submodule(model.head_modules[0])
    if not isinstance(head, nn.Linear):
        return f"the head is a {type(head).__name__}, not one linear layer"
    return None


def fit_head_first(plan: Plan, training: TrainingConfig, views: Sequence[torch.Tensor], labels: torch.Tensor,
                   validation: tuple[torch.Tensor, torch.Tensor], accelerator: Accelerator) -> dict[str, Any]:
    """Fit the plan's head on cached frozen features and score it on the validation split's (`validation`:
    features and labels); returns the record for metrics.json.

    Done when the plan is built, not in the loop's place: the loop then starts from the fitted head
    as from any other weights, so whatever runs before it (the learning-rate range test of
    training.lr auto) sees the model that fine-tuning starts from.
    """
    model = plan.model
    head = model.model.get_submodule(model.head_modules[0])
    weights = class_weights(training.class_weights, plan.train_labels, len(plan.label_names))
    fit = fit_logistic_head(head, views, labels, weights, training.seed)
    # the probe's own score, so the card can say what fine-tuning added to it: on the cached features (the head on
    # them gives the model's logits, logits_mismatch checked), so a rerun, or a ladder rung resumed for successive
    # halving, reads them rather than passing the validation images through the backbone again
    scored = cached_loader(CachedFeatures([validation[0]], validation[1]), training.eval_batch_size, False, training.seed)
    metrics = evaluate(HeadOnlyModel(model).to(accelerator.device), scored, accelerator, plan.label_names, ())
    accuracy = float(metrics["accuracy"])
    say(accelerator, f"head fitted first on frozen features in {fit.seconds:.1f} s (C={fit.C:g}): "
                     f"validation accuracy {accuracy:.4f} before the backbone trains")
    return fit.as_record() | {"accuracy": accuracy}


# strategy.head_first auto fits the head first for these tasks only: on three image sets it lifted full
# fine-tuning's last epoch (+0.7, +1.2, +4.8 points); on text it did not help (SST-2 sample, two seeds: within
# the spread; Amazon electronics: 2 points under), so text keeps the zero head (benchmarks/BENCHMARKS.md, issue 11)
AUTO_TASKS = ("image",)


def head_first_plan(recipe: Recipe, plan: Plan, accelerator: Accelerator) -> Plan | None:
    """The plan with its head fitted first (strategy.head_first), or None where that does not apply."""
    setting = recipe.strategy.head_first
    if setting is False or not get_strategy(recipe.strategy).trains_backbone:
        return None
    if setting == "auto" and recipe.task not in AUTO_TASKS:
        return None
    reason = head_first_blocker(recipe, plan)
    if reason is None:
        reason = logits_mismatch(plan, accelerator)
    if reason is not None:
        if setting is True:
            raise HfTransferError(f"strategy.head_first is true, but {reason}. Set strategy.head_first auto or false.")
        say(accelerator, f"head not fitted first: {reason}")
        return None
    extraction = FeatureExtraction(plan.model, FeatureStore(feature_cache_dir(recipe)), accelerator)
    views, labels = cached_training_features(recipe, plan, accelerator, extraction, [None])
    validation = cached_validation_features(recipe, plan, accelerator, extraction)
    record = fit_head_first(plan, recipe.training, views, labels, validation, accelerator)
    record["feature_cache"] = {"hits": extraction.hits, "computed": extraction.misses}
    return dataclasses.replace(plan, summary=lambda accelerator: plan.summary(accelerator) | {"head_first": record},
                               starts_from_probe=recipe.model.pretrained)
