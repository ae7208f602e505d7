"""Frozen features stored per example, keyed by a digest of that example's own model inputs.

features.py caches a whole split under a digest of the split's content: the right unit when one
run's splits are reused as they are. Domain adaptation draws the source's validation split with each
seed and reads the same domain as a source in one recipe and a target in another, so there the same
examples come back in ever different splits. Keyed per example, any split, order or seed of
examples already seen is a hit, and only new examples go through the backbone.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

DIGEST_BYTES = 16


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


class ExampleFeatureStore:
    """Features by example digest, in one safetensors file (one file per model and preprocessing)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.rows: dict[bytes, torch.Tensor] = {}
        self.changed = False
        if self.path.is_file():
            self._load()

    def _load(self) -> None:
        from safetensors.torch import load_file

        try:
            stored = load_file(str(self.path))
        except Exception:  # a truncated or foreign file is a miss, not a crash
            return
        digests = stored["digests"].numpy()
        self.rows = {bytes(d): f for d, f in zip(digests, stored["features"])}

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
        """Written to a temporary name and renamed: a killed run never leaves half a file."""
        if not self.changed:
            return
        from safetensors.torch import save_file

        self.path.parent.mkdir(parents=True, exist_ok=True)
        digests = np.frombuffer(b"".join(self.rows), dtype=np.uint8).reshape(-1, DIGEST_BYTES)
        tensors = {"digests": torch.from_numpy(digests.copy()), "features": torch.stack(list(self.rows.values()))}
        temporary = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        save_file(tensors, str(temporary))
        os.replace(temporary, self.path)
        self.changed = False


@torch.no_grad()
def stored_features(
    model: nn.Module, loader: DataLoader, store: ExampleFeatureStore, device: torch.device, autocast: Callable
) -> tuple[torch.Tensor, torch.Tensor]:
    """`model.features` of every batch (float32, CPU) and its labels; only unseen batches run the model."""
    model.eval()
    features, labels = [], []
    for batch in loader:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        digests = example_digests(inputs)
        known = store.lookup(digests)
        if known is None:
            with autocast():
                known = model.features(**{k: v.to(device) for k, v in inputs.items()}).float().cpu()
            store.add(digests, known)
        features.append(known)
        labels.append(batch["labels"].cpu())
    store.save()
    return torch.cat(features), torch.cat(labels)
