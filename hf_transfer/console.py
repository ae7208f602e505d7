"""What the commands show: progress bars labelled by step, library noise off unless verbose, and
with quiet nothing but errors and a command's own output (predictions, lists).

`configure` is called once by the CLI; the Python API leaves the libraries' own settings alone.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable
from typing import Any

from tqdm.auto import tqdm

_quiet = False


def configure(verbose: bool = False, quiet: bool = False) -> None:
    global _quiet
    _quiet = quiet
    logging.getLogger("hf_transfer").setLevel(logging.ERROR if quiet else logging.NOTSET)
    if verbose:
        return
    # load reports, "Generating split" / "Map" / "Loading weights" bars, deprecation notices of the
    # libraries: the run's own lines say what happens
    import datasets
    import huggingface_hub
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    huggingface_hub.utils.disable_progress_bars()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def is_quiet() -> bool:
    return _quiet


def _main_process() -> bool:
    from accelerate import PartialState

    return PartialState().is_local_main_process


def bar(iterable: Iterable | None = None, *, desc: str, total: int | None = None, **options: Any) -> tqdm:
    """A labelled progress bar on the main process; none when quiet, or when stderr is not a terminal."""
    disable = True if _quiet or not _main_process() else None  # None: tqdm hides it when not a terminal
    return tqdm(iterable, desc=desc, total=total, disable=disable, dynamic_ncols=True, **options)


def say(accelerator: Any, message: str) -> None:
    """A line of the run's own account (the main process's), unless quiet."""
    if not _quiet:
        accelerator.print(message)
