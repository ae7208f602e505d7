"""Task image: a timm backbone with a new head, on images decoded and transformed on the fly."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from timm.models import save_for_hf
from timm.models._hub import (
    save_config_for_hf,  # not re-exported by timm.models; the config half of save_for_hf
)

from hf_transfer.cache.head import FeatureSource
from hf_transfer.cache.store import dataset_fingerprint
from hf_transfer.data.augmented import training_image_loader
from hf_transfer.data.images import (
    image_loader,
    image_num_workers,
    image_transforms,
    load_image_splits,
    with_transform,
)
from hf_transfer.data.splits import column_values
from hf_transfer.export.layout import CONFIG_FILE, HEAD_INFO_FILE, MERGED_DIR
from hf_transfer.recipe import Recipe
from hf_transfer.sources.base import contiguous_weights
from hf_transfer.sources.vision import (
    VisionClassifier,
    load_vision_model,
    model_data_config,
)
from hf_transfer.strategies import apply_strategy, get_strategy, merged_copy
from hf_transfer.training.mixing import BatchMixing, mixing_requested
from hf_transfer.training.plan import Plan

EVAL_CONFIG_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")


def eval_data_config(data_config: dict[str, Any]) -> dict[str, Any]:
    """The part of timm's data config that preprocessing at inference needs (saved in config.json)."""
    return {k: data_config[k] for k in EVAL_CONFIG_KEYS if k in data_config}


def head_info(recipe: Recipe, classifier: str) -> dict[str, Any]:
    return {
        "format": 1,
        "head": dataclasses.asdict(recipe.head),
        "classifier": classifier,
        "source_model": dataclasses.asdict(recipe.model),
        "image_size": recipe.data.image_size,
        "strategy": recipe.strategy.name,
    }


def _write_head_info(folder: Path, recipe: Recipe, classifier: str) -> None:
    (folder / HEAD_INFO_FILE).write_text(json.dumps(head_info(recipe, classifier), indent=2) + "\n")


def loadable_by_transformers(config_file: Path) -> None:
    """timm (1.0.2x) repeats `num_classes` inside config.json's `model_args`; transformers' TimmWrapper
    passes both and fails. timm reads the top-level `num_classes`, so the repeated one goes."""
    config = json.loads(config_file.read_text())
    if isinstance(config.get("model_args"), dict) and config["model_args"].pop("num_classes", None) is not None:
        config_file.write_text(json.dumps(config, indent=2) + "\n")


def save_vision_model(trained: VisionClassifier, folder: Path, recipe: Recipe, data_config: dict[str, Any]) -> None:
    """timm's Hub layout (config.json with label names + model.safetensors), plus hf_transfer.json.

    A linear head loads back in stock timm (`create_model("local-dir:DIR", pretrained=True)`).
    An mlp/bottleneck head is saved in the same layout but needs `hf-transfer predict` (or
    `hf_transfer.predict.load_saved_model`) to rebuild it. LoRA writes peft's adapter (the head in
    modules_to_save) and, with strategy.merge_lora, a merged stock-timm folder under merged/.
    """
    labels = {"label_names": list(trained.label_names)}
    eval_config = eval_data_config(data_config)
    with contiguous_weights(trained.model) as model:
        if get_strategy(recipe.strategy).saves_adapter:
            model.save_pretrained(folder)  # adapter_config.json + adapter_model.safetensors
            save_config_for_hf(model.get_base_model(), folder / CONFIG_FILE, model_config=labels, data_config=eval_config)
            if recipe.strategy.merge_lora:
                merged = folder / MERGED_DIR
                save_for_hf(merged_copy(model), merged, model_config=labels, safe_serialization=True, data_config=eval_config)
                loadable_by_transformers(merged / CONFIG_FILE)
                _write_head_info(merged, recipe, trained.head_modules[0])
        else:
            save_for_hf(model, folder, model_config=labels, safe_serialization=True, data_config=eval_config)
        loadable_by_transformers(folder / CONFIG_FILE)
    _write_head_info(folder, recipe, trained.head_modules[0])


def build_image_task(recipe: Recipe) -> Plan:
    seed, training, data = recipe.training.seed, recipe.training, recipe.data
    workers = image_num_workers(training.num_workers)
    splits, _ = load_image_splits(data, seed, workers)  # unreadable images dropped (and logged) here
    model = load_vision_model(recipe.model, recipe.head, splits.label_names, data.image_size)
    # preprocessing comes from the model (timm's data config): mean/std/size match its pretraining
    data_config = model_data_config(model.model, data.image_size)
    train_transform, eval_transform = image_transforms(data_config, data.augment)
    eval_set = with_transform(splits.validation, eval_transform, data.image_column)
    callbacks = apply_strategy(model, recipe.strategy)
    if mixing_requested(data.augment):
        callbacks.append(BatchMixing(data.augment, len(splits.label_names), seed))

    def feature_loader(split: str, view: int | None):
        # dataset order; view None: the eval transform, view k: the training augmentation
        images = splits.train if split == "train" else splits.validation
        transform = train_transform if view is not None else eval_transform
        return image_loader(with_transform(images, transform, data.image_column), training.eval_batch_size, False, workers, seed)

    def train_loader(batch_size: int):
        # each example's augmentation depends on (seed, epoch, index) only, so a resumed run is exact
        return training_image_loader(splits.train, train_transform, data.image_column, batch_size, workers, seed)

    return Plan(
        model=model,
        train_loader=train_loader(training.batch_size),
        train_loader_for=train_loader,
        eval_loader=image_loader(eval_set, training.eval_batch_size, False, workers, seed),
        label_names=splits.label_names,
        train_labels=column_values(splits.train, "label"),
        save=lambda folder: save_vision_model(model, folder, recipe, data_config),
        callbacks=callbacks,
        feature_source=FeatureSource(
            loader=feature_loader,
            fingerprint=lambda split: dataset_fingerprint(
                splits.train if split == "train" else splits.validation, file_column=data.image_column
            ),
            preprocessing=f"eval: {eval_transform!r}; train: {train_transform!r}",
            augmented=True,
        ),
    )
