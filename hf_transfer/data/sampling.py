"""Batching text by length, and padding batches fast.

Real sentences are short and vary (SST-2 averages 13 tokens, its longest is over 60): padding every
batch to a fixed 128 multiplies the work, and even per-batch padding pays for the longest text in
a random batch. Grouping texts of similar length into a batch removes most padding; padding to a
multiple of 8 or 16 keeps the number of distinct batch shapes small, which CUDA graphs and
torch.compile need. transformers' `LengthGroupedSampler` does the grouping for `Trainer` but
yields indices, not batches, and leaves the shuffle of the batch order to chance; this sampler
yields whole batches so every batch is exactly one length group.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from itertools import chain

import torch
from torch.utils.data import Sampler

from hf_transfer.recipe import LENGTH_WINDOW


class LengthGroupedBatchSampler(Sampler[list[int]]):
    """Batches of indices of similar length; every index exactly once per epoch.

    shuffle=True: each epoch draws a seeded permutation, sorts windows of `window` batches by length
    (data.length_window), cuts them into batches, and shuffles the order of the batches (the longest batch
    goes first, so a batch size that does not fit in memory fails at once, not hours in).
    shuffle=False: batches in order of length, for evaluation and feature extraction.
    The epoch advances by itself after each full pass; `set_epoch` (Accelerate calls it) pins it.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, shuffle: bool, seed: int = 0,
                 window: int = LENGTH_WINDOW):
        if batch_size < 1 or window < 1:
            raise ValueError("batch_size and window must be >= 1")
        self.lengths = torch.as_tensor(list(lengths), dtype=torch.long)
        self.batch_size, self.shuffle, self.seed, self.window = batch_size, shuffle, seed, window
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._shuffled_batches() if self.shuffle else self._sorted_batches()
        self.epoch += 1
        yield from batches

    def _sorted_batches(self) -> list[list[int]]:
        order = torch.argsort(self.lengths, descending=True, stable=True)
        return [chunk.tolist() for chunk in order.split(self.batch_size)]

    def _shuffled_batches(self) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        permutation = torch.randperm(len(self.lengths), generator=generator)
        window = self.batch_size * self.window  # a multiple of the batch size: only the last batch is short
        batches: list[torch.Tensor] = []
        for group in permutation.split(window):
            by_length = group[torch.argsort(self.lengths[group], descending=True, stable=True)]
            batches.extend(by_length.split(self.batch_size))
        longest = max(range(len(batches)), key=lambda i: int(self.lengths[batches[i]].max()))
        rest = [b for i, b in enumerate(batches) if i != longest]
        shuffled = [rest[i] for i in torch.randperm(len(rest), generator=generator).tolist()]
        return [batch.tolist() for batch in [batches[longest], *shuffled]]


def resolve_pad_multiple(multiple: int | None) -> int:
    """data.pad_to_multiple_of: the recipe's value, else 8 on a CUDA GPU and 1 elsewhere.

    Rounding widths up to 8 feeds tensor cores and bounds the shapes CUDA graphs record; on a CPU
    it only adds work: SST-2 sentences average 13 tokens, and rounding to 8 carried 20% more
    tokens per epoch for nothing (benchmarks/BENCHMARKS.md, text-cpu).
    """
    if multiple is not None:
        return max(1, multiple)
    return 8 if torch.cuda.is_available() else 1


class PadToMultipleCollator:
    """Pads a list of tokenised examples into tensors: `tokenizer.pad` without its per-call cost.

    `DataCollatorWithPadding` goes through `tokenizer.pad`, which checks and converts every
    example in Python (about as long as a small model's GPU step). Examples here come straight
    from our own tokenisation, so the checks are not needed: fill preallocated tensors instead.
    Sequence columns are padded to the batch's longest, rounded up to `multiple`; `input_ids` with
    the tokenizer's pad id, everything else (masks, token types) with 0; `labels` stack as they are.
    """

    def __init__(self, pad_token_id: int, multiple: int | None = None, padding_side: str = "right"):
        self.pad_token_id, self.multiple = pad_token_id, resolve_pad_multiple(multiple)
        self.left = padding_side == "left"

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        lengths = torch.tensor([len(e["input_ids"]) for e in examples])
        width = math.ceil(int(lengths.max()) / self.multiple) * self.multiple
        positions = torch.arange(width)
        # one boolean mask places every token of the batch at once (no Python loop over rows)
        filled = positions >= width - lengths[:, None] if self.left else positions < lengths[:, None]
        batch: dict[str, torch.Tensor] = {}
        for key in examples[0]:
            if key == "labels":
                batch["labels"] = torch.tensor([e["labels"] for e in examples], dtype=torch.long)
                continue
            fill = self.pad_token_id if key == "input_ids" else 0
            padded = torch.full((len(examples), width), fill, dtype=torch.long)
            padded[filled] = torch.tensor(list(chain.from_iterable(e[key] for e in examples)), dtype=torch.long)
            batch[key] = padded
        return batch
