"""Unsupervised domain adaptation runs: a labelled source, an unlabelled target, the shared loop.

The recipe's `data` is the source and `adaptation.target_path` the target, read the same way (same
columns, same preprocessing). The backbone stays frozen, so the features of every source and target
example are computed once (and stored per example, see example_features.py); a small head trains
on them in the shared trainer:

    frozen backbone -> pooled features -> bottleneck -> classifier      (source labels)
                                              `-> domain loss           (source vs target, adapt.py)

Each training batch carries a source batch and an equally large target batch drawn at random; the
trainer adds the domain loss (dann, mmd or coral) between the two batches' bottleneck features to the
source classification loss through its `auxiliary_loss` hook. TCA instead maps both domains'
features once, before the head trains, and needs no loss. Method `none` is the source-only baseline
on the same features, head and budget.

Target labels, where the target has them, only report target accuracy: the run keeps its last epoch
rather than the epoch the target would pick, and the target never reaches the classification loss.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, Dataset

from hf_transfer.adapt import (
    DomainDiscriminator,
    TransferComponentAnalysis,
    dann_weight,
    domain_loss,
)
from hf_transfer.errors import HfTransferError
from hf_transfer.example_features import ExampleFeatureStore, stored_features
from hf_transfer.features import (
    CachedFeatures,
    FeatureKey,
    cached_loader,
    prebuilt_batch,
    weights_digest,
)
from hf_transfer.recipe import AdaptationConfig, Recipe
from hf_transfer.sources.base import TransferModel
from hf_transfer.sources.pooling import PooledFeatures

Split = tuple[torch.Tensor, torch.Tensor]  # (features, labels)


# ---------------------------------------------------------------------------------------------
# The target data, and the frozen features of both domains


def target_recipe(recipe: Recipe) -> Recipe:
    """The recipe with the target as its data: same columns and preprocessing, every example kept.

    The target is used whole (its train and validation splits together), so the seed of the split
    changes only the order; a fixed one keeps its fingerprint, and so its cached features, across seeds.
    """
    adaptation = recipe.adaptation
    data = dataclasses.replace(
        recipe.data, path=adaptation.target_path, name=adaptation.target_name,
        max_train_samples=None, max_eval_samples=None,
    )
    return dataclasses.replace(recipe, data=data, training=dataclasses.replace(recipe.training, seed=0))


def load_target_task(recipe: Recipe, label_names: list[str]) -> Any:
    """The target read by the recipe's own task builder, so it is preprocessed exactly as the source."""
    from hf_transfer.run import TASKS  # run.py imports this module: import at call time

    target = TASKS[recipe.task](target_recipe(recipe))
    if target.label_names != label_names:
        raise HfTransferError(
            f"The target's labels {target.label_names} differ from the source's {label_names}; domain "
            "adaptation needs the same classes in both (set data.label_names if they are ids)."
        )
    return target


@dataclass
class DomainFeatures:
    """Frozen features (float32, CPU) of the source's train and validation splits and the whole target."""

    source_train: Split
    source_validation: Split
    target: Split


def feature_store_path(recipe: Recipe, model: TransferModel, preprocessing: str, accelerator: Accelerator) -> Path:
    """One store per backbone, preprocessing, pooling and precision, in the run's feature cache folder."""
    training = recipe.training
    folder = Path(training.feature_cache_dir) if training.feature_cache_dir else recipe.output_dir / "feature_cache"
    key = FeatureKey(
        model_name=recipe.model.name, model_class=type(model.model).__name__, weights=weights_digest(model),
        preprocessing=f"{preprocessing}; {recipe.adaptation.features} pooling", data="per example",
        precision=accelerator.mixed_precision,
    )
    return folder / f"examples-{key.digest()}.safetensors"


def domain_features(recipe: Recipe, source: Any, target: Any, accelerator: Accelerator) -> DomainFeatures:
    """Features of every source and target example, from the per-example store or computed once."""
    for task, role in ((source, "source"), (target, "target")):
        if task.feature_source is None:
            raise HfTransferError(f"The {recipe.task} task cannot provide frozen features for the {role} yet.")
    encoder = PooledFeatures(source.model, recipe.adaptation.features).to(accelerator.device)
    path = feature_store_path(recipe, source.model, source.feature_source.preprocessing, accelerator)
    store = ExampleFeatureStore(path)

    def features_of(task: Any, split: str) -> Split:
        loader = task.feature_source.loader(split, None)
        return stored_features(encoder, loader, store, accelerator.device, accelerator.autocast)

    target_parts = [features_of(target, "train"), features_of(target, "validation")]
    return DomainFeatures(
        source_train=features_of(source, "train"),
        source_validation=features_of(source, "validation"),
        target=(torch.cat([f for f, _ in target_parts]), torch.cat([y for _, y in target_parts])),
    )


