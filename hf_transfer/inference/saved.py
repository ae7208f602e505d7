"""What every loader of a saved model returns, and the run files they all read (recipe, label names).

Shared by inference/loader.py (a run's folder) and inference/optimized.py (an optimised folder).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from hf_transfer.errors import HfTransferError
from hf_transfer.export.folder import read_json
from hf_transfer.export.layout import CONFIG_FILE, METRICS_FILE, RECIPE_FILE
from hf_transfer.recipe import Recipe, recipe_from_dict


@dataclass
class SavedModel:
    """A saved classifier, in eval mode: `model(**batch)` maps a batch (without labels) to logits."""

    model: nn.Module
    label_names: list[str]
    kind: str
    recipe: Recipe | None  # None for a folder another tool exported (a stock timm folder)
    tokenizer: Any = None  # text models
    transform: Callable | None = None  # image models: the model's own eval preprocessing
    feature_extractor: Any = None  # audio models: the source's feature extractor, as saved with the model


def run_recipe(folder: Path) -> Recipe:
    """The recipe a run saved in its output folder."""
    path = folder / RECIPE_FILE
    if not path.is_file():
        raise HfTransferError(
            f"{folder} has no recipe.yaml: give the output folder of an hf-transfer run "
            "(image folders exported by timm also work with `predict`)."
        )
    try:
        values = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError):
        values = None
    if not isinstance(values, dict):
        raise HfTransferError(f"{path} is not a recipe (a YAML mapping of sections).")
    missing = [f.name for f in dataclasses.fields(Recipe) if f.name not in values]
    if missing:  # a run writes every section: a missing one means a damaged file, not a default
        raise HfTransferError(f"{path} lacks the section(s) {missing}; it is damaged: train again or restore it.")
    return recipe_from_dict(values)


def run_label_names(folder: Path) -> list[str]:
    """Label names in id order: from metrics.json, else from the model's config.json."""
    metrics = folder / METRICS_FILE
    if metrics.is_file():
        names = read_json(metrics).get("eval", {}).get("confusion_matrix", {}).get("labels")
        if names:
            return list(names)
    config = folder / CONFIG_FILE
    if config.is_file():
        id2label = read_json(config).get("id2label")
        if id2label:
            return [id2label[str(i)] for i in range(len(id2label))]
    raise HfTransferError(f"{folder} records no label names (no metrics.json or config.json with id2label).")


class LogitsOf(nn.Module):
    """The logits of a transformers classifier, so it fits loops that expect `model(**batch) -> logits`."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        return self.model(**inputs).logits


class PixelLogits(nn.Module):
    """A timm (or peft-wrapped timm) model called the way the loops call models: `model(pixel_values=...)`."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor, **_unused: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values)
