"""Crash-safe checkpoints: what a killed run needs to continue as if it had never stopped.

A checkpoint is Accelerate's `save_state` (model, optimiser, gradient scaler, every process's RNG)
plus what Accelerate does not know about: the learning-rate schedule, the loop's position and
counters, the history, and the best epoch's weights (the loop keeps those in memory). It is written
into `checkpoints/.tmp-checkpoint-N` and renamed to `checkpoints/checkpoint-N` once complete, so a
folder named `checkpoint-N` is always whole; the newest `output.save_total_limit` are kept.

The data position is the number of batches of the current epoch already trained on: the samplers
are seeded per epoch (Accelerate's seedable sampler, or the length-grouped sampler's own seed), so
on resume the epoch's batches come out in the same order and the first ones are skipped.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import pickle
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, skip_first_batches
from safetensors.torch import load_file, save_file

from hf_transfer.console import say
from hf_transfer.errors import HfTransferError

CHECKPOINTS_DIR = "checkpoints"
PREFIX = "checkpoint-"
TEMPORARY_PREFIX = ".tmp-"
STATE_FILE = "trainer_state.json"
SCHEDULER_FILE = "scheduler.pt"
BEST_WEIGHTS_FILE = "best_weights.safetensors"

# Recipe keys that may change between a run and its resumption: they change how it logs, loads data
# and writes, not what it computes. Every other key must match, or a resumed run would silently mix
# two runs (a new learning rate in recipe.yaml and the card while the schedule keeps the old one).
MAY_CHANGE = (
    "name", "description", "output.", "rank.",  # rank: read by `hf-transfer rank` only
    *(f"training.{key}" for key in (
        "logging_steps", "num_workers", "eval_batch_size", "save_checkpoints", "checkpoint_every_steps",
        "feature_cache_dir", "report_to",
    )),
)


@dataclass
class LoopState:
    """The training loop's position and everything it has accumulated: what a checkpoint restores."""

    epoch: int = 0  # the epoch in progress, counted from 0
    batches_done: int = 0  # batches of that epoch already trained on (by each process)
    update: int = 0  # optimiser steps taken so far
    samples: int = 0  # training examples seen, all processes together
    train_seconds: float = 0.0
    running_loss: float = 0.0  # sum of this epoch's batch losses so far (this process)
    loss_count: int = 0
    best_score: float = -math.inf
    best_epoch: int = -1
    best_metrics: dict[str, Any] = field(default_factory=dict)
    epochs_without_gain: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped_early: bool = False


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first (by optimiser step)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def find_resume_checkpoint(resume: str, output_dir: Path) -> Path:
    """`latest` (the newest checkpoint of `output_dir`), a checkpoint folder, or a run's output folder."""
    if resume == "latest":
        candidates = list_checkpoints(output_dir / CHECKPOINTS_DIR)
        if not candidates:
            raise HfTransferError(
                f"No checkpoint in {output_dir / CHECKPOINTS_DIR} to resume from. Train without --resume "
                "(with --overwrite to reuse the folder), or give --resume the path of a checkpoint."
            )
        return candidates[-1]
    path = Path(resume)
    if (path / STATE_FILE).is_file():
        return path
    candidates = list_checkpoints(path / CHECKPOINTS_DIR)
    if candidates:
        return candidates[-1]
    raise HfTransferError(
        f"--resume {resume}: not a checkpoint (no {STATE_FILE}) nor an output folder with checkpoints. "
        f"Give a folder like {output_dir / CHECKPOINTS_DIR / (PREFIX + '120')}, or `--resume` alone for the newest."
    )


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def changed_recipe_keys(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Keys outside MAY_CHANGE whose values differ between the checkpoint's recipe and this one."""
    old, new = _flatten(saved), _flatten(current)
    keys = sorted(k for k in set(old) | set(new) if not k.startswith(MAY_CHANGE) and old.get(k) != new.get(k))
    return keys


def read_checkpoint_record(path: Path) -> dict[str, Any]:
    try:
        record = json.loads((path / STATE_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise HfTransferError(
            f"Cannot resume from {path}: {STATE_FILE} cannot be read ({type(error).__name__}); the checkpoint is "
            "damaged. Resume from another checkpoint (--resume PATH) or start again."
        ) from None
    if not isinstance(record, dict) or not {"state", "recipe", "num_processes"} <= set(record):
        raise HfTransferError(f"Cannot resume from {path}: {STATE_FILE} is not a checkpoint record.")
    return record


def check_resumable(path: Path, recipe: dict[str, Any], num_processes: int) -> dict[str, Any]:
    """Refuse, before anything is written, a resume that would not continue the same run; returns its record."""
    record = read_checkpoint_record(path)
    changed = changed_recipe_keys(record["recipe"], recipe)
    if changed:
        raise HfTransferError(
            f"Cannot resume from {path}: the recipe differs in {', '.join(changed)}. Resume with the recipe "
            f"the run started with (saved as recipe.yaml in the output folder), or start a new run."
        )
    if record["num_processes"] != num_processes:
        raise HfTransferError(
            f"{path} was written by {record['num_processes']} process(es); resume it with the same number "
            f"(accelerate launch --num_processes {record['num_processes']} ...), not {num_processes}."
        )
    return record


def recorded_tuning(path: Path | None) -> dict[str, Any] | None:
    """What training.batch_size / lr auto found in the run the checkpoint at `path` belongs to (None: no
    checkpoint, or nothing was auto): a resumed run trains with these, not with a new search's."""
    return read_checkpoint_record(path).get("auto_tuning") if path is not None else None


def parameters_are_finite(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def set_loader_epoch(loader: Any, epoch: int) -> None:
    """Pin the epoch of every sampler behind a prepared loader, so its order depends on (seed, epoch).

    Accelerate's `set_epoch` reaches its seedable sampler, but not a custom batch sampler once it
    is sharded across processes (BatchSamplerShard hides it); walk the chain and set each one.
    """
    loader.set_epoch(epoch)
    sampler, seen = getattr(loader, "batch_sampler", None), set()
    while sampler is not None and id(sampler) not in seen:
        seen.add(id(sampler))
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        sampler = getattr(sampler, "batch_sampler", None) or getattr(sampler, "sampler", None)


def resume_batches(loader: Any, batches_done: int) -> Iterator[Any]:
    """The rest of an epoch that a checkpoint interrupted: its batches after the first `batches_done`.

    Starting a DataLoader draws a worker seed from the global RNG. The uninterrupted run drew it at
    the epoch's start, before the state the checkpoint holds; drawing it again now would shift
    every later dropout mask. So the RNG is put back as the checkpoint left it once the loader runs.
    """
    iterator = iter(skip_first_batches(loader, batches_done))
    rng = torch.get_rng_state()
    first = next(iterator, None)
    torch.set_rng_state(rng)
    return iter(()) if first is None else itertools.chain([first], iterator)


class Checkpointer:
    """Writes checkpoints of one run and restores the one it resumes from.

    Not Accelerate's `ProjectConfiguration(automatic_checkpoint_naming=True, total_limit=N)`: that writes
    straight into checkpoint_N, so a run killed mid-save leaves a folder that looks complete; here a
    checkpoint is renamed into place only once whole, and pruned only after.

    Every process calls `save` and `restore` (each has its own RNG state); only the main process
    writes the shared files, renames and prunes.
    """

    def __init__(
        self,
        output_dir: Path,
        accelerator: Accelerator,
        recipe: dict[str, Any],
        every_steps: int | None = None,
        keep: int = 1,
        resume_from: Path | None = None,
        tuning: dict[str, Any] | None = None,
    ):
        self.root = output_dir / CHECKPOINTS_DIR
        self.log_path = output_dir / "log.jsonl"
        self.accelerator = accelerator
        self.recipe = recipe
        self.every_steps = every_steps
        self.keep = max(1, keep)
        self.resume_from = resume_from
        self.tuning = tuning  # what training.batch_size / lr auto found (auto.py): a resumed run takes it
        self.last_saved: Path | None = None
        if accelerator.is_main_process:
            if resume_from is None:  # a fresh run: old checkpoints are another run's (other files stay)
                for old in list_checkpoints(self.root):
                    shutil.rmtree(old, ignore_errors=True)
            for leftover in self.root.glob(f"{TEMPORARY_PREFIX}{PREFIX}*"):  # a save that was killed half way
                shutil.rmtree(leftover, ignore_errors=True)
        accelerator.wait_for_everyone()

    def due(self, update: int, end_of_epoch: bool) -> bool:
        """A mid-epoch checkpoint is due (the epoch's last step gets the epoch-end checkpoint instead)."""
        return bool(self.every_steps) and update % self.every_steps == 0 and not end_of_epoch

    def describe_last_good(self) -> str:
        if self.last_saved is None:
            return "No checkpoint had been written yet."
        return (
            f"The last good checkpoint is {self.last_saved} (after step {self.last_saved.name[len(PREFIX):]}); "
            "`train --resume` continues from it with the settings it was saved with."
        )

    def save(
        self,
        model: torch.nn.Module,
        scheduler: Any,
        state: LoopState,
        best_weights: dict[str, torch.Tensor] | None,
    ) -> Path:
        """Write a checkpoint of the current step, atomically; returns its folder."""
        if not parameters_are_finite(model):  # never store weights that cannot be resumed from
            raise HfTransferError(
                f"The model's weights became NaN or infinite by optimiser step {state.update}. "
                f"{self.describe_last_good()} Lower training.lr, keep max_grad_norm set, or use bf16 instead of fp16."
            )
        accelerator = self.accelerator
        final = self.root / f"{PREFIX}{state.update}"
        temporary = self.root / f"{TEMPORARY_PREFIX}{final.name}"
        try:
            self._write(temporary, model, scheduler, state, best_weights)
        except OSError as error:  # disk full, quota, read-only: no half checkpoint may stay behind
            shutil.rmtree(temporary, ignore_errors=True)
            raise HfTransferError(
                f"Writing the checkpoint of step {state.update} failed ({error.strerror or error}); the partial "
                f"checkpoint was removed. {self.describe_last_good()} Free some space, then resume."
            ) from None
        # every process has written its RNG state into the temporary folder before the main process renames it:
        # without this barrier a slower process recreates the temporary folder after the rename, leaving its
        # random_states file outside the checkpoint (seen under load with two CPU processes)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            if final.exists():  # the same step saved again; cannot happen in the loop, but be safe
                shutil.rmtree(final)
            os.replace(temporary, final)
            for old in list_checkpoints(self.root)[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()
        self.last_saved = final
        return final

    def _write(self, temporary: Path, model: torch.nn.Module, scheduler: Any, state: LoopState,
               best_weights: dict[str, torch.Tensor] | None) -> None:
        accelerator = self.accelerator
        if accelerator.is_main_process:
            shutil.rmtree(temporary, ignore_errors=True)
            temporary.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(temporary))  # model + optimiser by the main process, RNG by each process
        if accelerator.is_main_process:
            torch.save(scheduler.state_dict(), temporary / SCHEDULER_FILE)
            if best_weights:
                save_file({k: v.contiguous() for k, v in best_weights.items()}, str(temporary / BEST_WEIGHTS_FILE))
            record = {
                "state": dataclasses.asdict(state),
                "num_processes": accelerator.num_processes,
                "log_bytes": self.log_path.stat().st_size if self.log_path.is_file() else 0,
                "recipe": self.recipe,
                "auto_tuning": self.tuning,
            }
            (temporary / STATE_FILE).write_text(json.dumps(record, indent=1))

    def restore(self, scheduler: Any) -> tuple[LoopState, dict[str, torch.Tensor] | None]:
        """Load the checkpoint given at construction into the prepared objects; returns the loop state
        and the best epoch's weights."""
        path = self.resume_from
        if path is None:
            raise ValueError("restore() needs a checkpoint to resume from")
        record = check_resumable(path, self.recipe, self.accelerator.num_processes)
        try:  # Accelerate reads optimiser, scaler and RNG files with torch.load(weights_only=True)
            self.accelerator.load_state(str(path))
            scheduler.load_state_dict(torch.load(path / SCHEDULER_FILE, map_location="cpu", weights_only=True))
            best_file = path / BEST_WEIGHTS_FILE
            best_weights = load_file(str(best_file)) if best_file.is_file() else None
        except (pickle.UnpicklingError, RuntimeError, OSError, ValueError, KeyError) as error:
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise HfTransferError(
                f"Cannot resume from {path}: {type(error).__name__}: {first_line}. Only tensors and plain values "
                "are read back (safetensors, torch.load with weights_only=True); a checkpoint that holds anything "
                "else, or that does not fit this model, is refused. Resume from another checkpoint or start again."
            ) from None
        if self.accelerator.is_main_process:
            self._truncate_log(record["log_bytes"])
        self.accelerator.wait_for_everyone()
        self.last_saved = path
        state = LoopState(**record["state"])
        say(self.accelerator,
            f"resumed from {path}: epoch {state.epoch + 1}, {state.batches_done} batches into it, step {state.update}"
        )
        return state, best_weights

    def _truncate_log(self, size: int) -> None:
        """Drop log lines written after the checkpoint: the resumed run writes them again."""
        if self.log_path.is_file() and self.log_path.stat().st_size > size:
            with self.log_path.open("r+b") as log:
                log.truncate(size)