# ---------------------------------------------------------------------------------------------
# TCA: a fixed map of both domains' features before the head trains


@dataclass
class FeatureMap:
    """TCA's map: standardise (both domains' statistics), project on the components, rescale."""

    tca: TransferComponentAnalysis
    mean: np.ndarray  # of the input features, over source and target together
    std: np.ndarray
    scale: float  # one number for all components: their relative spread is what TCA found

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        standardised = (features.numpy().astype(np.float64) - self.mean) / self.std
        return torch.from_numpy((self.tca.transform(standardised) / self.scale).astype(np.float32))


def fit_tca(source: torch.Tensor, target: torch.Tensor, config: AdaptationConfig, seed: int) -> FeatureMap:
    """TCA fitted on a seeded sample of each domain (half the budget each)."""
    joint = torch.cat([source, target]).double().numpy()
    # standardised inputs: a linear kernel on raw features is ruled by a few large dimensions
    mean, std = joint.mean(0), joint.std(0) + 1e-8
    rng = np.random.default_rng(seed)
    half = config.tca_max_samples // 2

    def sample(x: torch.Tensor) -> np.ndarray:
        rows = np.sort(rng.choice(len(x), size=min(half, len(x)), replace=False))
        return (x[rows].double().numpy() - mean) / std

    tca = TransferComponentAnalysis(config.tca_components, config.tca_kernel, config.tca_mu)
    tca.fit(sample(source), sample(target))
    # a per-component standardisation would blow the weak, noisy components up to the strong ones' size
    scale = float(tca.transform((joint - mean) / std).std()) or 1.0
    return FeatureMap(tca, mean, std, scale)


# ---------------------------------------------------------------------------------------------
# The head and the domain objective


class AdaptationHead(nn.Module):
    """Standardisation (source statistics), a bottleneck (the features the domain loss aligns), a classifier."""

    def __init__(self, in_features: int, num_classes: int, bottleneck_dim: int, dropout: float):
        super().__init__()
        self.register_buffer("feature_mean", torch.zeros(in_features))
        self.register_buffer("feature_std", torch.ones(in_features))
        self.bottleneck = nn.Sequential(nn.Linear(in_features, bottleneck_dim), nn.ReLU(), nn.Dropout(dropout))
        self.classifier = nn.Linear(bottleneck_dim, num_classes)

    def set_statistics(self, features: torch.Tensor) -> None:
        """Standardise with these features' statistics (the source's: the baseline must not see the target)."""
        self.feature_mean.copy_(features.mean(0))
        self.feature_std.copy_(features.std(0) + 1e-6)

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        return self.bottleneck((features - self.feature_mean) / self.feature_std)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(features))


class AdaptedHeadModel(TransferModel):
    """The adapted head on frozen features, with DANN's domain discriminator beside it while training."""

    input_names = ("features",)

    def __init__(self, in_features: int, label_names: list[str], config: AdaptationConfig):
        super().__init__()
        self.model = AdaptationHead(in_features, len(label_names), config.bottleneck_dim, config.dropout)
        self.discriminator = (
            DomainDiscriminator(config.bottleneck_dim, hidden=config.bottleneck_dim, dropout=config.dropout)
            if config.method == "dann" else None
        )
        self.label_names = label_names
        self.head_modules = ["model"]
        self.head_prefixes = ["model.", "discriminator."]
        self.block_prefixes = []

    def forward(self, features: torch.Tensor, **_unused: torch.Tensor) -> torch.Tensor:
        return self.model(features)

    def features(self, features: torch.Tensor, **_unused: torch.Tensor) -> torch.Tensor:
        return features


# Chosen once on the two PACS pairs and kept for every pair: with standardised features, DANN at
# weight 1 lets the discriminator win and the target accuracy swing from epoch to epoch.
DEFAULT_WEIGHTS = {"dann": 0.1, "mmd": 1.0, "coral": 1.0}


