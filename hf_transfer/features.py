"""The frozen-feature cache: with a frozen backbone, compute its features once and train the head on them.

With `freeze_backbone` every epoch pushes every example through a backbone that never changes;
only the head learns. So the features (`TransferModel.features`, the head's input) are computed once,
in eval mode without gradients, stored as safetensors, and a head-only model trains on them through
the same trainer: each epoch after the first costs only the head.

The head-only model holds the very head module of the full model (the same parameters), so training
it trains the full model's head in place, and the run saves the normal full model, loadable exactly
as without the cache.

A cache file is keyed by everything its features depend on: the model (name, class and a digest of
every backbone tensor), the preprocessing, a digest of the data's content, the precision, and the
augmentation view. Change any of them and the key changes, so a stale file is never read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from hf_transfer.errors import HfTransferError
from hf_transfer.sources.base import TransferModel

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when what a file holds changes meaning


# ---------------------------------------------------------------------------------------------
# What a cache file depends on


def _hash_tensors(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    hasher = hashlib.blake2b(digest_size=16)
    for name, tensor in named:
        shape = tensor.shape
        tensor = tensor.detach().to("cpu").contiguous().reshape(-1)  # 0-dim tensors cannot be viewed as bytes
        hasher.update(f"{name}|{tensor.dtype}|{tuple(shape)}|".encode())
        hasher.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return hasher.hexdigest()


def weights_digest(model: TransferModel) -> str:
    """A digest of every backbone tensor (parameters and buffers such as BatchNorm statistics)."""
    state = model.state_dict()
    head = {n for n, _ in model.head_parameters()}
    return _hash_tensors((n, t) for n, t in sorted(state.items()) if n not in head and not model.is_head_parameter(n))


def dataset_fingerprint(dataset: Any, file_column: str | None = None) -> str:
    """A digest of a `datasets.Dataset`'s content, in its row order.

    Images stored as paths hash as paths, so `file_column` adds each file's size and modification
    time: replacing a file on disk changes the fingerprint too.
    """
    import pyarrow as pa

    hasher = hashlib.blake2b(digest_size=16)
    for table in dataset.with_format("arrow").iter(batch_size=8192):
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        hasher.update(sink.getvalue())
    if file_column is not None:
        for value in dataset.with_format(None)[file_column]:
            path = value.get("path") if isinstance(value, dict) else value
            if path and not (isinstance(value, dict) and value.get("bytes")) and os.path.exists(path):
                stat = os.stat(path)
                hasher.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return hasher.hexdigest()


@dataclass(frozen=True)
class FeatureKey:
    """Everything the features of one split (and one augmentation view) depend on."""

    model_name: str
    model_class: str
    weights: str
    preprocessing: str
    data: str
    precision: str
    view: int | None = None  # None: no augmentation; k: the k-th augmented view
    seed: int | None = None  # the augmentation's seed, for augmented views
    format: int = CACHE_FORMAT

    def digest(self) -> str:
        return hashlib.blake2b(json.dumps(asdict(self), sort_keys=True).encode(), digest_size=16).hexdigest()


class FeatureCache:
    """Feature files in a folder, one per key: `<digest>.safetensors` with the key in its metadata."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def path(self, key: FeatureKey) -> Path:
        return self.folder / f"{key.digest()}.safetensors"

    def load(self, key: FeatureKey) -> tuple[torch.Tensor, torch.Tensor] | None:
        from safetensors import safe_open

        path = self.path(key)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as stored:
                if stored.metadata().get("key") != json.dumps(asdict(key), sort_keys=True):
                    return None  # a digest collision or a foreign file: recompute rather than trust it
                return stored.get_tensor("features"), stored.get_tensor("labels")
        except Exception as error:  # a truncated or foreign file is a miss, not a crash
            logger.warning("ignoring unreadable feature cache file %s (%s)", path, error)
            return None

    def save(self, key: FeatureKey, features: torch.Tensor, labels: torch.Tensor) -> Path:
        from safetensors.torch import save_file

        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.path(key)
        temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # renamed into place: never half a file
        tensors = {"features": features.contiguous().cpu(), "labels": labels.contiguous().cpu()}
        save_file(tensors, str(temporary), metadata={"key": json.dumps(asdict(key), sort_keys=True)})
        os.replace(temporary, path)
        return path


# ---------------------------------------------------------------------------------------------
# Computing features, and the model that trains on them


