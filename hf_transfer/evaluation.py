"""`hf-transfer evaluate OUT --data ...`: re-score a finished run's model on other labelled data.

The data is read as the run's recipe reads data (same columns, same preprocessing, labels mapped
onto the model's label names), scored with the training loop's own evaluation (every example once,
across processes under `accelerate launch`), and written as OUT/evaluations/NAME/metrics.json
plus confusion_matrix.png.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from datasets import Dataset, DatasetDict
from torch import nn

from hf_transfer.data.splits import VALIDATION_ALIASES, check_columns
from hf_transfer.errors import HfTransferError
from hf_transfer.export import staged, write_json
from hf_transfer.inference import load_text_classifier, run_label_names, run_recipe
from hf_transfer.metrics import classification_metrics
from hf_transfer.recipe import (
    DataConfig,
    Recipe,
    _merge,
    parse_overrides,
    recipe_from_dict,
)

EVALUATIONS_DIR = "evaluations"


@dataclass
class EvaluationResult:
    metrics: dict[str, Any]
    folder: Path


def pick_split(raw: DatasetDict, wanted: str | None) -> tuple[str, Dataset]:
    """The split to score: the one asked for; else test, else validation, else the only one."""
    if wanted is not None:
        if wanted in VALIDATION_ALIASES and wanted not in raw and "validation" in raw:
            wanted = "validation"  # datasets names a val/ or dev file's split "validation"
        if wanted not in raw:
            raise HfTransferError(f"--split {wanted}: the data has splits {list(raw)}.")
        return wanted, raw[wanted]
    for name in ("test", *VALIDATION_ALIASES):
        if name in raw:
            return name, raw[name]
    if len(raw) == 1:
        name = next(iter(raw))
        return name, raw[name]
    raise HfTransferError(f"The data has splits {list(raw)}; choose one with --split.")


def _encode(dataset: Dataset, split: str, config: DataConfig, columns: list[str], names: list[str]) -> Dataset:
    """Columns checked, labels mapped to the model's ids (an unknown label is an error)."""
    from hf_transfer.data.splits import (
        _encode_labels,  # the training path's own label mapping
    )

    if len(dataset) == 0:
        raise HfTransferError(f"The {split} split is empty; give it some examples.")
    check_columns(dataset, [*columns, config.label_column], split)
    return _encode_labels(dataset, split, config, names)


def _text_loader(folder: Path, recipe: Recipe, split: str | None, names: list[str], batch_size: int):
    from hf_transfer.data.splits import load_raw
    from hf_transfer.data.text import text_loader, tokenize

    bundle = load_text_classifier(folder)
    config = recipe.data
    split, dataset = pick_split(load_raw(config), split)
    columns = [config.text_column] + ([config.text_pair_column] if config.text_pair_column else [])
    dataset = tokenize(_encode(dataset, split, config, columns, names), bundle.tokenizer, config)
    loader = text_loader(dataset, bundle.tokenizer, batch_size, False, 0, recipe.training.seed,
                         pad_to_multiple_of=config.pad_to_multiple_of)
    return bundle.model, loader, split


class _PixelLogits(nn.Module):
    """A timm (or peft-wrapped timm) model called the way the evaluation loop calls models."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values, **_unused):
        return self.model(pixel_values)


def _image_loader(folder: Path, recipe: Recipe, split: str | None, names: list[str], batch_size: int):
    from timm.data import create_transform

    from hf_transfer.data.images import (
        _as_undecoded_images,
        check_images,
        image_num_workers,
        image_loader,
        load_raw_images,
        with_transform,
    )
    from hf_transfer.predict import _data_config, load_saved_model

    model, _ = load_saved_model(folder)
    config = recipe.data
    raw, base_dir = load_raw_images(config)
    split, dataset = pick_split(raw, split)
    dataset = _encode(dataset, split, config, [config.image_column], names)
    dataset = _as_undecoded_images(dataset, config.image_column, base_dir)
    workers = image_num_workers(recipe.training.num_workers)
    if config.verify_images:
        from hf_transfer.data.images import ImageCheck

        dataset = check_images(dataset, config.image_column, workers, ImageCheck())
    transform = create_transform(**_data_config(model))  # the model's own eval preprocessing
    loader = image_loader(with_transform(dataset, transform, config.image_column), batch_size, False, workers, 0)
    return _PixelLogits(model), loader, split


def _result_name(name: str | None, data: str, split: str) -> str:
    """--name, or the data's name (plus the split, when the data has several)."""
    stem = Path(data.rstrip("/")).stem or "data"
    name = name or (stem if Path(data).is_file() else f"{stem}-{split}".replace("/", "_"))
    if not re.fullmatch(r"[\w.-]+", name) or name in (".", ".."):
        raise HfTransferError(f"--name {name!r}: use letters, digits, '-', '_' and '.' only.")
    return name


def evaluate_saved_model(
    output_dir: str | Path,
    data: str,
    split: str | None = None,
    overrides: list[str] | None = None,
    name: str | None = None,
    batch_size: int = 64,
    overwrite: bool = False,
) -> EvaluationResult:
    """Score the model in `output_dir` on `data`; writes metrics.json and confusion_matrix.png
    into OUTPUT/evaluations/NAME."""
    from hf_transfer.plots import plot_confusion_matrix
    from hf_transfer.trainer import predict_logits

    folder = Path(output_dir)
    saved = run_recipe(folder)
    values = _merge(dataclasses.asdict(saved), parse_overrides(list(overrides or [])))
    values["data"]["path"] = data
    recipe = recipe_from_dict(values)
    names = run_label_names(folder)
    build = _text_loader if recipe.task == "text" else _image_loader
    model, loader, split = build(folder, recipe, split, names, batch_size)
    destination = folder / EVALUATIONS_DIR / _result_name(name, data, split)
    if destination.exists() and not overwrite:
        raise HfTransferError(f"{destination} exists; pass --overwrite to replace it, or choose another --name.")

    accelerator = Accelerator()
    model, loader = accelerator.prepare(model, loader)
    logits, labels = predict_logits(model, loader, accelerator)
    metrics = classification_metrics(logits.argmax(-1), labels, names)
    if accelerator.is_main_process:
        destination.mkdir(parents=True, exist_ok=True)
        with staged(destination) as staging:
            write_json(staging / "metrics.json", {"model": str(folder), "data": data, "split": split, "eval": metrics})
            plot_confusion_matrix(
                metrics["confusion_matrix"]["matrix"], names, staging / "confusion_matrix.png",
                title=f"Confusion matrix: {Path(data).name} ({split})",
            )
    accelerator.wait_for_everyone()
    return EvaluationResult(metrics, destination)
