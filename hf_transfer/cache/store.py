"""The one store of frozen features, and the one loop that extracts them.

Features are stored as safetensors files in a folder, one file per `FeatureKey`: everything the
features depend on, the model (name, class and a digest of every backbone tensor), the
preprocessing, the data, the precision and the augmentation view. Change any of them and the key
changes, so a stale file is never read; the key is also written into the file and checked on
reading, and a truncated or foreign file is a logged miss, never a crash. Files are written to a
temporary name and renamed, so a killed run never leaves half a file.

Two kinds of entry share the store:
- a whole split (`load` / `save`): features and labels in the split's order, keyed by a digest of
  the split's content; the right unit when one run's splits come back as they are;
- per example (`ExampleFeatures`): features by a digest of each example's own model inputs. Domain
  adaptation draws the source's validation split with each seed and reads the same domain as a
  source in one recipe and a target in another, so the same examples come back in ever different
  splits; keyed per example, any split, order or seed of examples already seen is a hit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from hf_transfer.console import bar
from hf_transfer.sources.base import TransferModel
from hf_transfer.sources.folding import folded_if_same

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when what a file holds changes meaning
DIGEST_BYTES = 16  # per-example digests


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

    def json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    def digest(self) -> str:
        return hashlib.blake2b(self.json().encode(), digest_size=16).hexdigest()


def model_key_fields(model_name: str, model: TransferModel, preprocessing: str, precision: str) -> dict[str, str]:
    """The FeatureKey fields that come from the model and how its inputs are made (all but the data and view)."""
    return dict(model_name=model_name, model_class=type(model.model).__name__, weights=weights_digest(model),
                preprocessing=preprocessing, precision=precision)


class FeatureStore:
    """Feature files in a folder, one per key: `<digest>.safetensors` with the key in its metadata."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def path(self, key: FeatureKey) -> Path:
        return self.folder / f"{key.digest()}.safetensors"

    def read(self, key: FeatureKey) -> dict[str, torch.Tensor] | None:
        """The tensors stored under `key`, or None (absent, foreign or unreadable: a miss)."""
        from safetensors import safe_open

        path = self.path(key)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as stored:
                if stored.metadata().get("key") != key.json():
                    return None  # a digest collision or a foreign file: recompute rather than trust it
                return {name: stored.get_tensor(name) for name in stored.keys()}
        except Exception as error:  # a truncated or foreign file is a miss, not a crash
            logger.warning("ignoring unreadable feature cache file %s (%s)", path, error)
            return None

    def write(self, key: FeatureKey, tensors: dict[str, torch.Tensor]) -> Path:
        from safetensors.torch import save_file

        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.path(key)
        temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # renamed into place: never half a file
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(temporary), metadata={"key": key.json()})
        os.replace(temporary, path)
        return path

    def load(self, key: FeatureKey) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A whole split's (features, labels), or None."""
        stored = self.read(key)
        return None if stored is None else (stored["features"], stored["labels"])

    def save(self, key: FeatureKey, features: torch.Tensor, labels: torch.Tensor) -> Path:
        return self.write(key, {"features": features, "labels": labels})


def example_digests(inputs: dict[str, torch.Tensor]) -> list[bytes]:
    """One digest per row of a batch, from its inputs with the padding removed.

    Padding depends on the batch an example lands in, so token rows are cut to their attention mask.
    """
    mask = inputs.get("attention_mask")
    rows = next(iter(inputs.values())).shape[0]
    digests = []
    for row in range(rows):
        hasher = hashlib.blake2b(digest_size=DIGEST_BYTES)
        for name in sorted(inputs):
            value = inputs[name][row]
            if mask is not None and value.shape == mask[row].shape:
                value = value[mask[row].bool()]
            hasher.update(f"{name}|{value.dtype}|{tuple(value.shape)}|".encode())
            hasher.update(value.detach().cpu().contiguous().numpy().tobytes())
        digests.append(hasher.digest())
    return digests


class ExampleFeatures:
    """Features by example digest: one store entry per model, preprocessing and pooling."""

    def __init__(self, store: FeatureStore, key: FeatureKey):
        self.store, self.key = store, key
        stored = store.read(key)
        self.rows: dict[bytes, torch.Tensor] = {}
        if stored is not None:
            self.rows = {bytes(d): f for d, f in zip(stored["digests"].numpy(), stored["features"])}
        self.changed = False

    def lookup(self, digests: list[bytes]) -> torch.Tensor | None:
        """The features of every digest, stacked, or None if any is missing."""
        if not all(d in self.rows for d in digests):
            return None
        return torch.stack([self.rows[d] for d in digests])

    def add(self, digests: list[bytes], features: torch.Tensor) -> None:
        for digest, row in zip(digests, features):
            self.rows[digest] = row.clone()
        self.changed = True

    def save(self) -> None:
        if not self.changed:
            return
        digests = np.frombuffer(b"".join(self.rows), dtype=np.uint8).reshape(-1, DIGEST_BYTES)
        self.store.write(self.key, {"digests": torch.from_numpy(digests.copy()),
                                    "features": torch.stack(list(self.rows.values()))})
        self.changed = False


@torch.no_grad()  # a backbone being fine-tuned has gradients on; features never need them
def extract_features(
    model: nn.Module, loader: DataLoader, device: torch.device, autocast: Callable,
    known: ExampleFeatures | None = None, desc: str = "features",
) -> tuple[torch.Tensor, torch.Tensor]:
    """`model.features` of every batch of `loader` (eval mode, float32, CPU) and its labels.

    With `known`, a batch whose every example is already stored is read from it, and the others
    run the model and are added (and saved at the end).
    """
    model.eval()
    encoder: nn.Module | None = None  # the model with its BatchNorm folded where that computes the same features
    features, labels = [], []
    for batch in bar(loader, desc=desc, total=len(loader), unit="batch"):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        digests = example_digests(inputs) if known is not None else []
        batch_features = known.lookup(digests) if known is not None else None
        if batch_features is None:
            on_device = {k: v.to(device, non_blocking=True) for k, v in inputs.items()}
            if encoder is None:
                encoder = folded_if_same(model, "features", on_device)
            with autocast():
                batch_features = encoder.features(**on_device).float().cpu()
            if known is not None:
                known.add(digests, batch_features)
        features.append(batch_features)
        labels.append(batch["labels"].cpu())
    if known is not None:
        known.save()
    return torch.cat(features), torch.cat(labels)
