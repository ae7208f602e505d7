"""The two domains' data and frozen features, and TCA's map of them.

The target is read by the recipe's own task builder, so it is preprocessed exactly as the source;
the features of every source and target example come from the per-example feature store
(cache/store.py), so any split, order or seed of examples already seen is not computed again.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from accelerate import Accelerator

from hf_transfer.adaptation.norms import estimate_statistics, norm_statistics, per_domain_statistics
from hf_transfer.adaptation.tca import TransferComponentAnalysis
from hf_transfer.cache.head import feature_cache_dir
from hf_transfer.cache.store import (
    ExampleFeatures,
    FeatureKey,
    FeatureStore,
    extract_features,
    model_key_fields,
)
from hf_transfer.errors import HfTransferError
from hf_transfer.recipe import AdaptationConfig, Recipe
from hf_transfer.sources.pooling import PooledFeatures
from hf_transfer.tasks import task_builder
from hf_transfer.training.plan import Plan

Split = tuple[torch.Tensor, torch.Tensor]  # (features, labels)
SPLITS = ("train", "validation")  # a domain's examples: both splits (the target is used whole)


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


def load_target_task(recipe: Recipe, label_names: list[str]) -> Plan:
    """The target read by the recipe's own task builder, so it is preprocessed exactly as the source."""
    try:
        target = task_builder(recipe)(target_recipe(recipe))
    except HfTransferError as error:  # an empty target, or one of another modality, named as the target
        raise HfTransferError(
            f"The target (adaptation.target_path {recipe.adaptation.target_path}) cannot be read as {recipe.task} "
            f"data like the source: {error}"
        ) from None
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
    # norm_statistics per_domain: the backbone's BatchNorm statistics the target's features were computed under
    target_norm_statistics: dict[str, torch.Tensor] | None = None


def domain_features(recipe: Recipe, source: Plan, target: Plan, accelerator: Accelerator) -> DomainFeatures:
    """Features of every source and target example, from the per-example store or computed once.

    With norm_statistics per_domain, each domain's under its own BatchNorm statistics (norms.py), re-estimated
    over all of its examples first: the source's, then the target's, which the model keeps.
    """
    for task, role in ((source, "source"), (target, "target")):
        if task.feature_source is None:
            raise HfTransferError(f"The {recipe.task} task cannot provide frozen features for the {role} yet.")
    per_domain = per_domain_statistics(recipe, source.model)
    encoder = PooledFeatures(source.model, recipe.adaptation.features).to(accelerator.device)
    preprocessing = f"{source.feature_source.preprocessing}; {recipe.adaptation.features} pooling"
    store = FeatureStore(feature_cache_dir(recipe))
    pretrained = model_key_fields(recipe.model.name, source.model, preprocessing, accelerator.mixed_precision)

    def take_own_statistics(task: Plan) -> None:
        """The domain's statistics into the model: from the store, or estimated once (a pass over its examples)."""
        data = "BatchNorm statistics over " + ", ".join(task.feature_source.fingerprint(split) for split in SPLITS)
        key = FeatureKey(data=data, **pretrained)
        if (stored := store.read(key)) is not None:
            source.model.model.load_state_dict(stored, strict=False)
            return
        # loaders of its own: one that persists its workers would otherwise skip the random draw a first pass makes,
        # and the run would go on with other random numbers than a run that finds the statistics stored
        estimate_statistics(source.model, [task.feature_source.loader(split, None) for split in SPLITS],
                            accelerator.device)
        store.write(key, norm_statistics(source.model.model))

    def features_of(task: Plan) -> dict[str, Split]:
        # one entry per backbone (its statistics included), preprocessing, pooling and precision, in the run's
        # feature cache folder
        fields = pretrained
        if per_domain:
            take_own_statistics(task)
            fields = model_key_fields(recipe.model.name, source.model, preprocessing, accelerator.mixed_precision)
        loaders = {split: task.feature_source.loader(split, None) for split in SPLITS}
        known = ExampleFeatures(store, FeatureKey(data="per example", **fields))
        return {split: extract_features(encoder, loader, accelerator.device, accelerator.autocast, known=known,
                                        desc=f"features ({split})") for split, loader in loaders.items()}

    source_splits, target_splits = features_of(source), features_of(target)
    return DomainFeatures(
        source_train=source_splits["train"],
        source_validation=source_splits["validation"],
        target=(torch.cat([f for f, _ in target_splits.values()]), torch.cat([y for _, y in target_splits.values()])),
        target_norm_statistics=norm_statistics(source.model.model) if per_domain else None,
    )


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
