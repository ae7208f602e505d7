"""Text data: labelled splits tokenised by the source model's tokenizer, padded per batch."""

from __future__ import annotations

import torch
from datasets import Dataset
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase

from hf_transfer.data.splits import LabelledSplits, labelled_splits, load_raw
from hf_transfer.recipe import DataConfig


def load_text_splits(config: DataConfig, seed: int) -> LabelledSplits:
    columns = [config.text_column] + ([config.text_pair_column] if config.text_pair_column else [])
    return labelled_splits(load_raw(config), config, columns, seed)


def tokenize(dataset: Dataset, tokenizer: PreTrainedTokenizerBase, config: DataConfig) -> Dataset:
    """Token ids without padding (batches pad to their own longest text), plus `labels`."""

    def encode(batch: dict) -> dict:
        texts = [str(t) for t in batch[config.text_column]]
        pairs = [str(t) for t in batch[config.text_pair_column]] if config.text_pair_column else None
        return tokenizer(texts, pairs, truncation=True, max_length=config.max_length)

    encoded = dataset.map(encode, batched=True, remove_columns=[c for c in dataset.column_names if c != "label"])
    return encoded.rename_column("label", "labels")


def text_loader(
    dataset: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    batch_size: int,
    shuffle: bool,
    num_workers: int,
    seed: int,
) -> DataLoader:
    # multiples of 8 let tensor cores and fused kernels take the fast path, at little padding cost
    collator = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8, return_tensors="pt")
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        collate_fn=collator,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed) if shuffle else None,
    )
