"""The head-only plan: with a frozen backbone, compute its features once and train the head on them.

With `freeze_backbone` every epoch pushes every example through a backbone that never changes;
only the head learns. So the features (`TransferModel.features`, the head's input) are computed once,
in eval mode without gradients, kept in the feature store (store.py), and a head-only model trains
on them through the same loop: each epoch after the first costs only the head.

The head-only model holds the very head module of the full model (the same parameters), so training
it trains the full model's head in place, and the run saves the normal full model, loadable exactly
as without the cache.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, Dataset

from hf_transfer.cache.solver import (
    HeadFitter,
    SolvedHeadTrainer,
    fit_logistic_head,
    solver_blocker,
)
from hf_transfer.cache.store import (
    FeatureKey,
    FeatureStore,
    extract_features,
    model_key_fields,
)
from hf_transfer.console import say
from hf_transfer.errors import HfTransferError
from hf_transfer.recipe import Recipe, StrategyConfig
from hf_transfer.sources.base import TransferModel
from hf_transfer.strategies import get_strategy
from hf_transfer.training.plan import Callback, Plan

logger = logging.getLogger(__name__)


@dataclass
class FeatureSource:
    """What a task gives the cache.

    `loader(split, view)` returns an unshuffled loader over "train" or "validation" (any fixed
    order; labels travel with the features): view None without augmentation, view k with the
    training augmentation, seeded by k. `fingerprint(split)` digests a split's data (called only
    when the cache is used) and `preprocessing` describes everything between the data and the model.
    `head_fit`, when set, fits the linear head on the cached features in place of the logistic
    regression (an audio run with head.text_run: the adaptation layer, cache/projection.py); such a
    task cannot run without the cache.
    """

    loader: Callable[[str, int | None], DataLoader]
    fingerprint: Callable[[str], str]
    preprocessing: str
    augmented: bool = False
    head_fit: HeadFitter | None = None


def feature_cache_dir(recipe: Recipe) -> Path:
    training = recipe.training
    return Path(training.feature_cache_dir) if training.feature_cache_dir else recipe.output_dir / "feature_cache"


def head_input_dropout(full: TransferModel) -> float:
    """Dropout the library applies to the head's input in training (kept, so training matches)."""
    rate = getattr(full.model, "drop_rate", None)  # timm: dropout of the pooled features
    if isinstance(rate, (int, float)):
        return float(rate)
    dropout = getattr(full.model, "dropout", None)  # transformers' *ForSequenceClassification
    return float(dropout.p) if isinstance(dropout, nn.Dropout) else 0.0


class HeadOnlyModel(TransferModel):
    """The full model's head, fed cached features. Its parameters are the full model's own."""

    input_names = ("features",)

    def __init__(self, full: TransferModel):
        super().__init__()
        self.model = full.model.get_submodule(full.head_modules[0])
        self.input_dropout = nn.Dropout(head_input_dropout(full))
        self.head_modules = ["model"]
        self.head_prefixes = ["model."]
        self.block_prefixes = []
        self.label_names = full.label_names

    def forward(self, features: torch.Tensor, **_unused: torch.Tensor) -> torch.Tensor:
        return self.model(self.input_dropout(features))

    def features(self, features: torch.Tensor, **_unused: torch.Tensor) -> torch.Tensor:
        return features


class CachedFeatures(Dataset):
    """Cached features (one tensor per view) and labels; `set_view` picks the view batches come from."""

    def __init__(self, views: list[torch.Tensor], labels: torch.Tensor):
        self.views, self.labels, self.view = views, labels, 0

    def set_view(self, epoch: int) -> None:
        self.view = epoch % len(self.views)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"features": self.views[self.view][index], "labels": self.labels[index]}

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        # one gather per batch instead of one tensor per example (DataLoader calls this when present)
        index = torch.as_tensor(indices, device=self.labels.device)
        return {"features": self.views[self.view][index], "labels": self.labels[index]}


class CachedView(Callback):
    """Epoch e trains on augmented view e mod K of the cached training features."""

    # kept eager as before the callbacks existed: cached heads have never been measured under CUDA graphs
    cuda_graphs_blocker = "the cached training view changes between epochs"

    def __init__(self, dataset: CachedFeatures):
        self.dataset = dataset

    def on_epoch_begin(self, loop, epoch: int) -> None:
        self.dataset.set_view(epoch)


def prebuilt_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """collate_fn for datasets whose `__getitems__` already builds the whole batch (one gather)."""
    return batch


def cached_loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int, drop_last: bool = False) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        collate_fn=prebuilt_batch,
        drop_last=drop_last,
        generator=torch.Generator().manual_seed(seed) if shuffle else None,
    )


