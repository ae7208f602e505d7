"""Audio data: labelled splits through `datasets`, checked once before training, featurised on the fly.

Sources: a local folder of class folders (`train/<class>/*.wav`, `val/<class>/*.wav`, read by the
`audiofolder` builder), a Hub dataset id, or a CSV/JSON/Parquet table of audio paths and labels.
Decoding and resampling are `datasets`' Audio feature (torchcodec, on FFmpeg); the features are
the source model's own feature extractor (Whisper's log-mel spectrogram, wav2vec2's normalised wave).

Every file is decoded once before training (as images are), so that what real folders hold is said
before an epoch starts: an unreadable or silent file is skipped and listed; files at another sample
rate are counted (they are resampled to the extractor's rate); files longer than the model's window
(30 s for Whisper) are counted (they are cut at the window).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Audio, Dataset, DatasetDict, Value, load_dataset
from datasets.packaged_modules.audiofolder.audiofolder import AudioFolder
from torch.utils.data import DataLoader

from hf_transfer.console import bar
from hf_transfer.data.splits import (
    FILE_BUILDERS,
    LabelledSplits,
    check_columns,
    labelled_splits,
    load_raw,
    require_every_class,
)
from hf_transfer.errors import HfTransferError
from hf_transfer.recipe import DataConfig

logger = logging.getLogger(__name__)

SILENCE_PEAK = 1e-4  # a file whose loudest sample is under -80 dBFS holds nothing to classify
DEFAULT_WINDOW_SECONDS = 30.0  # what an extractor without a fixed window (wav2vec2) is cut at
INSTALL_AUDIO = "pip install 'hf-transfer-learning[speech]'  (torchcodec, which needs FFmpeg's libraries: apt-get install ffmpeg)"


def _decoding_unavailable(error: Exception) -> HfTransferError:
    return HfTransferError(f"Decoding audio needs torchcodec with FFmpeg ({type(error).__name__}: "
                           f"{str(error).splitlines()[0][:200]}). Run: {INSTALL_AUDIO}")


def audio_decoder(source: str | bytes):
    """torchcodec's decoder for a file path or its bytes, or one clear error when torchcodec cannot load."""
    try:
        from torchcodec.decoders import AudioDecoder
    except (ImportError, RuntimeError, OSError) as error:  # some torchcodec versions fail here without FFmpeg
        raise _decoding_unavailable(error) from None
    try:
        return AudioDecoder(source)
    except RuntimeError as error:
        # torchcodec 0.7+ loads FFmpeg's libraries with the first decoder; without them every file would
        # look undecodable, so this is the installation's fault, said once, not the data's
        if str(error).startswith("Could not load libtorchcodec"):
            raise _decoding_unavailable(error) from None
        raise


def decode_mono(value: dict[str, Any] | str | Path, sampling_rate: int) -> np.ndarray:
    """One file (a path or `datasets`' undecoded {"bytes", "path"}) as mono float32 at ``sampling_rate``."""
    if isinstance(value, (str, Path)):
        value = {"bytes": None, "path": str(value)}
    decoded = Audio(sampling_rate=sampling_rate, num_channels=1).decode_example(value)
    return np.asarray(decoded["array"], dtype=np.float32).reshape(-1)


@dataclass
class AudioCheck:
    """What the check pass found: files skipped (unreadable, silent), resampled and cut."""

    checked: int = 0
    skipped: list[str] = field(default_factory=list)
    resampled: dict[int, int] = field(default_factory=dict)  # source rate -> files
    too_long: int = 0


def _inspect(value: dict[str, Any]) -> tuple[str, int | None, float]:
    """(why the file cannot be used, or "", its sample rate, its duration in seconds)."""
    try:
        decoder = audio_decoder(value.get("bytes") or value["path"])
        samples = decoder.get_all_samples()
    except HfTransferError:
        raise
    except Exception:  # torchcodec raises RuntimeError/ValueError on files FFmpeg cannot read
        return "cannot be decoded", None, 0.0
    if samples.data.numel() == 0 or float(samples.data.abs().max()) < SILENCE_PEAK:
        return "silent", samples.sample_rate, 0.0
    return "", samples.sample_rate, samples.data.shape[-1] / samples.sample_rate


def check_audio(dataset: Dataset, column: str, sampling_rate: int, window: float, check: AudioCheck) -> Dataset:
    """The rows whose audio decodes and is not silent; the others are listed in ``check.skipped``."""
    keep = []
    values = dataset[column]
    for index, value in enumerate(bar(values, desc="checking audio", total=len(values), unit="file")):
        reason, rate, seconds = _inspect(value)
        if reason:
            check.skipped.append(f"{value.get('path') or f'row {index}'} ({reason})")
            continue
        keep.append(index)
        if rate != sampling_rate:
            check.resampled[rate] = check.resampled.get(rate, 0) + 1
        check.too_long += seconds > window
    check.checked += len(values)
    return dataset if len(keep) == len(values) else dataset.select(keep)


def log_audio_check(check: AudioCheck, sampling_rate: int, window: float) -> None:
    if check.resampled:
        rates = ", ".join(f"{count} at {rate} Hz" for rate, count in sorted(check.resampled.items()))
        logger.warning("audio resampled to the feature extractor's %d Hz: %s", sampling_rate, rates)
    if check.too_long:
        logger.warning("%d audio file(s) longer than the model's %.0f s window: only their first %.0f s are used",
                       check.too_long, window, window)
    if check.skipped:
        logger.warning("skipped %d of %d audio files that cannot be used: %s",
                       len(check.skipped), check.checked, ", ".join(check.skipped))


