"""Unsupervised domain adaptation runs: a labelled source, an unlabelled target, the shared loop.

The recipe's `data` is the source and `adaptation.target_path` the target, read the same way (same
columns, same preprocessing). A strategy that trains the backbone adapts it in the loop (backbone.py);
otherwise the backbone stays frozen, so the features of every source and target
example are computed once (features.py); a small head (head.py) trains on them in the shared loop.

Each training batch carries a source batch and an equally large target batch drawn at random; the
`DomainObjective` callback adds the domain loss (dann, cdan, mmd, coral or mcc) between the two
batches' bottleneck features (and, for cdan and mcc, their predictions) to the source classification loss. TCA instead maps both domains' features
once, before the head trains, and needs no loss. Method `none` is the source-only baseline on the
same features, head and budget.

Target labels, where the target has them, only report target accuracy: the plan keeps its last
epoch rather than the epoch the target would pick, and the target never reaches the classification loss.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, Dataset

from hf_transfer.adaptation.backbone import backbone_adaptation_plan
from hf_transfer.adaptation.features import (
    DomainFeatures,
    Split,
    domain_features,
    fit_tca,
    load_target_task,
)
from hf_transfer.adaptation.head import AdaptedHeadModel
from hf_transfer.adaptation.losses import DomainBatch
from hf_transfer.adaptation.objective import DomainObjective
from hf_transfer.adaptation.model import save_adapted_model
from hf_transfer.cache.head import CachedFeatures, cached_loader
from hf_transfer.console import say
from hf_transfer.recipe import Recipe
from hf_transfer.strategies import get_strategy
from hf_transfer.training.metrics import evaluate
from hf_transfer.training.plan import Plan

__all__ = ["DomainFeatures", "DomainObjective", "SourceWithTarget", "adaptation_plan", "build_adaptation_plan"]


def bottleneck_view(model: AdaptedHeadModel) -> Callable[[nn.Module, dict[str, torch.Tensor]], DomainBatch]:
    """The frozen path's domain batch: both domains' bottleneck features, in one pass, and their logits.

    `model` rather than the trainer's (possibly wrapped) one, to reach the bottleneck by name.
    """

    def view(_trained: nn.Module, inputs: dict[str, torch.Tensor]) -> DomainBatch:
        source, target = inputs["features"], inputs["target_features"]
        bottleneck = model.model.embed(torch.cat([source, target]))
        logits = model.model.classifier(bottleneck)
        n = len(source)
        return DomainBatch(bottleneck[:n], bottleneck[n:], logits[:n], logits[n:])

    return view


# ---------------------------------------------------------------------------------------------
# Batches that carry both domains


class SourceWithTarget(Dataset):
    """Source features and labels; every batch also carries as many target features, drawn at random.

    The draw depends only on (seed, epoch, the batch's first source index), so a resumed epoch
    draws the same target rows. The target's labels never enter a batch.
    """

    def __init__(self, source: Split, target_features: torch.Tensor, seed: int):
        self.features, self.labels = source
        self.target_features, self.seed, self.epoch = target_features, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.labels)

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(hash((self.seed, self.epoch, indices[0], len(indices))) % 2**62)
        target_rows = torch.randint(len(self.target_features), (len(indices),), generator=generator)
        index = torch.as_tensor(indices)
        return {
            "features": self.features[index],
            "labels": self.labels[index],
            "target_features": self.target_features[target_rows.to(self.target_features.device)],
        }


# ---------------------------------------------------------------------------------------------
# From a recipe and its source task to the plan the loop runs


def build_adaptation_plan(features: DomainFeatures, label_names: list[str], recipe: Recipe, device: torch.device) -> Plan:
    """The head, its objective and its loaders, from features already extracted."""
    config, training = recipe.adaptation, recipe.training
    splits = {"train": features.source_train, "validation": features.source_validation, "target": features.target}
    feature_map = None
    if config.method == "tca":
        feature_map = fit_tca(features.source_train[0], features.target[0], config, training.seed)
        splits = {name: (feature_map(x), y) for name, (x, y) in splits.items()}
    splits = {name: (x.to(device), y.to(device)) for name, (x, y) in splits.items()}
    model = AdaptedHeadModel(splits["train"][0].shape[1], label_names, config).to(device)
    if feature_map is None:  # TCA's map standardises already, and keeps its components' relative scale
        model.model.set_statistics(splits["train"][0])
    objective = ([DomainObjective(config, bottleneck_view(model), model.discriminator)]
                 if config.method not in ("none", "tca") else [])

    def eval_loader(split: str) -> DataLoader:
        dataset = CachedFeatures([splits[split][0]], splits[split][1])
        return cached_loader(dataset, training.eval_batch_size, False, training.seed)

    source_eval_loader = eval_loader("validation")

    def report(accelerator: Accelerator) -> dict:
        source = evaluate(model, source_eval_loader, accelerator, label_names)
        return {"adaptation": {
            "method": config.method,
            "source_path": recipe.data.path,
            "target_path": config.target_path,
            "features": config.features,
            "norm_statistics": "per_domain" if features.target_norm_statistics is not None else "shared",
            "source_validation_accuracy": source["accuracy"],
        }}

    paired = SourceWithTarget(splits["train"], splits["target"][0], training.seed)

    def train_loader(batch_size: int) -> DataLoader:
        # a last batch of one row has no covariance (coral) and starves the discriminator
        return cached_loader(paired, batch_size, True, training.seed, drop_last=len(paired) > batch_size)

    return Plan(
        model=model,
        train_loader=train_loader(training.batch_size),
        train_loader_for=train_loader,
        eval_loader=eval_loader("target"),  # reported every epoch, never used to choose
        label_names=label_names,
        train_labels=splits["train"][1].tolist(),
        save=lambda folder: save_adapted_model(model, feature_map, recipe, folder, features.target_norm_statistics),
        card="adapted",
        callbacks=objective,
        epoch_rule="last",
        summary=report,
    )


def adaptation_plan(recipe: Recipe, source: Plan, accelerator: Accelerator) -> Plan:
    """With a frozen backbone, the head on both domains' cached features (below); with a strategy that
    trains the backbone, the task's own classifier with the domain loss in the loop (backbone.py)."""
    if get_strategy(recipe.strategy).trains_backbone:
        return backbone_adaptation_plan(recipe, source, accelerator)
    return frozen_adaptation_plan(recipe, source, accelerator)


def frozen_adaptation_plan(recipe: Recipe, source: Plan, accelerator: Accelerator) -> Plan:
    """Target data, frozen features of both domains, and the head with its domain objective."""
    target = load_target_task(recipe, source.label_names)
    features = domain_features(recipe, source, target, accelerator)
    del target  # its copy of the model and its loaders are no longer needed
    plan = build_adaptation_plan(features, source.label_names, recipe, accelerator.device)
    say(accelerator,
        f"domain adaptation {recipe.adaptation.method}: {len(features.source_train[1])} source and "
        f"{len(features.target[1])} target examples, {recipe.adaptation.features} features of width "
        f"{features.source_train[0].shape[1]}"
    )
    return plan
