"""Task multimodal: data with an image column and a text column, a two-tower model (sources/two_tower.py).

Each tower is frozen, LoRA-adapted or fine-tuned by the shared strategies (multimodal.image_strategy
and multimodal.text_strategy, or the recipe's strategy), the fusion head always trains, and the
whole model trains in the shared loop like any other task. Saved, each tower is a folder its own
library loads (LoRA merged in), with the fusion head beside them.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from hf_transfer.data.images import (
    image_num_workers,
    image_transforms,
    load_image_splits,
    load_rgb,
)
from hf_transfer.data.sampling import PadToMultipleCollator
from hf_transfer.data.splits import check_columns, column_values
from hf_transfer.errors import HfTransferError
from hf_transfer.export.layout import CONFIG_FILE, FUSION_WEIGHTS_FILE, MULTIMODAL_FILE
from hf_transfer.recipe import (
    DataConfig,
    ModelConfig,
    MultimodalConfig,
    Recipe,
    StrategyConfig,
)
from hf_transfer.sources.base import TransferModel, contiguous_weights
from hf_transfer.sources.two_tower import (
    TOKEN_KEYS,
    TwoTowerClassifier,
    build_fusion,
    load_towers,
)
from hf_transfer.sources.vision import model_data_config
from hf_transfer.strategies import apply_strategy, merged_copy
from hf_transfer.tasks.image import eval_data_config, loadable_by_transformers
from hf_transfer.training.plan import Callback, Plan


def _freeze_unused_classifier(tower: TransferModel) -> None:
    # the fusion head replaces the tower's own classifier: no gradient reaches it, so keep it out
    # of the optimiser and of the trainable-parameter count
    for _, parameter in tower.head_parameters():
        parameter.requires_grad_(False)


def apply_tower_strategies(model: TwoTowerClassifier, config: MultimodalConfig, default: StrategyConfig) -> list[Callback]:
    """Each tower's strategy (or the recipe's), the fusion head always trained; both towers' callbacks."""
    callbacks: list[Callback] = []
    for name, strategy in (("image", config.image_strategy), ("text", config.text_strategy)):
        tower = model.model[name]
        callbacks += apply_strategy(tower, strategy or default)
        _freeze_unused_classifier(tower)
    for parameter in model.model["fusion"].parameters():
        parameter.requires_grad_(True)
    return callbacks


# ---------------------------------------------------------------------------------------------
# Data: an image column and a text column


def multimodal_dataset(dataset: Dataset, tokenizer: Any, transform: Callable, data: DataConfig) -> Dataset:
    """Token ids computed once; images decoded and transformed on access (in the loader's workers)."""
    def encode(batch: dict) -> dict:
        return tokenizer([str(t) for t in batch[data.text_column]], truncation=True, max_length=data.max_length)

    tokenised = dataset.map(encode, batched=True)

    def apply(batch: dict) -> dict:
        out = {k: batch[k] for k in TOKEN_KEYS if k in batch}
        out["pixel_values"] = [transform(load_rgb(value)) for value in batch[data.image_column]]
        out["labels"] = batch["label"]
        return out

    return tokenised.with_transform(apply)


class MultimodalCollator:
    """Stacks the images and pads the texts (to the batch's longest, rounded up to a multiple)."""

    def __init__(self, pad_token_id: int, multiple: int, padding_side: str):
        self.text = PadToMultipleCollator(pad_token_id, multiple, padding_side)

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.text([{k: v for k, v in e.items() if k != "pixel_values"} for e in examples])
        batch["pixel_values"] = torch.stack([e["pixel_values"] for e in examples])
        return batch


def multimodal_loader(dataset: Dataset, collator: MultimodalCollator, batch_size: int, shuffle: bool,
                      workers: int, seed: int) -> DataLoader:
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=collator, num_workers=workers,
        persistent_workers=workers > 0, pin_memory=torch.cuda.is_available(),
        drop_last=shuffle and len(dataset) % batch_size == 1,  # BatchNorm cannot train on one image
        generator=torch.Generator().manual_seed(seed) if shuffle else None,
    )


