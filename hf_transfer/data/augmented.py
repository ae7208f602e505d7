"""Training images whose random augmentation depends only on (seed, epoch, example).

A DataLoader worker draws augmentations from its own random generators, seeded when the worker
starts and advanced image by image. A run resumed mid-epoch starts new workers at a later batch, so
its generators, and every crop and flip after the checkpoint, differ from those of the run that
was never stopped (and with no workers, from the main process's generators, which dropout shares).
Here each example's transform runs under generators seeded from (seed, epoch, index) alone: the
same image gets the same augmentation in the same epoch however the run was started, with any
number of workers, and the run's own random stream is left untouched.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch
from datasets import Dataset
from torch.utils.data import DataLoader, Sampler
from torch.utils.data import Dataset as TorchDataset

from hf_transfer.data.images import decoded_image


def example_seed(seed: int, epoch: int, index: int) -> int:
    digest = hashlib.blake2b(f"{seed}/{epoch}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # a non-negative 63-bit seed


@contextmanager
def seeded_generators(seed: int) -> Iterator[None]:
    """Python's, numpy's and torch's CPU generators seeded for one draw, then put back as they were."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        yield
    random.setstate(python_state)
    np.random.set_state(numpy_state)


class EpochKeyedSampler(Sampler[tuple[int, int]]):
    """A seeded shuffle of the examples per epoch that yields (epoch, index), the key of each draw.

    The order depends on (seed, epoch) only; `set_epoch` pins the epoch (the loop calls it), and
    the epoch also advances by itself after each full pass.
    """

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + epoch))
        self.epoch += 1
        return ((epoch, index) for index in order.tolist())


class AugmentedImages(TorchDataset):
    """Images decoded and augmented on access, each under generators seeded from (seed, epoch, index)."""

    def __init__(self, images: Dataset, transform: Callable, column: str, seed: int):
        self.images, self.transform, self.column, self.seed = images, transform, column, seed

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, index = key
        row = self.images[index]
        with seeded_generators(example_seed(self.seed, epoch, index)):
            pixels = self.transform(decoded_image(row[self.column]))
        return {"pixel_values": pixels, "labels": row["label"]}


def training_image_loader(
    images: Dataset, transform: Callable, column: str, batch_size: int, num_workers: int, seed: int
) -> DataLoader:
    dataset = AugmentedImages(images, transform, column, seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=EpochKeyedSampler(len(dataset), seed),
        num_workers=num_workers,
        persistent_workers=num_workers > 0,  # no re-forking of decoders every epoch
        pin_memory=torch.cuda.is_available(),
        drop_last=len(dataset) % batch_size == 1,  # a last training batch of one image breaks BatchNorm in train mode
    )
