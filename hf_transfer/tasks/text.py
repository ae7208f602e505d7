"""Task text: a transformers encoder with a sequence-classification head, on tokenised text."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from torch import nn

from hf_transfer.cache.head import FeatureSource
from hf_transfer.cache.store import dataset_fingerprint
from hf_transfer.data.text import load_text_splits, text_loader, tokenize
from hf_transfer.export.card import base_model_id
from hf_transfer.export.layout import MERGED_DIR
from hf_transfer.recipe import Recipe
from hf_transfer.sources.text import load_text_model, load_tokenizer, usable_max_length
from hf_transfer.strategies import apply_strategy, get_strategy, merged_copy
from hf_transfer.training.plan import Plan


def save_text_model(model: nn.Module, tokenizer: Any, folder: Path, merged: bool, base_id: str | None = None) -> None:
    """`save_pretrained` folders: the model (a peft model writes only its adapter and head) and its
    tokenizer; with `merged`, also the model with LoRA folded in, under merged/.

    peft records the folder the base model was read from (for a packaged offline copy, a path inside
    site-packages), so an adapter names `base_id`, the source's Hub id, instead: pushed, it loads anywhere.
    """
    for adapter in getattr(model, "peft_config", {}).values() if base_id else ():
        adapter.base_model_name_or_path = base_id  # what peft writes into adapter_config.json
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if merged:
        merged_copy(model).save_pretrained(folder / MERGED_DIR)
        tokenizer.save_pretrained(folder / MERGED_DIR)


def build_text_task(recipe: Recipe) -> Plan:
    seed, training = recipe.training.seed, recipe.training
    splits = load_text_splits(recipe.data, seed)
    tokenizer = load_tokenizer(recipe.model)
    model = load_text_model(recipe.model, splits.label_names)
    data = dataclasses.replace(recipe.data, max_length=usable_max_length(recipe.data.max_length, model, tokenizer))
    train_set = tokenize(splits.train, tokenizer, data)
    eval_set = tokenize(splits.validation, tokenizer, data)
    # tokenised text collates in microseconds: worker processes would only add start-up cost
    workers = training.num_workers if training.num_workers is not None else 0
    batching = dict(group_by_length=recipe.data.group_by_length, pad_to_multiple_of=recipe.data.pad_to_multiple_of)
    callbacks = apply_strategy(model, recipe.strategy)
    merged = get_strategy(recipe.strategy).saves_adapter and recipe.strategy.merge_lora

    def feature_loader(split: str, _view: int | None):
        # length-sorted batches: the fastest pass, and order does not matter to the cache
        dataset = train_set if split == "train" else eval_set
        return text_loader(dataset, tokenizer, training.eval_batch_size, False, workers, seed, group_by_length=True)

    return Plan(
        model=model,
        train_loader=text_loader(train_set, tokenizer, training.batch_size, True, workers, seed, **batching),
        eval_loader=text_loader(eval_set, tokenizer, training.eval_batch_size, False, workers, seed, **batching),
        label_names=splits.label_names,
        train_labels=list(splits.train["label"]),
        save=lambda folder: save_text_model(model.model, tokenizer, folder, merged, base_model_id(recipe)),
        callbacks=callbacks,
        # token ids are the whole preprocessing, and the fingerprints hash them
        feature_source=FeatureSource(
            loader=feature_loader,
            fingerprint=lambda split: dataset_fingerprint(train_set if split == "train" else eval_set),
            preprocessing="token ids",
        ),
    )
