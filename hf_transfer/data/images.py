"""Image data: labelled splits through `datasets`, checked before training, transformed on the fly.

Sources: a local ImageFolder (`train/<class>/*`, `val/<class>/*`, read by the `imagefolder` builder),
a Hub dataset id, or a CSV/JSON/Parquet table of image paths and labels. Preprocessing is timm's
(`create_transform` with the source model's data config); augmentation applies to training only.

Real image folders hold odd files: every image is decoded once before training, so a truncated or
non-image file is skipped (and named in the log) instead of crashing an epoch, and every mode
(grayscale, palette, RGBA, CMYK, 16-bit) is brought to 8-bit RGB the same way in training and predict.
"""

from __future__ import annotations

import io
import logging
import os
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset, DatasetDict, Value, load_dataset
from datasets import Image as ImageFeature
from datasets.data_files import SPLIT_KEYWORDS
from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder
from PIL import Image, ImageOps
from torch.utils.data import DataLoader

from hf_transfer.console import bar
from hf_transfer.data.splits import (
    FILE_BUILDERS,
    LabelledSplits,
    labelled_splits,
    load_raw,
    require_every_class,
)
from hf_transfer.errors import HfTransferError
from hf_transfer.recipe import AugmentConfig, DataConfig

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset(ImageFolder.EXTENSIONS)  # the files the imagefolder builder reads
SPLIT_FOLDER_NAMES = {name for names in SPLIT_KEYWORDS.values() for name in names}
TRAIN_FOLDER_NAMES = set(SPLIT_KEYWORDS["train"])
_HIGH_BIT_DEPTH_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
_TRIVIAL_AUGMENT = {"trivialaugment", "trivialaugmentwide", "trivial"}


# ---------------------------------------------------------------------------------------------
# Decoding any image to RGB


def open_image(value: dict[str, Any] | str | Path) -> Image.Image:
    """Decode an image given as a path or as `datasets`' undecoded {"bytes", "path"} value."""
    if isinstance(value, (str, Path)):
        value = {"bytes": None, "path": str(value)}
    # read the bytes ourselves: PIL then holds no open file handle after load()
    data = value.get("bytes") or Path(value["path"]).read_bytes()
    image = Image.open(io.BytesIO(data))
    image.load()  # decode now, so a truncated file fails here and not inside a transform
    return image


