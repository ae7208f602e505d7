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
from hf_transfer.inference.loader import SavedModel, fold_for_inference, load_saved_run, run_recipe
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


def _labelled_audio(recipe: Recipe, split: str | None, names: list[str], rate: int, window: float
                    ) -> tuple[Dataset, str]:
    """The split's usable audio (undecoded) with labels mapped into `names`; unusable files skipped and said."""
    from hf_transfer.data.audio import (
        AudioCheck,
        load_raw_audio,
        log_audio_check,
        readable_audio,
    )

    config = recipe.data
    raw, base_dir = load_raw_audio(config)
    split, dataset = pick_split(raw, split)
    dataset = encode_split(dataset, split, config, [config.audio_column], names)
    check = AudioCheck()
    dataset = readable_audio(dataset, config.audio_column, base_dir, rate, window, check)
    log_audio_check(check, rate, window)
    if len(dataset) == 0:
        raise HfTransferError(f"No audio file of the {split} split can be used (see the warnings above).")
    return dataset, split


def _audio_loader(saved: SavedModel, recipe: Recipe, split: str | None, batch_size: int):
    from hf_transfer.data.audio import audio_loader, extractor_window, with_features

    extractor = saved.feature_extractor
    rate, window = extractor.sampling_rate, extractor_window(extractor)
    dataset, split = _labelled_audio(recipe, split, saved.label_names, rate, window)
    return audio_loader(with_features(dataset, extractor, recipe.data.audio_column), batch_size, False, 0, 0), split


def _spoken_text_loader(saved: SavedModel, recipe: Recipe, split: str | None, batch_size: int, recogniser: str):
    """Labelled audio for a text model: transcribed by `recogniser`, then read as the run reads text."""
    from hf_transfer.console import bar
    from hf_transfer.data.audio import decode_mono
    from hf_transfer.data.splits import column_values
    from hf_transfer.data.text import text_loader, tokenize
    from hf_transfer.inference.transcribe import load_transcriber, require_text_model

    require_text_model(saved.kind)
    config = recipe.data
    if config.text_pair_column:
        raise HfTransferError("--transcribe gives one text per clip; this model reads text pairs.")
    transcribe, rate = load_transcriber(recogniser, batch_size)
    # longer clips are transcribed in 30 s pieces, not cut: no window
    dataset, split = _labelled_audio(recipe, split, saved.label_names, rate, float("inf"))
    clips = column_values(dataset, config.audio_column)
    transcripts = []
    for start in bar(range(0, len(clips), batch_size), desc="transcribing", unit="batch"):
        transcripts += transcribe([decode_mono(clip, rate) for clip in clips[start:start + batch_size]])
    texts = Dataset.from_dict({config.text_column: transcripts, "label": column_values(dataset, "label")})
    dataset = tokenize(texts, saved.tokenizer, config)
    loader = text_loader(dataset, saved.tokenizer, batch_size, False, 0, recipe.training.seed,
                         pad_to_multiple_of=config.pad_to_multiple_of)
    return loader, split


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
    transcribe: str | None = None,
) -> EvaluationResult:
    """Score the model in `output_dir` on `data`; writes metrics.json and confusion_matrix.png
    into OUTPUT/evaluations/NAME. `transcribe`: a speech recogniser; `data` is then labelled audio,
    and a text model is scored on its transcripts (the cascade)."""
    from hf_transfer.export.plots import plot_confusion_matrix

    folder = Path(output_dir)
    saved = fold_for_inference(load_saved_run(folder, trust_remote_code=trust_remote_code))
    values = merge_values(dataclasses.asdict(run_recipe(folder)), parse_overrides(list(overrides or [])))
    values["data"]["path"] = data
    recipe = recipe_from_dict(values)
    names = saved.label_names
    if transcribe is not None:
        loader, split = _spoken_text_loader(saved, recipe, split, batch_size, transcribe)
    else:
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
            write_json(staging / "metrics.json", {"model": str(folder), "data": data, "split": split, "eval": metrics,
                                                  **({"transcribed_by": transcribe} if transcribe else {})})
            plot_confusion_matrix(
                metrics["confusion_matrix"]["matrix"], names, staging / "confusion_matrix.png",
                title=f"Confusion matrix: {Path(data).name} ({split})",
            )
    accelerator.wait_for_everyone()
    return EvaluationResult(metrics, destination)