def build_multimodal_task(recipe: Recipe) -> Plan:
    """The Plan of `task: multimodal` (registered in tasks.TASKS)."""
    data, training, config = recipe.data, recipe.training, recipe.multimodal
    seed = training.seed
    workers = image_num_workers(training.num_workers)
    splits, _ = load_image_splits(data, seed, workers)
    check_columns(splits.train, [data.text_column], "train")
    check_columns(splits.validation, [data.text_column], "validation")
    image_tower, text_tower, tokenizer = load_towers(config, data.image_size)
    data_config = model_data_config(image_tower.model, data.image_size)
    train_transform, eval_transform = image_transforms(data_config, data.augment)
    fusion = build_fusion(
        config, image_tower.model.num_features, text_tower.model.config.hidden_size, len(splits.label_names)
    )
    model = TwoTowerClassifier(image_tower, text_tower, fusion, splits.label_names, config.text_pooling)
    callbacks = apply_tower_strategies(model, config, recipe.strategy)
    collator = MultimodalCollator(tokenizer.pad_token_id or 0, data.pad_to_multiple_of, tokenizer.padding_side)
    train_set = multimodal_dataset(splits.train, tokenizer, train_transform, data)
    eval_set = multimodal_dataset(splits.validation, tokenizer, eval_transform, data)

    def train_loader(batch_size: int):
        return multimodal_loader(train_set, collator, batch_size, True, workers, seed)

    return Plan(
        model=model,
        train_loader=train_loader(training.batch_size),
        train_loader_for=train_loader,
        eval_loader=multimodal_loader(eval_set, collator, training.eval_batch_size, False, workers, seed),
        label_names=splits.label_names,
        train_labels=column_values(splits.train, "label"),
        save=lambda folder: save_two_tower(model, folder, recipe, data_config, tokenizer),
        card="two_tower",
        callbacks=callbacks,
    )


# ---------------------------------------------------------------------------------------------
# Saving and loading: each tower in its library's own folder layout, the fusion head beside them


def save_two_tower(model: TwoTowerClassifier, folder: Path, recipe: Recipe, data_config: dict, tokenizer: Any) -> None:
    """image_tower/ (a timm feature extractor), text_tower/ (a transformers model and its tokenizer),
    fusion.safetensors and multimodal.json. LoRA is merged, so each tower loads with its library alone."""
    from timm.models import save_for_hf

    eval_config = eval_data_config(data_config)
    with contiguous_weights(merged_copy(model.model["image"].model)) as image_tower:
        save_for_hf(image_tower, folder / "image_tower", safe_serialization=True, data_config=eval_config)
    loadable_by_transformers(folder / "image_tower" / CONFIG_FILE)
    merged_copy(model.model["text"].model).save_pretrained(folder / "text_tower")
    tokenizer.save_pretrained(folder / "text_tower")
    fusion_state = {k: v.detach().cpu().contiguous() for k, v in model.model["fusion"].state_dict().items()}
    save_file(fusion_state, str(folder / FUSION_WEIGHTS_FILE))
    info = {
        "format": 1,
        "label_names": model.label_names,
        "multimodal": dataclasses.asdict(recipe.multimodal),
        "image_size": recipe.data.image_size,
        "max_length": recipe.data.max_length,
    }
    (folder / MULTIMODAL_FILE).write_text(json.dumps(info, indent=2) + "\n")


def load_two_tower(folder: str | Path) -> TwoTowerClassifier:
    """A saved two-tower model, ready for inference (eval mode)."""
    folder = Path(folder)
    info_file = folder / MULTIMODAL_FILE
    if not info_file.is_file():
        raise HfTransferError(f"{folder} has no {MULTIMODAL_FILE}; it is not the output folder of a multimodal run.")
    info = json.loads(info_file.read_text())
    saved = MultimodalConfig(**{k: v for k, v in info["multimodal"].items() if k in ("fusion", "hidden_dim", "dropout", "text_pooling")})
    config = dataclasses.replace(
        saved,
        image_model=ModelConfig(name=str(folder / "image_tower")),
        text_model=ModelConfig(name=str(folder / "text_tower")),
    )
    image_tower, text_tower, _ = load_towers(config, info.get("image_size"))
    fusion = build_fusion(config, image_tower.model.num_features, text_tower.model.config.hidden_size, len(info["label_names"]))
    fusion.load_state_dict(load_file(str(folder / FUSION_WEIGHTS_FILE)))
    return TwoTowerClassifier(image_tower, text_tower, fusion, info["label_names"], config.text_pooling).eval()