def _high_bit_depth_to_8bit(image: Image.Image) -> Image.Image:
    # PIL's convert("RGB") clips 16-bit values at 255 (a white image); scale the range down instead
    array = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        top = 1.0 if array.size and array.max() <= 1.0 else 255.0
    else:
        top = 65535.0
    return Image.fromarray(np.clip(np.rint(array / top * 255.0), 0, 255).astype(np.uint8), mode="L")


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB, upright: EXIF rotation applied, alpha composited on white, 16-bit scaled."""
    try:
        image = ImageOps.exif_transpose(image)  # phone photos store their rotation in EXIF
    except Exception:  # a broken EXIF block must not cost the image
        pass
    if image.mode in _HIGH_BIT_DEPTH_MODES:
        image = _high_bit_depth_to_8bit(image)
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info
    )
    if has_alpha:
        # convert("RGB") would drop alpha and show whatever colour hides under transparent pixels
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def load_rgb(value: dict[str, Any] | str | Path) -> Image.Image:
    return to_rgb(open_image(value))


# ---------------------------------------------------------------------------------------------
# Finding the data


def _image_files(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]


def _subfolders(folder: Path) -> list[Path]:
    # hidden folders (.ipynb_checkpoints, .git) are not classes; datasets skips them too
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith((".", "__")))


def check_image_folder(root: Path) -> list[str]:
    """Check an ImageFolder tree before `datasets` reads it; returns the training classes.

    `imagefolder` silently drops an empty class folder and unions the classes of all splits, so a
    class that exists only in val/ would become a class with no training images. Catch both here.
    """
    split_dirs = {p.name.lower(): p for p in _subfolders(root) if p.name.lower() in SPLIT_FOLDER_NAMES}
    train_dir = next((p for name, p in split_dirs.items() if name in TRAIN_FOLDER_NAMES), None)
    if train_dir is None:
        if split_dirs:
            raise HfTransferError(
                f"Image folder {root} has {sorted(p.name for p in split_dirs.values())} but no train/ folder; "
                "put the training images in train/<class>/."
            )
        train_dir, split_dirs = root, {}  # no split folders: the class folders sit at the top
    classes: dict[Path, list[str]] = {}
    for split_dir in [train_dir, *(p for p in split_dirs.values() if p != train_dir)]:
        class_dirs = _subfolders(split_dir)
        if not class_dirs:
            raise HfTransferError(
                f"Image folder {split_dir} has no class folders; put its images in one folder per class, "
                f"e.g. {split_dir}/<class name>/image.jpg."
            )
        for class_dir in class_dirs:
            nested = _subfolders(class_dir)
            if nested:  # imagefolder would then read labels from the wrong folder level
                raise HfTransferError(
                    f"Class folder {class_dir} holds the folder {nested[0].name}/; put each class's images directly "
                    f"in its folder ({class_dir}/image.jpg), one folder level below {split_dir}."
                )
            if not _image_files(class_dir):
                raise HfTransferError(
                    f"Class folder {class_dir} has no images; add images to it or remove it."
                )
        classes[split_dir] = [p.name for p in class_dirs]
    train_classes = classes[train_dir]
    if len(train_classes) < 2:
        raise HfTransferError(
            f"Training data has a single class {train_classes}; classification needs at least two."
        )
    for split_dir, names in classes.items():
        unknown = sorted(set(names) - set(train_classes))
        if unknown:
            raise HfTransferError(
                f"{split_dir} has class folder(s) {unknown} that {train_dir.name}/ does not have "
                f"(training classes: {train_classes}). Add training images for them or remove them."
            )
    return train_classes


METADATA_FILES = ("metadata.csv", "metadata.jsonl")  # datasets' imagefolder convention: labels in a table


def _has_metadata(path: Path) -> bool:
    return any((folder / name).is_file() for folder in (path, *_subfolders(path)) for name in METADATA_FILES)


def _is_image_folder(path: Path) -> bool:
    if not path.is_dir():
        return False
    tables = [p for p in path.iterdir() if p.is_file() and p.suffix in FILE_BUILDERS and p.name not in METADATA_FILES]
    return not tables


def load_raw_images(config: DataConfig) -> tuple[DatasetDict, Path | None]:
    """The data set and the folder that relative image paths in a table are relative to."""
    if config.path is None:
        raise HfTransferError("The recipe has no data.path: set an image folder, a CSV of image paths, or a Hub id.")
    path = Path(config.path)
    if _is_image_folder(path):
        if not _has_metadata(path):  # labels from class folders; with metadata.csv, from its columns
            check_image_folder(path)
        return load_dataset("imagefolder", data_dir=str(path)), path
    base_dir = path if path.is_dir() else path.parent if path.is_file() else None
    return load_raw(config), base_dir


def _as_undecoded_images(dataset: Dataset, column: str, base_dir: Path | None) -> Dataset:
    """The image column as undecoded {"bytes", "path"} values: decoding happens in the loader."""
    feature = dataset.features[column]
    if isinstance(feature, ImageFeature):
        return dataset.cast_column(column, ImageFeature(decode=False))
    if not (isinstance(feature, Value) and feature.dtype in ("string", "large_string")):
        raise HfTransferError(
            f"Column '{column}' holds {feature}, neither images nor image paths; set data.image_column."
        )
    if base_dir is not None:  # paths in a table are relative to the table's folder

        def absolute(batch: dict) -> dict:
            return {column: [p if p is None or Path(p).is_absolute() else str(base_dir / p) for p in batch[column]]}

        dataset = dataset.map(absolute, batched=True)
    return dataset.cast_column(column, ImageFeature(decode=False))


# ---------------------------------------------------------------------------------------------
# Checking every image once


@dataclass
class ImageCheck:
    """What the check pass found: unreadable files skipped, and modes converted to RGB."""

    checked: int = 0
    skipped: list[str] = field(default_factory=list)
    converted: Counter = field(default_factory=Counter)


def _image_mode(value: dict[str, Any]) -> tuple[str | None, str]:
    """(the decoded image's mode, "") or (None, why it cannot be used)."""
    try:
        return open_image(value).mode, ""
    except Image.DecompressionBombError:
        return None, f"over PIL's limit of {Image.MAX_IMAGE_PIXELS:,} pixels; resize it, or raise PIL.Image.MAX_IMAGE_PIXELS"
    except Exception:  # PIL raises OSError, SyntaxError, ValueError, ...
        return None, ""


def _describe(value: dict[str, Any], index: int) -> str:
    return value.get("path") or f"row {index}"


def check_images(dataset: Dataset, column: str, workers: int, check: ImageCheck) -> Dataset:
    """The rows whose image decodes; the others are listed in `check.skipped`."""
    values = dataset[column]
    # PIL releases the GIL while decoding, so threads decode in parallel
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        modes = list(bar(pool.map(_image_mode, values), desc="checking images", total=len(values), unit="image"))
    keep = []
    for index, (value, (mode, reason)) in enumerate(zip(values, modes)):
        if mode is None:
            check.skipped.append(_describe(value, index) + (f" ({reason})" if reason else ""))
            continue
        keep.append(index)
        if mode != "RGB":
            check.converted[mode] += 1
    check.checked += len(values)
    return dataset if len(keep) == len(values) else dataset.select(keep)


def log_image_check(check: ImageCheck) -> None:
    if check.converted:
        modes = ", ".join(f"{count} {mode}" for mode, count in sorted(check.converted.items()))
        logger.warning("images converted to RGB: %s", modes)
    if check.skipped:
        logger.warning(
            "skipped %d of %d images that cannot be decoded (truncated or not images): %s",
            len(check.skipped), check.checked, ", ".join(check.skipped),
        )


# ---------------------------------------------------------------------------------------------
# Splits, transforms and loaders


def image_num_workers(requested: int | None = None) -> int:
    """`requested` when set; else image decoding is heavy: worker processes, up to 4 (more rarely pays off)."""
    return requested if requested is not None else min(4, os.cpu_count() or 1)


def readable_images(dataset: Dataset, config: DataConfig, base_dir: Path | None, workers: int, check: ImageCheck) -> Dataset:
    """The image column undecoded (table paths made absolute); with data.verify_images, only rows that decode."""
    dataset = _as_undecoded_images(dataset, config.image_column, base_dir)
    return check_images(dataset, config.image_column, workers, check) if config.verify_images else dataset


def load_image_splits(config: DataConfig, seed: int, workers: int | None = None) -> tuple[LabelledSplits, ImageCheck]:
    """Train and validation images (undecoded), labels encoded, unreadable images dropped."""
    raw, base_dir = load_raw_images(config)
    splits = labelled_splits(raw, config, [config.image_column], seed)
    check, workers = ImageCheck(), image_num_workers(workers)
    train = readable_images(splits.train, config, base_dir, workers, check)
    validation = readable_images(splits.validation, config, base_dir, workers, check)
    if config.verify_images:
        log_image_check(check)
        require_every_class(train, splits.label_names, "unreadable images", "images")
        if len(validation) == 0:
            raise HfTransferError("No validation image can be decoded; fix the validation files.")
    return LabelledSplits(train=train, validation=validation, label_names=splits.label_names), check


def image_transforms(data_config: dict[str, Any], augment: AugmentConfig) -> tuple[Callable, Callable]:
    """(train, eval) transforms from the model's data config; only train augments."""
    from timm.data import create_transform
    from torchvision import transforms

    eval_transform = create_transform(**data_config)
    policy = augment.auto_augment
    trivial = policy is not None and policy.lower() in _TRIVIAL_AUGMENT
    try:
        primary, secondary, final = create_transform(
            **data_config,
            is_training=True,
            separate=True,  # three stages, so rotation / TrivialAugment slot in between
            scale=tuple(augment.scale),  # checked when the recipe was read (AugmentConfig.check)
            ratio=tuple(augment.ratio),
            hflip=augment.hflip,
            vflip=augment.vflip,
            color_jitter=augment.color_jitter or None,
            auto_augment=None if trivial else policy,
            re_prob=augment.re_prob,
        )
    except (AssertionError, KeyError, ValueError) as error:
        raise HfTransferError(
            f"data.augment.auto_augment '{policy}' is not a policy timm knows ({error}); use e.g. "
            "'rand-m9-mstd0.5', 'augmix-m5-w4-d2', 'original' or 'trivialaugment'."
        ) from None
    fill = [round(255 * m) for m in data_config["mean"]]  # empty corners get the mean colour
    extra = []
    if augment.rotation:
        # timm's train transform has no rotation; after the crop it rotates a small image, cheaply
        extra.append(transforms.RandomRotation(augment.rotation, fill=fill))
    if trivial:
        extra.append(transforms.TrivialAugmentWide(fill=fill))
    return transforms.Compose([primary, *extra, secondary, final]), eval_transform


def decoded_image(value: Any) -> Image.Image:
    """`load_rgb`, with one clear error for an image the check pass did not see (data.verify_images false)."""
    try:
        return load_rgb(value)
    except Exception as error:
        where = value.get("path") if isinstance(value, dict) else value
        raise HfTransferError(
            f"Cannot decode the image {where} ({type(error).__name__}); set data.verify_images true to skip "
            "unreadable images, or fix the file."
        ) from None


def with_transform(dataset: Dataset, transform: Callable, column: str) -> Dataset:
    """Decode, convert and transform on access (in the loader's workers): nothing is cached."""

    def apply(batch: dict) -> dict:
        pixels = [transform(decoded_image(value)) for value in batch[column]]
        return {"pixel_values": pixels, "labels": batch["label"]}

    return dataset.with_transform(apply)


def image_loader(dataset: Dataset, batch_size: int, shuffle: bool, num_workers: int, seed: int) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,  # no re-forking of decoders every epoch
        pin_memory=torch.cuda.is_available(),
        # a last training batch of one image breaks BatchNorm in train mode
        drop_last=shuffle and len(dataset) % batch_size == 1,
        generator=torch.Generator().manual_seed(seed) if shuffle else None,
    )
