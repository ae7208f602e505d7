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

from hf_transfer.data.splits import VALIDATION_ALIASES, encode_split
from hf_transfer.errors import HfTransferError
from hf_transfer.export.folder import staged, write_json
from hf_transfer.export.layout import AUDIO, EVALUATIONS_DIR, IMAGE, TEXT
from hf_transfer.inference.loader import SavedModel, load_saved_run, run_recipe
from hf_transfer.recipe import Recipe, merge_values, parse_overrides, recipe_from_dict
from hf_transfer.training.metrics import evaluate


@dataclass
class EvaluationResult:
    metrics: dict[str, Any]
    folder: Path


def pick_split(raw: DatasetDict, wanted: str | None) -> tuple[str, Dataset]:
    """The split to score: the one asked for; else test, else validation, else the only one."""
    if wanted is not None:
        if wanted in VALIDATION_ALIASES and wanted not in raw:
            # validation, valid, val and dev name one split, as in training (datasets names a val/ folder "validation")
            wanted = next((alias for alias in VALIDATION_ALIASES if alias in raw), wanted)
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


def _text_loader(saved: SavedModel, recipe: Recipe, split: str | None, batch_size: int):
    from hf_transfer.data.splits import load_raw
    from hf_transfer.data.text import text_loader, tokenize

    config = recipe.data
    split, dataset = pick_split(load_raw(config), split)
    columns = [config.text_column] + ([config.text_pair_column] if config.text_pair_column else [])
    dataset = tokenize(encode_split(dataset, split, config, columns, saved.label_names), saved.tokenizer, config)
    loader = text_loader(dataset, saved.tokenizer, batch_size, False, 0, recipe.training.seed,
                         pad_to_multiple_of=config.pad_to_multiple_of)
    return loader, split


def _image_loader(saved: SavedModel, recipe: Recipe, split: str | None, batch_size: int):
    from hf_transfer.data.images import (
        ImageCheck,
        image_loader,
        image_num_workers,
        load_raw_images,
        log_image_check,
        readable_images,
        with_transform,
    )

    config = recipe.data
    raw, base_dir = load_raw_images(config)
    split, dataset = pick_split(raw, split)
    dataset = encode_split(dataset, split, config, [config.image_column], saved.label_names)
    workers, check = image_num_workers(recipe.training.num_workers), ImageCheck()
    dataset = readable_images(dataset, config, base_dir, workers, check)
    log_image_check(check)
    if len(dataset) == 0:
        raise HfTransferError(f"No image of the {split} split can be decoded (see the warnings above).")
    loader = image_loader(with_transform(dataset, saved.transform, config.image_column), batch_size, False, workers, 0)
    return loader, split


def _audio_loader(saved: SavedModel, recipe: Recipe, split: str | None, batch_size: int):
    from hf_transfer.data.audio import (
        AudioCheck,
        audio_loader,
        extractor_window,
        load_raw_audio,
        log_audio_check,
        readable_audio,
        with_features,
    )

    config, extractor = recipe.data, saved.feature_extractor
    raw, base_dir = load_raw_audio(config)
    split, dataset = pick_split(raw, split)
    dataset = encode_split(dataset, split, config, [config.audio_column], saved.label_names)
    check, rate, window = AudioCheck(), extractor.sampling_rate, extractor_window(extractor)
    dataset = readable_audio(dataset, config.audio_column, base_dir, rate, window, check)
    log_audio_check(check, rate, window)
    if len(dataset) == 0:
        raise HfTransferError(f"No audio file of the {split} split can be used (see the warnings above).")
    return audio_loader(with_features(dataset, extractor, config.audio_column), batch_size, False, 0, 0), split


# the saved model's kind -> the loader of labelled data for it, read the way its recipe reads data
DATA_LOADERS = {TEXT: _text_loader, IMAGE: _image_loader, AUDIO: _audio_loader}


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
    trust_remote_code: bool = False,
) -> EvaluationResult:
    """Score the model in `output_dir` on `data`; writes metrics.json and confusion_matrix.png
    into OUTPUT/evaluations/NAME."""
    from hf_transfer.export.plots import plot_confusion_matrix

    folder = Path(output_dir)
    saved = load_saved_run(folder, trust_remote_code=trust_remote_code)
    values = merge_values(dataclasses.asdict(run_recipe(folder)), parse_overrides(list(overrides or [])))
    values["data"]["path"] = data
    recipe = recipe_from_dict(values)
    names = saved.label_names
    loader, split = DATA_LOADERS[saved.kind](saved, recipe, split, batch_size)
    model = saved.model
    destination = folder / EVALUATIONS_DIR / _result_name(name, data, split)
    if destination.exists() and not overwrite:
        raise HfTransferError(f"{destination} exists; pass --overwrite to replace it, or choose another --name.")

    accelerator = Accelerator()
    model, loader = accelerator.prepare(model, loader)
    metrics = evaluate(model, loader, accelerator, names, recipe.training.extra_metrics, desc="evaluating")
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