def unsupported_reason(model: TransferModel, config: StrategyConfig) -> str | None:
    """Why the cache cannot serve this run, or None when it can."""
    if get_strategy(config).trains_backbone:
        return f"strategy {config.name} trains backbone weights (the cache serves freeze_backbone)"
    if len(model.head_modules) != 1:
        return f"the head is {len(model.head_modules)} modules ({model.head_modules}), not one"
    if any(p.requires_grad for _, p in model.backbone_parameters()):
        return "some backbone parameters are trainable"
    return None


@torch.no_grad()
def head_reproduces_model(model: TransferModel, loader: DataLoader, device: torch.device, autocast: Callable) -> bool:
    """Does head(features(x)) give the model's own logits? Checked on a few examples, in eval mode.

    The check is structural (a head that is more than one module, a model that adds something after
    its head), so four examples tell as much as a batch, at an eighth of two backbone passes.
    """
    model.eval()
    batch = next(iter(loader))
    inputs = {k: v[:4].to(device) for k, v in batch.items() if k != "labels"}
    head = model.model.get_submodule(model.head_modules[0])
    with autocast():
        expected = model(**inputs).float()
        from_features = head(model.features(**inputs)).float()
    return torch.allclose(from_features, expected, rtol=1e-2, atol=1e-2 * float(expected.abs().max()) + 1e-5)


def logits_mismatch(plan: Plan, accelerator: Accelerator) -> str | None:
    """Why the head on cached features cannot stand in for the plan's model, or None when it reproduces its logits."""
    plan.model.to(accelerator.device)
    probe = plan.feature_source.loader("validation", None)
    if head_reproduces_model(plan.model, probe, accelerator.device, accelerator.autocast):
        return None
    return "the head on the model's features does not reproduce the model's logits"


def _views_to_cache(source: FeatureSource, requested: int, epochs: int) -> list[int | None]:
    if not source.augmented or requested <= 1:
        return [None]
    return list(range(min(requested, epochs)))  # more views than epochs would never be used


class FeatureExtraction:
    """Reads each split's features from the store, or computes and stores them; counts hits and misses."""

    def __init__(self, model: TransferModel, store: FeatureStore, accelerator: Accelerator):
        self.model, self.store, self.accelerator = model, store, accelerator
        self.hits: list[str] = []
        self.misses: list[str] = []

    def features(self, key: FeatureKey, make_loader: Callable[[], DataLoader], seed: int, name: str):
        stored = self.store.load(key)
        if stored is not None:
            self.hits.append(name)
            return stored
        started = time.perf_counter()
        # augmentation draws from the global generators: seed them per view, and leave the run's own
        # random stream exactly as it was, so a cache hit and a miss train identically
        python_state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            random.seed(seed)
            torch.manual_seed(seed)
            features, labels = extract_features(
                self.model, make_loader(), self.accelerator.device, self.accelerator.autocast, desc=f"features ({name})"
            )
        random.setstate(python_state)
        self.store.save(key, features, labels)
        self.misses.append(name)
        logger.info("cached %s features %s in %.1f s", name, tuple(features.shape), time.perf_counter() - started)
        return features, labels


