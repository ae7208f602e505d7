"""A running loop as its callbacks see it: the prepared objects, the loop's state, and its actions."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from accelerate import Accelerator

from hf_transfer.errors import HfTransferError
from hf_transfer.recipe import TrainingConfig
from hf_transfer.training.checkpoint import LoopState


class LossTally:
    """Batch losses summed on the device, read only at logging steps, checkpoints and epoch ends.

    Reading the loss every step (`.item()`) would make the CPU wait for the GPU at every step, so
    it could never queue the next one ahead. The first step whose loss was not finite is remembered
    on the device too, so the error still names that step.
    """

    def __init__(self, device: torch.device):
        self.total = torch.zeros((), dtype=torch.float64, device=device)
        self.bad_step = torch.full((), -1, dtype=torch.long, device=device)
        self.bad_value = torch.zeros((), device=device)

    def add(self, loss: torch.Tensor, step: int) -> None:
        newly_bad = ~torch.isfinite(loss) & (self.bad_step < 0)
        self.bad_step = torch.where(newly_bad, step, self.bad_step)
        self.bad_value = torch.where(newly_bad, loss.float(), self.bad_value)
        self.total += loss

    def take(self, accelerator: Accelerator) -> tuple[float, int | None, float]:
        """(sum since the last take, first non-finite step on any process or None, its loss)."""
        bad_steps = self.bad_step.reshape(1)
        if accelerator.num_processes > 1:  # every process must stop together
            bad_steps = accelerator.gather(bad_steps)
        bad = [int(s) for s in bad_steps.tolist() if s >= 0]
        total = float(self.total)
        self.total.zero_()
        return total, (min(bad) if bad else None), float(self.bad_value)


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of what training can change: trainable parameters and buffers (BN statistics)."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    buffers = {n for n, _ in model.named_buffers()}
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items() if k in trainable | buffers}


class Loop:
    """What callbacks see of a running loop: the prepared objects, the state, and three actions."""

    def __init__(self, model, optimizer, scheduler, accelerator: Accelerator, config: TrainingConfig,
                 failure_note: Callable[[], str] = lambda: ""):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.accelerator, self.config, self.failure_note = accelerator, config, failure_note
        self.state = LoopState()  # position, counters, best metric, history: what a checkpoint keeps
        self.best_weights: dict[str, torch.Tensor] | None = None
        self.stop = False  # set by a callback at an epoch's end to end training there
        self.epoch = 0
        self.losses = LossTally(accelerator.device)
        self._clock = time.perf_counter()

    def keep_epoch(self, metrics: dict[str, Any], score: float) -> None:
        """Remember this epoch's weights as the ones the run ends with."""
        state = self.state
        state.best_score, self.best_weights, state.epochs_without_gain = score, _snapshot(self.accelerator.unwrap_model(self.model)), 0
        state.best_metrics, state.best_epoch = metrics, self.epoch + 1

    def fold_losses(self) -> None:
        """Fold the device-side loss sum into the state; stop at a non-finite loss."""
        total, bad_step, bad_value = self.losses.take(self.accelerator)
        if bad_step is not None:
            notes = self.failure_note()
            raise HfTransferError(
                f"The loss became {bad_value} at optimiser step {bad_step} (epoch {self.epoch + 1}). "
                + (notes + " " if notes else "")
                + "Lower training.lr, keep max_grad_norm set, or use bf16 instead of fp16."
            )
        self.state.running_loss += total

    def restart_clock(self) -> None:
        self._clock = time.perf_counter()

    def stop_clock(self) -> None:
        self.state.train_seconds += time.perf_counter() - self._clock

    @contextmanager
    def untimed(self) -> Iterator[None]:
        """Work inside an epoch that is not training (a checkpoint) and must not count as its time."""
        self.stop_clock()
        yield
        self.restart_clock()

    def mean_loss(self) -> float:
        """The epoch's mean batch loss so far, averaged over processes (each saw different batches)."""
        state, accelerator = self.state, self.accelerator
        mean = torch.tensor(state.running_loss / max(state.loss_count, 1), dtype=torch.float64, device=accelerator.device)
        return float(accelerator.reduce(mean, reduction="mean"))
