"""Labelling inputs with a saved model: `hf-transfer predict OUTPUT_DIR INPUT ...`.

Inputs are images (files and folders) for an image model, audio files (files and folders) for an
audio model, and texts (on the command line, .txt files, or the text column of tables) for a text
model. Preprocessing is the saved model's own: its tokenizer with the run's max_length, the eval
transform of its timm data config, or its audio feature extractor.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from hf_transfer.console import bar
from hf_transfer.errors import HfTransferError
from hf_transfer.export.layout import AUDIO, TEXT
from hf_transfer.inference.loader import SavedModel, fold_for_inference, load_saved_run

logger = logging.getLogger(__name__)

TABLE_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".parquet")


@dataclass
class Prediction:
    path: str  # the image's or clip's path, or the text itself
    labels: list[str]  # best first
    probabilities: list[float]
    transcript: str | None = None  # a clip labelled by a text run through its transcript (--transcribe)


def read_texts(inputs: list[str], text_column: str) -> list[str]:
    """Each input is a file of texts (.txt: one per line; a table: its text column) or a text itself."""
    texts: list[str] = []
    for item in inputs:
        path = Path(item)
        try:
            path.exists()
        except (OSError, ValueError):  # a long text (or one with a NUL) is no name the file system takes
            texts.append(item)
            continue
        if path.is_dir():
            raise HfTransferError(
                f"{item} is a folder; a text model labels texts, .txt files (one text per line) and tables "
                f"({', '.join(TABLE_SUFFIXES)})."
            )
        if path.suffix == ".txt" and path.is_file():
            try:
                texts.extend(line for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
            except UnicodeDecodeError as error:
                raise HfTransferError(f"{path} is not UTF-8 text (byte {error.start}); save it as UTF-8.") from None
        elif path.suffix in TABLE_SUFFIXES and path.is_file():
            from hf_transfer.data.splits import check_columns, read_table

            table = read_table(path)
            check_columns(table, [text_column], path.name)
            texts.extend(str(t) for t in table[text_column])
        elif path.suffix in (".txt", *TABLE_SUFFIXES) and not path.exists():
            raise HfTransferError(f"{item} does not exist.")
        else:
            texts.append(item)
    if not texts:
        raise HfTransferError("No texts to label: give texts, or .txt / csv / jsonl / parquet files of texts.")
    return texts


def find_images(inputs: list[str], extensions: frozenset[str] | None = None, what: str = "images") -> list[Path]:
    """Files named directly, and those inside named folders with one of `extensions` (images by
    default; recursively, sorted)."""
    if extensions is None:
        from hf_transfer.data.images import IMAGE_EXTENSIONS as extensions

    found: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found.extend(sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in extensions))
        elif item.is_file():
            found.append(item)
        else:
            raise HfTransferError(f"{item} does not exist.")
    if not found:
        raise HfTransferError(f"No {what} found in {', '.join(inputs)}.")
    return found


def _top_k(saved: SavedModel, shown: list[str], batch: dict[str, torch.Tensor], k: int) -> Iterator[Prediction]:
    probabilities = saved.model(**batch).float().softmax(dim=-1)
    top = probabilities.topk(k, dim=-1)
    for item, values, indices in zip(shown, top.values.tolist(), top.indices.tolist()):
        yield Prediction(item, [saved.label_names[i] for i in indices], values)


# Texts are sorted by length within windows of this many batches, so that a batch pads to about
# its own texts' length rather than to the longest of a random batch (SST-2's dev sentences in
# input order carry about 3x their tokens in padding); predictions still come out in input order.
SORT_WINDOW_BATCHES = 64


def _predict_texts(saved: SavedModel, inputs: list[str], k: int, batch_size: int, text_column: str | None):
    yield from _label_texts(saved, read_texts(inputs, text_column or saved.recipe.data.text_column), k, batch_size)


def _label_texts(saved: SavedModel, texts: list[str], k: int, batch_size: int, progress_bar: bool = True):
    from hf_transfer.data.sampling import PadToMultipleCollator

    tokenizer, max_length = saved.tokenizer, saved.recipe.data.max_length
    collate = PadToMultipleCollator(tokenizer.pad_token_id or 0, saved.recipe.data.pad_to_multiple_of, tokenizer.padding_side)
    window = batch_size * SORT_WINDOW_BATCHES
    progress = bar(desc="predicting", total=math.ceil(len(texts) / batch_size), unit="batch") if progress_bar else None
    with progress if progress is not None else contextlib.nullcontext():
        for start in range(0, len(texts), window):
            chunk = texts[start:start + window]
            encoded = tokenizer(chunk, truncation=True, max_length=max_length)
            by_length = sorted(range(len(chunk)), key=lambda i: len(encoded["input_ids"][i]))
            predictions: list[Prediction | None] = [None] * len(chunk)
            for first in range(0, len(chunk), batch_size):
                rows = by_length[first:first + batch_size]
                batch = collate([{key: values[i] for key, values in encoded.items()} for i in rows])
                # one line per text on output: tabs and newlines inside it would break the columns
                shown = [" ".join(chunk[i].split()) for i in rows]
                for row, prediction in zip(rows, _top_k(saved, shown, batch, k)):
                    predictions[row] = prediction
                if progress is not None:
                    progress.update(1)
            yield from predictions


def _predict_images(saved: SavedModel, inputs: list[str], k: int, batch_size: int, _text_column: str | None):
    from hf_transfer.data.images import load_rgb

    images, decoded = find_images(inputs), 0
    for start in bar(range(0, len(images), batch_size), desc="predicting", unit="batch"):
        paths, pixels = [], []
        for path in images[start:start + batch_size]:
            try:
                pixels.append(saved.transform(load_rgb(path)))
                paths.append(str(path))
            except Exception as error:  # any decode failure: say which file, go on
                logger.warning("skipped %s: cannot decode it (%s)", path, type(error).__name__)
        if pixels:
            decoded += len(pixels)
            yield from _top_k(saved, paths, {"pixel_values": torch.stack(pixels)}, k)
    if not decoded:
        raise HfTransferError(f"None of the {len(images)} image(s) given could be decoded (see the warnings above).")


def _predict_audio(saved: SavedModel, inputs: list[str], k: int, batch_size: int, _text_column: str | None):
    from hf_transfer.data.audio import AUDIO_EXTENSIONS, decode_mono, featurize

    extractor = saved.feature_extractor
    files, decoded = find_images(inputs, AUDIO_EXTENSIONS, "audio files"), 0
    for start in bar(range(0, len(files), batch_size), desc="predicting", unit="batch"):
        paths, waves = [], []
        for path in files[start:start + batch_size]:
            try:
                waves.append(decode_mono(path, extractor.sampling_rate))
                paths.append(str(path))
            except Exception as error:  # any decode failure: say which file, go on
                logger.warning("skipped %s: cannot decode it (%s)", path, type(error).__name__)
        if waves:
            decoded += len(waves)
            yield from _top_k(saved, paths, featurize(extractor, waves), k)
    if not decoded:
        raise HfTransferError(f"None of the {len(files)} audio file(s) given could be decoded (see the warnings above).")


def _predict_spoken(saved: SavedModel, inputs: list[str], k: int, batch_size: int, recogniser: str):
    """Audio files labelled by a text run through their transcripts (the cascade of speech->text transfer)."""
    from hf_transfer.data.audio import AUDIO_EXTENSIONS
    from hf_transfer.inference.transcribe import (
        load_transcriber,
        require_text_model,
        transcribe_files,
    )

    require_text_model(saved.kind)
    files = find_images(inputs, AUDIO_EXTENSIONS, "audio files")
    transcribe, rate = load_transcriber(recogniser, batch_size)
    decoded = 0
    for start in bar(range(0, len(files), batch_size), desc="transcribing and predicting", unit="batch"):
        kept, transcripts = transcribe_files(transcribe, rate, files[start:start + batch_size])
        decoded += len(kept)
        labelled = _label_texts(saved, transcripts, k, batch_size, progress_bar=False)
        for path, transcript, prediction in zip(kept, transcripts, labelled):
            yield dataclasses.replace(prediction, path=str(path), transcript=transcript)
    if not decoded:
        raise HfTransferError(f"None of the {len(files)} audio file(s) given could be decoded (see the warnings above).")


# the saved model's kind -> how its inputs are read and labelled
PREDICTORS = {TEXT: _predict_texts, AUDIO: _predict_audio}


@torch.no_grad()
def predict(
    folder: str | Path, inputs: list[str], top_k: int = 1, batch_size: int = 32, text_column: str | None = None,
    trust_remote_code: bool = False, transcribe: str | None = None,
) -> Iterator[Prediction]:
    """Top-k labels and probabilities of each input (unreadable images are logged and skipped).

    `transcribe`: a speech recogniser; the inputs are then audio files, and a text model labels their
    transcripts.
    """
    saved = fold_for_inference(load_saved_run(folder, trust_remote_code=trust_remote_code))
    k = max(1, min(top_k, len(saved.label_names)))
    if transcribe is not None:
        yield from _predict_spoken(saved, inputs, k, batch_size, transcribe)
        return
    predict_kind = PREDICTORS.get(saved.kind, _predict_images)
    yield from predict_kind(saved, inputs, k, batch_size, text_column)


def format_prediction(prediction: Prediction, style: str = "tsv") -> str:
    """tsv: `input<TAB>label<TAB>probability`, one label/probability pair per top-k rank, then the
    transcript where there is one; json: {"input", "labels", "probabilities"} (and "transcript") on
    one line (JSON Lines)."""
    if style == "json":
        record = {"input": prediction.path, "labels": prediction.labels,
                  "probabilities": [round(p, 6) for p in prediction.probabilities]}
        if prediction.transcript is not None:
            record["transcript"] = prediction.transcript
        return json.dumps(record)
    columns = [prediction.path]
    columns += [f"{label}\t{p:.4f}" for label, p in zip(prediction.labels, prediction.probabilities)]
    if prediction.transcript is not None:  # on one line: tabs and newlines inside it would break the columns
        columns.append(" ".join(prediction.transcript.split()))
    return "\t".join(columns)