@torch.no_grad()
def extract_features(
    model: TransferModel, loader: DataLoader, device: torch.device, autocast: Callable
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and labels of every batch of `loader`, in eval mode, as float32 on the CPU."""
    model.eval()
    features, labels = [], []
    for batch in loader:
        inputs = {k: v.to(device, non_blocking=True) for k, v in batch.items() if k != "labels"}
        with autocast():
            features.append(model.features(**inputs).float().cpu())
        labels.append(batch["labels"].cpu())
    return torch.cat(features), torch.cat(labels)


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


def prebuilt_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """collate_fn for datasets whose `__getitems__` already builds the whole batch (one gather)."""
    return batch


def cached_loader(dataset: CachedFeatures, batch_size: int, shuffle: bool, seed: int) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        collate_fn=prebuilt_batch,
        generator=torch.Generator().manual_seed(seed) if shuffle else None,
    )


# ---------------------------------------------------------------------------------------------
# From a task to cached training


@dataclass
class FeatureSource:
    """What a modality gives the cache.

    `loader(split, view)` returns an unshuffled loader over "train" or "validation" (any fixed
    order; labels travel with the features): view None without augmentation, view k with the
    training augmentation, seeded by k. `fingerprint(split)` digests a split's data (called only
    when the cache is used) and `preprocessing` describes everything between the data and the model.
    """

    loader: Callable[[str, int | None], DataLoader]
    fingerprint: Callable[[str], str]
    preprocessing: str
    augmented: bool = False


@dataclass
class CachedTraining:
    """What the run trains instead of the full model: the head on cached features."""

    model: HeadOnlyModel
    train_loader: DataLoader
    eval_loader: DataLoader
    on_epoch_start: Callable[[int], None]
    hits: list[str] = field(default_factory=list)
    misses: list[str] = field(default_factory=list)


def unsupported_reason(model: TransferModel, strategy: str) -> str | None:
    """Why the cache cannot serve this run, or None when it can."""
    if strategy != "freeze_backbone":
        return f"strategy {strategy} trains backbone weights (the cache serves freeze_backbone)"
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


def _views_to_cache(source: FeatureSource, requested: int, epochs: int) -> list[int | None]:
    if not source.augmented or requested <= 1:
        return [None]
    return list(range(min(requested, epochs)))  # more views than epochs would never be used


def _cached_or_computed(
    model: TransferModel, cache: FeatureCache, key: FeatureKey, make_loader: Callable[[], DataLoader],
    device: torch.device, autocast: Callable, seed: int, name: str, hits: list[str], misses: list[str],
) -> tuple[torch.Tensor, torch.Tensor]:
    stored = cache.load(key)
    if stored is not None:
        hits.append(name)
        return stored
    started = time.perf_counter()
    # augmentation draws from the global generators: seed them per view, and leave the run's own
    # random stream exactly as it was, so a cache hit and a miss train identically
    python_state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        torch.manual_seed(seed)
        features, labels = extract_features(model, make_loader(), device, autocast)
    random.setstate(python_state)
    cache.save(key, features, labels)
    misses.append(name)
    logger.info("cached %s features %s in %.1f s", name, tuple(features.shape), time.perf_counter() - started)
    return features, labels


def prepare_cached_training(
    model: TransferModel,
    source: FeatureSource,
    *,
    model_name: str,
    cache_dir: Path,
    precision: str,
    device: torch.device,
    autocast: Callable,
    batch_size: int,
    views: int,
    epochs: int,
    seed: int,
) -> CachedTraining:
    """Features of both splits from the cache (computing the missing ones) and a head-only model."""
    model.to(device)
    cache = FeatureCache(cache_dir)
    common = dict(
        model_name=model_name, model_class=type(model.model).__name__, weights=weights_digest(model),
        preprocessing=source.preprocessing, precision=precision,
    )
    hits: list[str] = []
    misses: list[str] = []
    train_views: list[torch.Tensor] = []
    train_labels: torch.Tensor | None = None

    key = FeatureKey(data=source.fingerprint("validation"), **common)
    features, labels = _cached_or_computed(
        model, cache, key, lambda: source.loader("validation", None), device, autocast, seed, "validation", hits, misses
    )
    eval_set = CachedFeatures([features.to(device)], labels.to(device))
    train_fingerprint = source.fingerprint("train")
    for view in _views_to_cache(source, views, epochs):
        key = FeatureKey(data=train_fingerprint, view=view, seed=None if view is None else seed, **common)
        name = "train" if view is None else f"train view {view}"
        features, labels = _cached_or_computed(
            model, cache, key, lambda v=view: source.loader("train", v), device, autocast,
            seed + 1000 * (view or 0), name, hits, misses,
        )
        if train_labels is not None and not torch.equal(labels, train_labels.cpu()):
            raise HfTransferError("The augmented views came back in different orders; the feature loader must not shuffle.")
        train_labels = labels.to(device)
        train_views.append(features.to(device))
    train_set = CachedFeatures(train_views, train_labels)
    return CachedTraining(
        model=HeadOnlyModel(model),
        train_loader=cached_loader(train_set, batch_size, shuffle=True, seed=seed),
        eval_loader=cached_loader(eval_set, batch_size, shuffle=False, seed=seed),
        on_epoch_start=train_set.set_view,
        hits=hits,
        misses=misses,
    )
