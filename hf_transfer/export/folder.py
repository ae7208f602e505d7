"""The output folder: guarded against overwriting, written so a killed run leaves no half file.

Files go to a staging folder first and are renamed into place one by one; a rename is atomic,
so a file in the output folder is always complete.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hf_transfer.errors import HfTransferError

STAGING = ".staging"


def check_output_dir(path: Path, overwrite: bool) -> None:
    """Refuse a file, a folder that cannot be written, or a non-empty folder unless told to overwrite.

    Writes nothing: a run checks this before any work, and creates the folder only once it starts.
    """
    if path.exists() and not path.is_dir():
        raise HfTransferError(f"Output path {path} is a file; choose a folder with output.dir.")
    existing = next(p for p in (path, *path.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise HfTransferError(f"Output folder {path} would lie under the file {existing}; choose another folder.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise HfTransferError(f"Output folder {path} cannot be written ({existing} is read-only); choose another folder.")
    if path.is_dir() and any(p.name != STAGING for p in path.iterdir()) and not overwrite:
        raise HfTransferError(
            f"Output folder {path} is not empty. Choose another with --output-dir (or output.dir), "
            "or pass --overwrite to replace the files a run writes there."
        )


def create_output_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise HfTransferError(f"Cannot create output folder {path}: {error.strerror or error}.") from None


def _move_into(item: Path, target: Path) -> None:
    """Rename `item` to `target`; a folder is merged into an existing one, so files the run did not
    write there (the user's own) stay."""
    if item.is_dir() and target.is_dir():
        for child in sorted(item.iterdir()):
            _move_into(child, target / child.name)
        item.rmdir()
        return
    if target.is_dir():
        raise HfTransferError(f"{target} is a folder, where the run writes a file; move it away and save again.")
    os.replace(item, target)


@contextmanager
def staged(destination: Path) -> Iterator[Path]:
    """Yield a staging folder; on success move its contents into `destination` by renames.

    On a failure (a full disk, say) the staging folder is removed and the destination is as it was,
    file by file: each file is either the old one or the new one, never half of one.
    """
    staging = destination / STAGING
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir(parents=True)
        yield staging
        for item in sorted(staging.iterdir()):
            _move_into(item, destination / item.name)
        staging.rmdir()
    except OSError as error:
        raise HfTransferError(f"Saving into {destination} failed: {error.strerror or error}.") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_text(path: Path, text: str) -> None:
    """Written to a temporary name and renamed: the file is the old one or the new one, never half."""
    temporary = path.with_name(path.name + ".tmp")
    try:
        temporary.write_text(text)
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise HfTransferError(f"Writing {path} failed: {error.strerror or error}.") from None


def write_json(path: Path, value: Any) -> None:
    write_text(path, json.dumps(value, indent=2) + "\n")


def read_json(path: Path) -> dict:
    """A JSON object from a run folder's file; a damaged or missing file is one clear error."""
    try:
        values = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise HfTransferError(f"Cannot read {path} ({error}); it may be truncated: train again or restore it.") from None
    if not isinstance(values, dict):
        raise HfTransferError(f"{path} is not a JSON object; it may be damaged: train again or restore it.")
    return values
