"""Loading a labelled data set into train and validation splits, whatever its modality.

Handles what every task shares: local files or a Hub id through `datasets.load_dataset`, label
names and ids, checking labels across splits, sampling, and carving a stratified validation split.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from array import array
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from datasets import ClassLabel, Dataset, DatasetDict, load_dataset

from hf_transfer.errors import HfTransferError
from hf_transfer.recipe import DataConfig

# file suffix -> (datasets builder, extra builder arguments)
FILE_BUILDERS = {
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"delimiter": "\t", "quoting": csv.QUOTE_NONE}),  # GLUE-style TSVs carry raw quotes
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".parquet": ("parquet", {}),
}
VALIDATION_ALIASES = ("validation", "valid", "val", "dev")


@dataclass
class LabelledSplits:
    """Train and validation sets whose `label` column holds class ids into `label_names`."""

    train: Dataset
    validation: Dataset
    label_names: list[str]


def column_values(dataset: Dataset, column: str) -> list:
    """A column as a list, read from Arrow at once.

    `dataset[column]` is a lazy Column in datasets 4 and later; iterating it formats one row at a
    time (4.7 s for SST-2's 67,349 labels here), while slicing it converts the whole Arrow column (12 ms).
    """
    return dataset[column][:]


def require_every_class(train: Dataset, label_names: list[str], skipped: str, items: str) -> None:
    """After unusable files were skipped (`skipped`: what they were), every class must keep some `items`."""
    present = set(column_values(train, "label"))
    missing = [name for i, name in enumerate(label_names) if i not in present]
    if missing:
        raise HfTransferError(
            f"After skipping {skipped} the training data has no {items} of class(es) {missing}; "
            "fix or replace those files."
        )


def _canonical(split: str) -> str:
    return "validation" if split in VALIDATION_ALIASES else split


def _load_files(files: dict[str, Path]) -> DatasetDict:
    suffixes = {p.suffix for p in files.values()}
    if len(suffixes) != 1:
        raise HfTransferError(f"Data files mix formats {sorted(suffixes)}; keep one format per data set.")
    for split, path in files.items():
        if path.stat().st_size == 0:  # datasets would fail with an obscure "corresponds to no data"
            raise HfTransferError(f"The {_canonical(split)} split is empty ({path}); give it some examples.")
    builder, kwargs = FILE_BUILDERS[suffixes.pop()]
    try:
        return load_dataset(builder, data_files={k: str(v) for k, v in files.items()}, **kwargs)
    except Exception as error:  # datasets wraps a bad file's parser error in its own types
        raise HfTransferError(_unreadable_file_reason(files, error)) from None


def read_table(path: Path):
    """One data file as a `datasets.Dataset` (its only split), or one clear error."""
    if path.suffix not in FILE_BUILDERS:
        raise HfTransferError(f"Cannot read {path}: use one of {', '.join(FILE_BUILDERS)}.")
    return _load_files({"train": path})["train"]


def _unreadable_file_reason(files: dict[str, Path], error: Exception) -> str:
    """What is wrong with the data file that `datasets` could not read, as precisely as can be found."""
    for split, path in files.items():
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as decode_error:
            return (f"{path} is not UTF-8 text (byte {decode_error.start} cannot be decoded); "
                    "save it as UTF-8 (e.g. iconv -f latin1 -t utf-8).")
        rows = [line for line in text.splitlines() if line.strip()]
        if path.suffix != ".parquet" and len(rows) <= (1 if path.suffix in (".csv", ".tsv") else 0):
            return f"The {_canonical(split)} split is empty ({path} has no rows); give it some examples."
        if path.suffix == ".jsonl":
            for number, line in enumerate(text.splitlines(), start=1):
                try:
                    if line.strip():
                        json.loads(line)
                except json.JSONDecodeError as json_error:
                    return f"{path}, line {number}, is not valid JSON ({json_error.msg}); fix or remove that line."
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
    names = ", ".join(str(p) for p in files.values())
    return f"Cannot read {names} ({type(error).__name__}: {first_line}); check that each file is a valid table."


def load_raw(config: DataConfig) -> DatasetDict:
    """The data set as `datasets` reads it: a data file, a folder of split files, or a Hub id."""
    if config.path is None:
        raise HfTransferError("The recipe has no data.path: set a Hub dataset id or a local folder/file.")
    path = Path(config.path)
    if path.is_file():
        if path.suffix not in FILE_BUILDERS:
            raise HfTransferError(f"Cannot read {path}: use one of {', '.join(FILE_BUILDERS)}.")
        return _load_files({config.train_split: path})
    if path.is_dir():
        files = {p.stem: p for p in sorted(path.iterdir()) if p.is_file() and p.suffix in FILE_BUILDERS}
        if not files:
            raise HfTransferError(
                f"Folder {path} has no data files ({', '.join(FILE_BUILDERS)}); "
                "name them by split, e.g. train.csv and validation.csv."
            )
        return _load_files(files)
    if path.suffix in FILE_BUILDERS or config.path.startswith((".", "/")):
        raise HfTransferError(f"Data path '{config.path}' does not exist.")
    try:
        return load_dataset(config.path, config.name)
    except Exception as error:  # datasets raises many types for a missing or unreachable dataset
        raise HfTransferError(
            f"Cannot load data set '{config.path}' from the Hub ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}). Check the id and your network, "
            "or point data.path at a local folder or file."
        ) from None


def _pick_split(raw: DatasetDict, wanted: str | None, aliases: tuple[str, ...] = ()) -> Dataset | None:
    for name in (wanted, *aliases):
        if name and name in raw:
            return raw[name]
    return None


def check_columns(dataset: Dataset, columns: list[str], split: str) -> None:
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise HfTransferError(
            f"Column(s) {missing} not found in the {split} split; it has columns {dataset.column_names}. "
            "Set data.text_column / data.image_column / data.audio_column / data.label_column to the right names."
        )


def label_keys(values: list[object], split: str, column: str) -> list[str]:
    """Label values as class names: 1, 1.0 and "1" are one class, and so are "positive " and "positive".

    Empty cells, non-integer numbers (a regression target, not classes) and a column that mixes
    numbers with words are errors: each would otherwise become a class of its own in silence.
    """
    keys, empty, numbers, words = [], [], [], []
    for row, value in enumerate(values):
        if value is None or (isinstance(value, str) and not value.strip()) or (isinstance(value, float) and math.isnan(value)):
            empty.append(row)
            continue
        if isinstance(value, float):
            if not value.is_integer():
                raise HfTransferError(
                    f"The {split} split's label column '{column}' holds {value!r} (row {row}), not a class: "
                    "classification needs class names or integer ids."
                )
            value = int(value)
        key = str(value).strip()
        is_number = (isinstance(value, int) and not isinstance(value, bool)) or key.lstrip("-").isdigit()
        (numbers if is_number else words).append(key)
        keys.append(key)
    if empty:
        raise HfTransferError(
            f"The {split} split has {len(empty)} empty label(s) in column '{column}' (first at row {empty[0]}); "
            "fill them in or drop those rows."
        )
    if numbers and words:
        raise HfTransferError(
            f"The {split} split's label column '{column}' mixes numbers and words (e.g. {numbers[0]!r} and "
            f"{words[0]!r}); use one kind of label for every row."
        )
    return keys


def _label_names(train: Dataset, config: DataConfig) -> list[str]:
    feature = train.features[config.label_column]
    if config.label_names:
        return list(config.label_names)
    if isinstance(feature, ClassLabel):
        return list(feature.names)
    keys = set(label_keys(column_values(train, config.label_column), "train", config.label_column))
    numeric = all(k.lstrip("-").isdigit() for k in keys)
    return sorted(keys, key=int if numeric else str)


def _encode_labels(dataset: Dataset, split: str, config: DataConfig, names: list[str]) -> Dataset:
    """Map the label column to ids into `names` and cast it to a ClassLabel."""
    column = config.label_column
    feature = dataset.features[column]
    values = column_values(dataset, column)
    if isinstance(feature, ClassLabel):
        keys = [feature.names[i] for i in values]
    elif config.label_names and all(isinstance(v, int) for v in values):
        # integer ids index the recipe's label_names
        keys = [names[v] if 0 <= v < len(names) else str(v) for v in values]
    else:
        keys = label_keys(values, split, column)
    unknown = sorted(set(keys) - set(names))
    if unknown:
        raise HfTransferError(
            f"The {split} split has label(s) {unknown} that training does not know "
            f"(known: {names}). Fix the labels or set data.label_names."
        )
    to_id = {name: i for i, name in enumerate(names)}
    ids = array("l", (to_id[k] for k in keys))
    # add_column fingerprints its values by pickling them one by one (seconds for SST-2's 67,349
    # labels); a digest of their bytes says the same
    fingerprint = hashlib.blake2b(f"{dataset._fingerprint}{column}{names}".encode() + ids.tobytes(), digest_size=16)
    dataset = dataset.remove_columns(column).add_column("label", ids.tolist(), new_fingerprint=fingerprint.hexdigest())
    return dataset.cast_column("label", ClassLabel(names=names))


def encode_split(dataset: Dataset, split: str, config: DataConfig, columns: list[str], names: list[str]) -> Dataset:
    """A labelled split checked (not empty, columns present) and its labels mapped to ids into `names`."""
    if len(dataset) == 0:
        raise HfTransferError(f"The {split} split is empty; give it some examples.")
    check_columns(dataset, [*columns, config.label_column], split)
    return _encode_labels(dataset, split, config, names)


def _carve_validation(train: Dataset, names: list[str], config: DataConfig, seed: int) -> DatasetDict:
    """A stratified, seeded share of train as validation: every class needs a row on each side."""
    counts = Counter(column_values(train, "label"))
    rare = [names[c] for c in range(len(names)) if counts.get(c, 0) < 2]
    if rare:
        raise HfTransferError(
            f"Class(es) {rare} have fewer than 2 training examples, too few to carve a stratified validation "
            "split from; add examples, or give a validation split (e.g. validation.csv beside train.csv)."
        )
    try:
        return train.train_test_split(test_size=config.validation_fraction, stratify_by_column="label", seed=seed)
    except ValueError as error:  # scikit-learn-style: a share too small to hold every class
        raise HfTransferError(
            f"Cannot carve a stratified validation split of {config.validation_fraction:g} ({error}); "
            "raise data.validation_fraction or give a validation split."
        ) from None


def seeded_sample(dataset: Dataset, limit: int | None, seed: int) -> Dataset:
    """At most `limit` examples, drawn with `seed` (all of them, in order, when the limit is None or not smaller)."""
    if limit is None or limit >= len(dataset):
        return dataset
    return dataset.shuffle(seed=seed).select(range(limit))


def labelled_splits(raw: DatasetDict, config: DataConfig, columns: list[str], seed: int) -> LabelledSplits:
    """Train and validation with checked columns and encoded labels; validation carved if absent."""
    train = _pick_split(raw, config.train_split)
    if train is None:
        raise HfTransferError(
            f"No '{config.train_split}' split in the data (splits: {list(raw)}); set data.train_split."
        )
    validation = _pick_split(raw, config.validation_split, VALIDATION_ALIASES)
    for split, dataset in (("train", train), ("validation", validation)):
        if dataset is not None:
            if len(dataset) == 0:
                raise HfTransferError(f"The {split} split is empty; give it some examples.")
            check_columns(dataset, [*columns, config.label_column], split)
    names = _label_names(train, config)
    if len(names) < 2:
        raise HfTransferError(f"Training data has a single class {names}; classification needs at least two.")
    train = _encode_labels(train, "train", config, names)
    if validation is None:
        parts = _carve_validation(train, names, config, seed)
        train, validation = parts["train"], parts["test"]
    else:
        validation = _encode_labels(validation, "validation", config, names)
    return LabelledSplits(
        train=seeded_sample(train, config.max_train_samples, seed),
        validation=seeded_sample(validation, config.max_eval_samples, seed),
        label_names=names,
    )
