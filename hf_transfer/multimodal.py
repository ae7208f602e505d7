"""Two-tower multimodal classification: data with an image column and a text column.

An image tower (any timm model, see sources/vision.py) and a text tower (any transformers encoder,
see sources/text.py) each map their input to pooled features; a fusion head joins the two:

- concat: both towers' features side by side into an MLP;
- gated:  a gated multimodal unit (Arevalo et al., 2017) that weighs the two towers per dimension.

Each tower is frozen, LoRA-adapted or fine-tuned by the shared strategies (multimodal.image_strategy
and multimodal.text_strategy, or the recipe's strategy), and the whole model trains in the shared
loop like any other task. The towers' own classifiers are not used: the fusion head replaces them.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader

from hf_transfer.data.sampling import PadToMultipleCollator
from hf_transfer.errors import HfTransferError
from hf_transfer.export import write_python_card
from hf_transfer.heads import MLPHead
from hf_transfer.recipe import (
    DataConfig,
    ModelConfig,
    MultimodalConfig,
    Recipe,
    StrategyConfig,
)
from hf_transfer.sources.base import TransferModel
from hf_transfer.sources.pooling import pooled_features
from hf_transfer.strategies import EpochHook, apply_strategy

TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids")
MULTIMODAL_FILE = "multimodal.json"
FUSION_WEIGHTS_FILE = "fusion.safetensors"


# ---------------------------------------------------------------------------------------------
# Fusion heads


class ConcatFusion(nn.Module):
    """Each tower's features layer-normalised (so neither drowns the other), concatenated, into an MLP."""

    def __init__(self, image_dim: int, text_dim: int, num_classes: int, hidden_dim: int, dropout: float):
        super().__init__()
        self.image_norm, self.text_norm = nn.LayerNorm(image_dim), nn.LayerNorm(text_dim)
        self.mlp = MLPHead(image_dim + text_dim, num_classes, hidden_dim, dropout)

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.mlp(torch.cat([self.image_norm(image), self.text_norm(text)], dim=-1))


class GatedFusion(nn.Module):
    """A gated multimodal unit: h = z * tanh(W_i x_i) + (1 - z) * tanh(W_t x_t), z = sigmoid(W_z [x_i; x_t]).

    The gate, computed from both towers, decides per dimension and per example how much each tower
    contributes; an MLP then classifies h.
    """

    def __init__(self, image_dim: int, text_dim: int, num_classes: int, hidden_dim: int, dropout: float):
        super().__init__()
        self.image_norm, self.text_norm = nn.LayerNorm(image_dim), nn.LayerNorm(text_dim)
        self.image_projection = nn.Linear(image_dim, hidden_dim)
        self.text_projection = nn.Linear(text_dim, hidden_dim)
        self.gate = nn.Linear(image_dim + text_dim, hidden_dim)
        self.mlp = MLPHead(hidden_dim, num_classes, hidden_dim, dropout)

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        image, text = self.image_norm(image), self.text_norm(text)
        gate = torch.sigmoid(self.gate(torch.cat([image, text], dim=-1)))
        mixed = gate * torch.tanh(self.image_projection(image)) + (1 - gate) * torch.tanh(self.text_projection(text))
        return self.mlp(mixed)


FUSIONS: dict[str, type[nn.Module]] = {"concat": ConcatFusion, "gated": GatedFusion}


def build_fusion(config: MultimodalConfig, image_dim: int, text_dim: int, num_classes: int) -> nn.Module:
    return FUSIONS[config.fusion](image_dim, text_dim, num_classes, config.hidden_dim, config.dropout)


# ---------------------------------------------------------------------------------------------
# The two-tower model