def _is_audio_folder(path: Path) -> bool:
    return path.is_dir() and not [p for p in path.iterdir() if p.is_file() and p.suffix in FILE_BUILDERS
                                  and p.name not in ("metadata.csv", "metadata.jsonl")]


def _as_undecoded_audio(dataset: Dataset, column: str, base_dir: Path | None) -> Dataset:
    if column not in dataset.column_names:
        raise HfTransferError(f"The data has no column '{column}' (it has {dataset.column_names}); set data.audio_column.")
    feature = dataset.features[column]
    if isinstance(feature, Audio):
        return dataset.cast_column(column, Audio(decode=False))
    if not (isinstance(feature, Value) and feature.dtype in ("string", "large_string")):
        raise HfTransferError(f"Column '{column}' holds {feature}, neither audio nor audio paths; set data.audio_column.")
    if feature.dtype == "large_string":  # datasets' Audio casts from string only (CSV tables read as large_string)
        dataset = dataset.cast_column(column, Value("string"))
    if base_dir is not None:  # paths in a table are relative to the table's folder
        dataset = dataset.map(lambda batch: {column: [p if p is None or Path(p).is_absolute() else str(base_dir / p)
                                                      for p in batch[column]]}, batched=True)
    return dataset.cast_column(column, Audio(decode=False))


AUDIO_EXTENSIONS = frozenset(ext.lower() for ext in AudioFolder.EXTENSIONS)  # the files audiofolder reads


def load_raw_audio(config: DataConfig) -> tuple[DatasetDict, Path | None]:
    """The data set, and the folder that relative audio paths in a table are relative to."""
    if config.path is None:
        raise HfTransferError("The recipe has no data.path: set a folder of class folders, a CSV of audio paths, or a Hub id.")
    path = Path(config.path)
    if _is_audio_folder(path):
        return load_dataset("audiofolder", data_dir=str(path)), path
    return load_raw(config), (path if path.is_dir() else path.parent if path.is_file() else None)


def readable_audio(dataset: Dataset, column: str, base_dir: Path | None, sampling_rate: int, window: float,
                   check: AudioCheck) -> Dataset:
    """The audio column undecoded (table paths made absolute), only the rows whose audio can be used."""
    return check_audio(_as_undecoded_audio(dataset, column, base_dir), column, sampling_rate, window, check)


def load_audio_splits(config: DataConfig, seed: int, sampling_rate: int, window: float,
                      train_columns: list[str] | None = None) -> LabelledSplits:
    """Train and validation audio (undecoded), labels encoded, unreadable and silent files dropped.

    `train_columns`: more columns the training split must have (a transcript), checked before any
    file is decoded.
    """
    raw, base_dir = load_raw_audio(config)
    splits = labelled_splits(raw, config, [config.audio_column], seed)
    check_columns(splits.train, train_columns or [], "train")
    check = AudioCheck()
    train, validation = (readable_audio(s, config.audio_column, base_dir, sampling_rate, window, check)
                         for s in (splits.train, splits.validation))
    log_audio_check(check, sampling_rate, window)
    require_every_class(train, splits.label_names, "unusable audio", "files")
    if len(validation) == 0:
        raise HfTransferError("No validation audio file can be used (all unreadable or silent); fix the validation files.")
    return LabelledSplits(train=train, validation=validation, label_names=splits.label_names)


def extractor_window(extractor: Any) -> float:
    """The longest input, in seconds, the model sees: Whisper's chunk (30 s); 30 s for extractors without one."""
    return float(getattr(extractor, "chunk_length", None) or DEFAULT_WINDOW_SECONDS)


def featurize(extractor: Any, arrays: list[np.ndarray]) -> dict[str, torch.Tensor]:
    """The extractor's model inputs for a batch of mono waves, with an attention mask over the real audio.

    Whisper's extractor pads (and cuts) every wave to its 30 s window, as its encoder requires; others
    pad to the batch's longest wave and cut at 30 s.
    """
    rate = extractor.sampling_rate
    options: dict[str, Any] = {"return_attention_mask": True, "return_tensors": "pt", "sampling_rate": rate}
    if not hasattr(extractor, "nb_max_frames"):  # not Whisper: no fixed window of its own
        options.update(padding="longest", truncation=True, max_length=int(DEFAULT_WINDOW_SECONDS * rate))
    return dict(extractor(arrays, **options))


def with_features(dataset: Dataset, extractor: Any, column: str) -> Dataset:
    """Decode, resample and featurise on access (in the loader's workers): nothing is cached."""
    rate = extractor.sampling_rate

    def apply(batch: dict) -> dict:
        inputs = featurize(extractor, [decode_mono(value, rate) for value in batch[column]])
        return {**{k: list(v) for k, v in inputs.items()}, "labels": batch["label"]}

    return dataset.with_transform(apply)


def audio_loader(dataset: Dataset, batch_size: int, shuffle: bool, num_workers: int, seed: int) -> DataLoader:
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
        persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(seed) if shuffle else None,
        collate_fn=_stack,
    )


def _stack(rows: list[dict]) -> dict[str, torch.Tensor]:
    """Rows into a batch; waves of different lengths (wav2vec2's inputs) are zero-padded at the end,
    their attention mask with them."""
    batch = {}
    for key in rows[0]:
        tensors = [torch.as_tensor(row[key]) for row in rows]
        longest = max((t.shape[-1] for t in tensors if t.dim()), default=0)
        batch[key] = torch.stack([torch.nn.functional.pad(t, (0, longest - t.shape[-1])) if t.dim() else t for t in tensors])
    return batch
