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


def prepare_output_dir(path: Path, overwrite: bool) -> None:
    """Create the folder; refuse a non-empty one unless told to overwrite (nothing is deleted)."""
    if path.exists() and not path.is_dir():
        raise HfTransferError(f"Output path {path} is a file; choose a folder with output.dir.")
    if path.is_dir() and any(p.name != STAGING for p in path.iterdir()) and not overwrite:
        raise HfTransferError(
            f"Output folder {path} is not empty. Choose another with --output-dir (or output.dir), "
            "or pass --overwrite to replace the files a run writes there."
        )
    path.mkdir(parents=True, exist_ok=True)


@contextmanager
def staged(destination: Path) -> Iterator[Path]:
    """Yield a staging folder; on success move its contents into `destination` by renames."""
    staging = destination / STAGING
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    yield staging
    for item in sorted(staging.iterdir()):
        target = destination / item.name
        if target.is_dir() and not item.is_dir():
            shutil.rmtree(target)
        if item.is_dir() and target.exists():
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        os.replace(item, target)
    staging.rmdir()


def write_text(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def write_json(path: Path, value: Any) -> None:
    write_text(path, json.dumps(value, indent=2) + "\n")
