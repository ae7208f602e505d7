"""Task text: a transformers encoder with a sequence-classification head, on tokenised text."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hf_transfer.cache.head import FeatureSource
from hf_transfer.cache.projection import TextTargets
from hf_transfer.cache.store import dataset_fingerprint
from hf_transfer.data.splits import column_values
from hf_transfer.data.text import load_text_splits, text_loader, token_ids_used, tokenize
from hf_transfer.errors import HfTransferError
from hf_transfer.export.card import base_model_id
from hf_transfer.export.folder import read_json
from hf_transfer.export.layout import (
    CONFIG_FILE,
    DENSE_DIR,
    MERGED_DIR,
    POOLING_DIR,
    SENTENCE_CONFIG_FILE,
    SENTENCE_MODULES_FILE,
)
from hf_transfer.recipe import Recipe
from hf_transfer.sources.pooling import masked_mean
from hf_transfer.sources.text import (
    MeanPooledClassifier,
    load_text_model,
    load_tokenizer,
    pooling_mode,
    resolve_pooling,
    usable_max_length,
)
from hf_transfer.strategies import apply_strategy, get_strategy, merged_copy
from hf_transfer.training.compact_embeddings import CompactWordEmbeddings
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


def save_mean_pooled(model: nn.Module, tokenizer: Any, folder: Path, max_length: int) -> None:
    """A sentence-transformers folder: the encoder (LoRA folded in) and tokenizer at the top, mean
    pooling, and the linear head as a Dense layer with no activation, so `encode` returns the logits.

    Written by hand in the module format sentence-transformers has read since version 2 (its own
    `save` would make it a dependency of every run); tests load it back with the stock library.
    """
    from safetensors.torch import save_file

    classifier: MeanPooledClassifier = merged_copy(model)
    classifier.save_encoder(folder)
    tokenizer.save_pretrained(folder)
    hidden, labels = classifier.classifier.in_features, classifier.classifier.out_features
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": POOLING_DIR, "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": DENSE_DIR, "type": "sentence_transformers.models.Dense"},
    ]
    pooling = {
        "word_embedding_dimension": hidden, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True,
        "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False,
    }
    dense = {"in_features": hidden, "out_features": labels, "bias": True,
             "activation_function": "torch.nn.modules.linear.Identity"}
    (folder / POOLING_DIR).mkdir(exist_ok=True)
    (folder / DENSE_DIR).mkdir(exist_ok=True)
    for path, values in (
        (folder / SENTENCE_MODULES_FILE, modules),
        (folder / SENTENCE_CONFIG_FILE, {"max_seq_length": max_length, "do_lower_case": False}),
        (folder / POOLING_DIR / CONFIG_FILE, pooling),
        (folder / DENSE_DIR / CONFIG_FILE, dense),
    ):
        path.write_text(json.dumps(values, indent=2) + "\n")
    head = classifier.classifier.state_dict()
    save_file({f"linear.{name}": tensor.contiguous() for name, tensor in head.items()},
              str(folder / DENSE_DIR / "model.safetensors"))


def load_mean_pooled(folder: Path, trust_remote_code: bool = False) -> nn.Module:
    """A mean-pooled run's sentence-transformers folder rebuilt as the classifier it trained:
    the encoder, the mean of its token states, the Dense layer as the linear head."""
    from safetensors.torch import load_file
    from transformers import AutoModel

    if pooling_mode(read_json(folder / POOLING_DIR / CONFIG_FILE)) != "mean":
        raise HfTransferError(f"{folder} is a sentence-transformers folder without mean pooling; hf-transfer did not write it.")
    dense = read_json(folder / DENSE_DIR / CONFIG_FILE)
    encoder = AutoModel.from_pretrained(folder, use_safetensors=True, trust_remote_code=trust_remote_code)
    model = MeanPooledClassifier(encoder, int(dense["out_features"]), dropout=0.0)
    weights = load_file(str(folder / DENSE_DIR / "model.safetensors"))
    model.classifier.load_state_dict({name.removeprefix("linear."): tensor for name, tensor in weights.items()})
    return model


def require_mean_pooled_run(folder: Path) -> None:
    """head.text_run must name the output folder of a mean-pooled text run (a sentence-transformers folder)."""
    if not (folder / SENTENCE_MODULES_FILE).is_file():
        what = "does not exist" if not folder.exists() else "is not a mean-pooled text run (no modules.json)"
        raise HfTransferError(f"head.text_run {folder} {what}: give the output folder of a text run trained with "
                              "head.pooling mean (the default for sentence-transformers sources).")


@torch.no_grad()
def text_run_targets(folder: Path, texts: list[str], label_names: list[str], batch_size: int = 64) -> TextTargets:
    """A mean-pooled text run's features of `texts` and its head, its rows in the order of `label_names`:
    what the adaptation layer of speech->text transfer fits to (cache/projection.py)."""
    from transformers import AutoTokenizer

    require_mean_pooled_run(folder)
    model = load_mean_pooled(folder).eval()
    id2label = read_json(folder / CONFIG_FILE).get("id2label") or {}
    run_labels = [id2label.get(str(i)) for i in range(model.classifier.out_features)]
    if sorted(map(str, run_labels)) != sorted(label_names):
        raise HfTransferError(f"The audio data's labels {sorted(label_names)} are not the text run's {run_labels} "
                              f"({folder}); give the clips the text run's label names.")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    max_length = int(read_json(folder / SENTENCE_CONFIG_FILE).get("max_seq_length", 128))
    features = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(texts[start:start + batch_size], padding=True, truncation=True, max_length=max_length,
                          return_tensors="pt")
        states = model.encoder(**batch).last_hidden_state
        features.append(masked_mean(states, batch["attention_mask"]))
    rows = [run_labels.index(name) for name in label_names]
    return TextTargets(features=torch.cat(features), weight=model.classifier.weight[rows].clone(),
                       bias=model.classifier.bias[rows].clone(), run=str(folder))


def build_text_task(recipe: Recipe) -> Plan:
    seed, training = recipe.training.seed, recipe.training
    splits = load_text_splits(recipe.data, seed)
    tokenizer = load_tokenizer(recipe.model)
    # domain adaptation pools as adaptation.features says: on frozen features, through the source's own model;
    # with the backbone in the loop, the classifier itself reads that pooling
    pooling = resolve_pooling(recipe.head.pooling, recipe.model)
    if recipe.adaptation.target_path:
        pooling = recipe.adaptation.features if get_strategy(recipe.strategy).trains_backbone else "head_input"
    model = load_text_model(recipe.model, splits.label_names, pooling, recipe.head.dropout)
    data = dataclasses.replace(recipe.data, max_length=usable_max_length(recipe.data.max_length, model, tokenizer))
    train_set = tokenize(splits.train, tokenizer, data)
    eval_set = tokenize(splits.validation, tokenizer, data)
    # tokenised text collates in microseconds: worker processes would only add start-up cost
    workers = training.num_workers if training.num_workers is not None else 0
    batching = dict(group_by_length=recipe.data.group_by_length, pad_to_multiple_of=recipe.data.pad_to_multiple_of,
                    length_window=recipe.data.length_window)
    callbacks = apply_strategy(model, recipe.strategy)
    compact = CompactWordEmbeddings(token_ids_used(train_set, tokenizer), training.optimizer, training.weight_decay)
    if training.compact_embeddings:
        callbacks.append(compact)
    merged = get_strategy(recipe.strategy).saves_adapter and recipe.strategy.merge_lora

    def feature_loader(split: str, _view: int | None):
        # length-sorted batches: the fastest pass, and order does not matter to the cache
        dataset = train_set if split == "train" else eval_set
        return text_loader(dataset, tokenizer, training.eval_batch_size, False, workers, seed, group_by_length=True)

    def train_loader(batch_size: int):
        return text_loader(train_set, tokenizer, batch_size, True, workers, seed, **batching)

    return Plan(
        model=model,
        train_loader=train_loader(training.batch_size),
        train_loader_for=train_loader,
        eval_loader=text_loader(eval_set, tokenizer, training.eval_batch_size, False, workers, seed, **batching),
        label_names=splits.label_names,
        train_labels=column_values(splits.train, "label"),
        save=(
            (lambda folder: save_mean_pooled(model.model, tokenizer, folder, data.max_length)) if pooling == "mean"
            else (lambda folder: save_text_model(model.model, tokenizer, folder, merged, base_model_id(recipe)))
        ),
        callbacks=callbacks,
        summary=lambda _accelerator: {"text_pooling": pooling, "word_embedding_rows_trained": compact.rows_trained},
        # token ids are the whole preprocessing, and the fingerprints hash them
        feature_source=FeatureSource(
            loader=feature_loader,
            fingerprint=lambda split: dataset_fingerprint(train_set if split == "train" else eval_set),
            preprocessing="token ids",
        ),
    )