class TwoTowerClassifier(TransferModel):
    """Image tower + text tower + fusion head. Strategies apply per tower (`apply_tower_strategies`)."""

    input_names = ("pixel_values", *TOKEN_KEYS)

    def __init__(self, image_tower: TransferModel, text_tower: TransferModel, fusion: nn.Module,
                 label_names: list[str], text_pooling: str):
        super().__init__()
        self.model = nn.ModuleDict({"image": image_tower, "text": text_tower, "fusion": fusion})
        self.label_names, self.text_pooling = label_names, text_pooling
        self.head_modules = ["fusion"]
        self.head_prefixes = ["model.fusion."]
        self.block_prefixes = []  # each tower keeps its own blocks; strategies apply tower by tower

    def tower_features(self, pixel_values: torch.Tensor, **text_inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        text_inputs = {k: v for k, v in text_inputs.items() if k in TOKEN_KEYS}
        image = self.model["image"].features(pixel_values=pixel_values)
        text = pooled_features(self.model["text"], self.text_pooling, **text_inputs)
        return image, text

    def forward(self, pixel_values: torch.Tensor, **text_inputs: torch.Tensor) -> torch.Tensor:
        return self.model["fusion"](*self.tower_features(pixel_values, **text_inputs))

    def features(self, pixel_values: torch.Tensor, **text_inputs: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.tower_features(pixel_values, **text_inputs), dim=-1)


def _freeze_unused_classifier(tower: TransferModel) -> None:
    # the fusion head replaces the tower's own classifier: no gradient reaches it, so keep it out
    # of the optimiser and of the trainable-parameter count
    for _, parameter in tower.head_parameters():
        parameter.requires_grad_(False)


def apply_tower_strategies(model: TwoTowerClassifier, config: MultimodalConfig, default: StrategyConfig) -> EpochHook | None:
    """Each tower's strategy (or the recipe's), the fusion head always trained; one combined epoch hook."""
    hooks = []
    for name, strategy in (("image", config.image_strategy), ("text", config.text_strategy)):
        tower = model.model[name]
        hook = apply_strategy(tower, strategy or default)
        _freeze_unused_classifier(tower)
        if hook is not None:
            hooks.append(hook)
    for parameter in model.model["fusion"].parameters():
        parameter.requires_grad_(True)
    if not hooks:
        return None
    return lambda epoch: [hook(epoch) for hook in hooks] and None


def load_towers(config: MultimodalConfig, image_size: int | None) -> tuple[TransferModel, TransferModel, Any]:
    """(image tower, text tower, tokenizer), each tower without a classifier of its own to speak of."""
    from hf_transfer.recipe import HeadConfig
    from hf_transfer.sources.text import load_text_model, load_tokenizer
    from hf_transfer.sources.vision import VisionClassifier, create_vision_model

    # num_classes=0: timm's classifier becomes an identity, the tower a feature extractor
    image_model = create_vision_model(config.image_model, 0, image_size)
    image_tower = VisionClassifier(image_model, ["features"], HeadConfig())
    text_tower = load_text_model(config.text_model, ["unused_0", "unused_1"])
    return image_tower, text_tower, load_tokenizer(config.text_model)


# ---------------------------------------------------------------------------------------------
# Data: an image column and a text column


def multimodal_dataset(dataset: Dataset, tokenizer: Any, transform: Callable, data: DataConfig) -> Dataset:
    """Token ids computed once; images decoded and transformed on access (in the loader's workers)."""
    from hf_transfer.data.images import load_rgb

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


def build_multimodal_task(recipe: Recipe) -> Any:
    """The run's Task for `task: multimodal` (registered in run.TASKS)."""
    from hf_transfer.data.images import (
        image_num_workers,
        image_transforms,
        load_image_splits,
    )
    from hf_transfer.data.splits import check_columns
    from hf_transfer.run import Task
    from hf_transfer.sources.vision import model_data_config

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
    collator = MultimodalCollator(tokenizer.pad_token_id or 0, data.pad_to_multiple_of, tokenizer.padding_side)
    train_set = multimodal_dataset(splits.train, tokenizer, train_transform, data)
    eval_set = multimodal_dataset(splits.validation, tokenizer, eval_transform, data)

    def save(trained: TransferModel, folder: Path) -> None:
        save_two_tower(trained, folder, recipe, data_config, tokenizer)

    return Task(
        model=model,
        train_loader=multimodal_loader(train_set, collator, training.batch_size, True, workers, seed),
        eval_loader=multimodal_loader(eval_set, collator, training.eval_batch_size, False, workers, seed),
        label_names=splits.label_names,
        train_labels=list(splits.train["label"]),
        save=save,
        apply_strategy=lambda strategy: apply_tower_strategies(model, config, strategy),
    )


# ---------------------------------------------------------------------------------------------
# Saving and loading: each tower in its library's own folder layout, the fusion head beside them


def _merged(library_model: nn.Module) -> nn.Module:
    """The model with LoRA folded into its weights (a copy), or the model itself."""
    return copy.deepcopy(library_model).merge_and_unload() if hasattr(library_model, "merge_and_unload") else library_model


def save_two_tower(model: TwoTowerClassifier, folder: Path, recipe: Recipe, data_config: dict, tokenizer: Any) -> None:
    """image_tower/ (a timm feature extractor), text_tower/ (a transformers model and its tokenizer),
    fusion.safetensors and multimodal.json. LoRA is merged, so each tower loads with its library alone."""
    from timm.models import save_for_hf

    eval_config = {k: data_config[k] for k in ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode") if k in data_config}
    save_for_hf(_merged(model.model["image"].model), folder / "image_tower", safe_serialization=True, data_config=eval_config)
    _merged(model.model["text"].model).save_pretrained(folder / "text_tower")
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


def write_two_tower_card(folder: Path, recipe: Recipe, summary: dict[str, Any]) -> Path:
    """A short README.md: the generic model card describes a model that one library loads alone."""
    config = recipe.multimodal
    evaluation = summary["eval"]
    lines = [
        f"# {recipe.name}",
        "",
        f"A two-tower classifier trained with hf_transfer: image tower `{config.image_model.name}`, text tower "
        f"`{config.text_model.name}`, joined by a `{config.fusion}` fusion head, on `{recipe.data.path}` "
        f"(image column `{recipe.data.image_column}`, text column `{recipe.data.text_column}`).",
        "",
        "| | |",
        "| --- | --- |",
        f"| validation accuracy (best epoch {summary['best_epoch']}) | {evaluation['accuracy']:.4f} |",
        f"| validation macro F1 | {evaluation['f1_macro']:.4f} |",
        f"| trainable parameters | {summary['trainable_parameters']:,} of {summary['total_parameters']:,} |",
        f"| seed | {summary['seed']} |",
        "",
    ]
    return write_python_card(folder, lines, "hf_transfer.multimodal", "load_two_tower",
                             "pixel_values plus the text tokenizer's outputs")