def cached_training_features(recipe: Recipe, plan: Plan, accelerator: Accelerator, extraction: FeatureExtraction,
                             views: list[int | None]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The training split's cached features, one tensor per view (computed where missing), and its labels."""
    model, source, training = plan.model, plan.feature_source, recipe.training
    common = model_key_fields(recipe.model.name, model, source.preprocessing, accelerator.mixed_precision)
    train_views: list[torch.Tensor] = []
    train_labels: torch.Tensor | None = None
    train_fingerprint = source.fingerprint("train")
    for view in views:
        key = FeatureKey(data=train_fingerprint, view=view, seed=None if view is None else training.seed, **common)
        name = "train" if view is None else f"train view {view}"
        features, labels = extraction.features(
            key, lambda v=view: source.loader("train", v), training.seed + 1000 * (view or 0), name
        )
        if train_labels is not None and not torch.equal(labels, train_labels.cpu()):
            raise HfTransferError("The augmented views came back in different orders; the feature loader must not shuffle.")
        train_labels = labels.to(accelerator.device)
        train_views.append(features.to(accelerator.device))
    return train_views, train_labels


def cached_validation_features(recipe: Recipe, plan: Plan, accelerator: Accelerator,
                               extraction: FeatureExtraction) -> tuple[torch.Tensor, torch.Tensor]:
    """The validation split's cached features and labels, on the accelerator (computed where missing)."""
    source = plan.feature_source
    common = model_key_fields(recipe.model.name, plan.model, source.preprocessing, accelerator.mixed_precision)
    key = FeatureKey(data=source.fingerprint("validation"), **common)
    features, labels = extraction.features(key, lambda: source.loader("validation", None), recipe.training.seed,
                                           "validation")
    return features.to(accelerator.device), labels.to(accelerator.device)


def head_only_plan(recipe: Recipe, plan: Plan, accelerator: Accelerator) -> Plan:
    """The plan with its head on cached features of both splits (computing the missing ones)."""
    model, source, training = plan.model, plan.feature_source, recipe.training
    # refused before any feature is computed: the solver's conditions are known from the head module alone
    blocker = solver_blocker(recipe, model.model.get_submodule(model.head_modules[0]))
    if blocker is not None and recipe.head.solver == "logistic":
        raise HfTransferError(f"head.solver is logistic, but {blocker}. Set head.solver auto or loop.")
    device = accelerator.device
    model.to(device)
    extraction = FeatureExtraction(model, FeatureStore(feature_cache_dir(recipe)), accelerator)
    features, labels = cached_validation_features(recipe, plan, accelerator, extraction)
    eval_set = CachedFeatures([features], labels)
    views = _views_to_cache(source, training.cache_views, training.epochs)
    train_views, train_labels = cached_training_features(recipe, plan, accelerator, extraction, views)
    train_set = CachedFeatures(train_views, train_labels)
    augmentation = ""
    if source.augmented:
        augmentation = (
            "; training augmentation off (training.cache_views=1)" if training.cache_views == 1
            else f"; {len(train_views)} augmented views"
        )
    say(accelerator,
        f"frozen-feature cache: the head trains on cached features (hits: {extraction.hits or 'none'}; "
        f"computed: {extraction.misses or 'none'}){augmentation}"
    )
    report = {"feature_cache": {"hits": extraction.hits, "computed": extraction.misses}}
    fit_head = source.head_fit or fit_logistic_head
    solver = SolvedHeadTrainer(train_views, train_labels, fit_head) if blocker is None else None
    return dataclasses.replace(
        plan,
        model=HeadOnlyModel(model),
        train_loader=cached_loader(train_set, training.batch_size, shuffle=True, seed=training.seed),
        train_loader_for=lambda batch_size: cached_loader(train_set, batch_size, shuffle=True, seed=training.seed),
        eval_loader=cached_loader(eval_set, training.batch_size, shuffle=False, seed=training.seed),
        callbacks=[*plan.callbacks, CachedView(train_set)],
        summary=lambda accelerator: plan.summary(accelerator) | report | (solver.summary() if solver else {}),
        feature_source=None,
        trainer=solver,
    )


def split_features(recipe: Recipe, model: TransferModel, source: FeatureSource, accelerator: Accelerator
                   ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, list[str]]]:
    """The frozen features and labels of the unaugmented train and validation splits, read from the
    store or computed into it, and which were hits ({"hits": [...], "computed": [...]}).

    Stored under the very keys `head_only_plan` reads (train: view None), so a later freeze_backbone
    run of the same recipe and model with the same feature cache folder computes nothing again.
    """
    model.to(accelerator.device)
    extraction = FeatureExtraction(model, FeatureStore(feature_cache_dir(recipe)), accelerator)
    common = model_key_fields(recipe.model.name, model, source.preprocessing, accelerator.mixed_precision)
    features = {}
    for split in ("train", "validation"):
        key = FeatureKey(data=source.fingerprint(split), **common)
        features[split] = extraction.features(key, lambda s=split: source.loader(s, None), recipe.training.seed, split)
    return features, {"hits": extraction.hits, "computed": extraction.misses}


def cached_plan(recipe: Recipe, plan: Plan, accelerator: Accelerator) -> Plan | None:
    """The head on cached frozen features when the recipe allows it (training.cache_features), else None."""
    setting = recipe.training.cache_features
    if setting is False:
        return None
    reason = unsupported_reason(plan.model, recipe.strategy)
    if reason is None and plan.feature_source is None:
        reason = f"the {recipe.task} task does not provide features"
    if reason is None and any(callback.mixes_inputs for callback in plan.callbacks):
        reason = "mixup / cutmix blend the training images, and cached features cannot be blended"
    if reason is None:
        reason = logits_mismatch(plan, accelerator)
    if reason is not None:
        if plan.feature_source is not None and plan.feature_source.head_fit is not None:
            raise HfTransferError(f"head.text_run fits its adaptation layer on cached frozen features, but {reason}.")
        if setting is True:
            raise HfTransferError(f"training.cache_features is true, but {reason}. Set it to auto or false.")
        if recipe.head.solver == "logistic":
            raise HfTransferError(f"head.solver logistic needs the frozen-feature cache, but {reason}. Set head.solver auto.")
        if recipe.strategy.name == "freeze_backbone":
            say(accelerator, f"frozen-feature cache not used: {reason}")
        return None
    return head_only_plan(recipe, plan, accelerator)