def domain_loss_weight(config: AdaptationConfig) -> float:
    return config.weight if config.weight is not None else DEFAULT_WEIGHTS.get(config.method, 0.0)


class DomainObjective:
    """The trainer's auxiliary loss: the domain loss between a batch's source and target bottlenecks."""

    def __init__(self, model: AdaptedHeadModel, config: AdaptationConfig):
        self.model, self.config = model, config

    def __call__(self, _model: nn.Module, inputs: dict[str, torch.Tensor], progress: float) -> torch.Tensor:
        source, target = inputs["features"], inputs["target_features"]
        # one pass over both domains, as DANN and DAN do; `self.model` rather than the trainer's
        # (possibly wrapped) model, to reach the bottleneck and the discriminator by name
        bottleneck = self.model.model.embed(torch.cat([source, target]))
        source_features, target_features = bottleneck[: len(source)], bottleneck[len(source):]
        method, weight = self.config.method, domain_loss_weight(self.config)
        if method == "dann":
            weight = dann_weight(progress, self.config.ramp_gamma, weight)
            return domain_loss(method, source_features, target_features, weight, self.model.discriminator)
        return domain_loss(method, source_features, target_features, weight)


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


def paired_loader(dataset: SourceWithTarget, batch_size: int, seed: int) -> DataLoader:
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=True, collate_fn=prebuilt_batch,
        # a last batch of one row has no covariance (coral) and starves the discriminator
        drop_last=len(dataset) > batch_size,
        generator=torch.Generator().manual_seed(seed),
    )


# ---------------------------------------------------------------------------------------------
# From a recipe and its source task to what the trainer runs


@dataclass
class AdaptationRun:
    """What the run trains instead of the source task's model: the adapted head on frozen features."""

    model: AdaptedHeadModel
    train_loader: DataLoader
    eval_loader: DataLoader  # the target: reported every epoch, never used to choose
    source_eval_loader: DataLoader
    auxiliary_loss: Callable | None
    feature_map: FeatureMap | None
    recipe: Recipe

    def report(self, accelerator: Accelerator) -> dict[str, Any]:
        from hf_transfer.trainer import evaluate

        source = evaluate(self.model, self.source_eval_loader, accelerator, self.model.label_names)
        return {
            "method": self.recipe.adaptation.method,
            "source_path": self.recipe.data.path,
            "target_path": self.recipe.adaptation.target_path,
            "features": self.recipe.adaptation.features,
            "source_validation_accuracy": source["accuracy"],
        }

    def save(self, folder: Path) -> None:
        from hf_transfer.adapted_model import save_adapted_model

        save_adapted_model(self, folder)


def prepare_adaptation(recipe: Recipe, source: Any, accelerator: Accelerator) -> AdaptationRun:
    """Target data, frozen features of both domains, and the head with its domain objective."""
    target = load_target_task(recipe, source.label_names)
    features = domain_features(recipe, source, target, accelerator)
    del target  # its copy of the model and its loaders are no longer needed
    run = build_adaptation_run(features, source.label_names, recipe, accelerator.device)
    accelerator.print(
        f"domain adaptation {recipe.adaptation.method}: {len(features.source_train[1])} source and "
        f"{len(features.target[1])} target examples, {recipe.adaptation.features} features of width "
        f"{features.source_train[0].shape[1]}"
    )
    return run


def build_adaptation_run(
    features: DomainFeatures, label_names: list[str], recipe: Recipe, device: torch.device
) -> AdaptationRun:
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
    objective = DomainObjective(model, config) if config.method in ("dann", "mmd", "coral") else None

    def eval_loader(split: str) -> DataLoader:
        dataset = CachedFeatures([splits[split][0]], splits[split][1])
        return cached_loader(dataset, training.eval_batch_size, False, training.seed)

    paired = SourceWithTarget(splits["train"], splits["target"][0], training.seed)
    return AdaptationRun(
        model=model,
        train_loader=paired_loader(paired, training.batch_size, training.seed),
        eval_loader=eval_loader("target"),
        source_eval_loader=eval_loader("validation"),
        auxiliary_loss=objective,
        feature_map=feature_map,
        recipe=recipe,
    )
