"""Text data: labelled splits tokenised by the source model's tokenizer, padded per batch."""

from __future__ import annotations

import hashlib

import pyarrow.compute as arrow_compute
import torch
from datasets import Dataset
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from hf_transfer.data.sampling import LengthGroupedBatchSampler, PadToMultipleCollator
from hf_transfer.data.splits import LabelledSplits, column_values, labelled_splits, load_raw
from hf_transfer.recipe import LENGTH_WINDOW, DataConfig


def load_text_splits(config: DataConfig, seed: int) -> LabelledSplits:
    columns = [config.text_column] + ([config.text_pair_column] if config.text_pair_column else [])
    return labelled_splits(load_raw(config), config, columns, seed)


def tokenize(dataset: Dataset, tokenizer: PreTrainedTokenizerBase, config: DataConfig) -> Dataset:
    """Token ids without padding (batches pad to their own longest text), plus `labels`."""

    def encode(batch: dict) -> dict:
        texts = [str(t) for t in batch[config.text_column]]
        pairs = [str(t) for t in batch[config.text_pair_column]] if config.text_pair_column else None
        return tokenizer(texts, pairs, truncation=True, max_length=config.max_length)

    encoded = dataset.map(encode, batched=True, remove_columns=[c for c in dataset.column_names if c != "label"],
                          new_fingerprint=_tokenized_fingerprint(dataset, tokenizer, config))
    return encoded.rename_column("label", "labels")


def _tokenized_fingerprint(dataset: Dataset, tokenizer: PreTrainedTokenizerBase, config: DataConfig) -> str | None:
    """What `datasets` would fingerprint the tokenised split by, computed in milliseconds.

    `map` fingerprints its function by pickling it, here with the tokenizer and its whole
    vocabulary: seconds per split. A fast tokenizer's own serialisation (vocabulary, normaliser,
    special-token template) plus our settings says the same. None: `datasets` hashes as usual.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    digest = hashlib.blake2b(digest_size=16)
    for part in (dataset._fingerprint, backend.to_str(), type(tokenizer).__name__, tokenizer.model_input_names,
                 config.text_column, config.text_pair_column, config.max_length):
        digest.update(repr(part).encode())
    return digest.hexdigest()


def text_loader(
    dataset: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    batch_size: int,
    shuffle: bool,
    num_workers: int,
    seed: int,
    group_by_length: bool = True,
    pad_to_multiple_of: int | None = None,
    length_window: int = LENGTH_WINDOW,
) -> DataLoader:
    """Batches padded to their own longest text (rounded up to `pad_to_multiple_of`).

    `group_by_length` puts texts of similar length together (see data/sampling.py): evaluation
    batches in length order, training batches drawn from shuffled windows of `length_window` batches.
    """
    collator = PadToMultipleCollator(tokenizer.pad_token_id or 0, pad_to_multiple_of, tokenizer.padding_side)
    common = dict(collate_fn=collator, num_workers=num_workers, pin_memory=torch.cuda.is_available())
    if group_by_length:
        lengths = [len(ids) for ids in column_values(dataset, "input_ids")]
        sampler = LengthGroupedBatchSampler(lengths, batch_size, shuffle, seed, length_window)
        return DataLoader(dataset, batch_sampler=sampler, **common)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=torch.Generator().manual_seed(seed) if shuffle else None,
        **common,
    )


def token_ids_used(dataset: Dataset, tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """The distinct token ids of a tokenised split and the id its batches are padded with, sorted; read from Arrow
    at once (a list per row would take seconds on SST-2's 67,349 sentences)."""
    column = dataset.with_format("arrow")["input_ids"]
    ids = arrow_compute.unique(arrow_compute.list_flatten(column)).to_numpy().astype("int64")
    return torch.cat([torch.from_numpy(ids), torch.tensor([tokenizer.pad_token_id or 0])]).unique()
