"""The training loop on Accelerate, readable top to bottom.

One loop for every mode: it trains a `Plan` (plan.py), whose batches are dicts with `labels` and
whose model maps the rest to logits. Mixed precision, accumulation and device placement are
Accelerate's; the loop adds the schedule, clipping and an evaluation each epoch. Everything else
plugs in as callbacks (callbacks.py): which epoch to keep, early stopping, checkpoints, gradual
unfreezing, the cached feature view, a domain loss.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from tqdm.auto import tqdm

from hf_transfer.errors import HfTransferError
from hf_transfer.recipe import TrainingConfig
from hf_transfer.training.checkpoint import LoopState, resume_batches, set_loader_epoch
from hf_transfer.training.cuda_graphs import GraphedStep, make_lr_tensors
from hf_transfer.training.metrics import evaluate, scalar_metrics, split_batch
from hf_transfer.training.optim import build_optimizer, build_scheduler, class_weights, set_train_mode
from hf_transfer.training.plan import Callback, Plan


@dataclass
class TrainResult:
    best_metrics: dict[str, Any]
    best_epoch: int
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped_early: bool = False
    train_seconds: float = 0.0
    train_samples_per_second: float = 0.0
    epoch_seconds: list[float] = field(default_factory=list)  # training time of each epoch run here


class JsonlLog:
    """Appends one JSON object per line; only the main process writes."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def write(self, **record: Any) -> None:
        if self.enabled:
            with self.path.open("a") as log:
                log.write(json.dumps(record) + "\n")


def cuda_graphs_blocker(
    config: TrainingConfig, accelerator: Accelerator, callbacks: Sequence[Callback] = ()
) -> str | None:
    """Why training steps cannot be CUDA graphs here, or None when they can."""
    checks = {
        "training.cuda_graphs is false": not config.cuda_graphs,
        "the device is not a CUDA GPU": accelerator.device.type != "cuda",
        "several processes": accelerator.num_processes > 1,
        "fp16 loss scaling synchronises with the CPU": accelerator.mixed_precision == "fp16",
        "gradient accumulation": config.gradient_accumulation_steps > 1,
        f"optimizer {config.optimizer}": config.optimizer not in ("adam", "adamw"),
        "the onecycle schedule changes momentum too": config.scheduler == "onecycle",
        "torch.compile is on": config.compile != "no",
    }
    reason = next((reason for reason, blocked in checks.items() if blocked), None)
    return reason or next((c.cuda_graphs_blocker for c in callbacks if c.cuda_graphs_blocker), None)


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
                 callbacks: Sequence[Callback]):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.accelerator, self.config, self.callbacks = accelerator, config, callbacks
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
            notes = " ".join(note for note in (c.failure_note() for c in self.callbacks) if note)
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


def train(
    plan: Plan, config: TrainingConfig, accelerator: Accelerator, run_dir: Path, callbacks: Sequence[Callback] = ()
) -> TrainResult:
    """Train the plan, evaluate every epoch, and leave the kept epoch's weights in `plan.model`.

    `callbacks` run after the plan's own, in order (callbacks.py: the epoch rule, early stopping,
    checkpoints); without an epoch rule the model ends with its last weights and no kept metrics.
    """
    callbacks = [*plan.callbacks, *callbacks]
    model = plan.model.to(accelerator.device)  # before the optimiser, so that it can pick its fused CUDA kernel
    graphs_blocker = cuda_graphs_blocker(config, accelerator, callbacks)
    include_frozen = any(c.unfreezes_parameters for c in callbacks)
    optimizer = build_optimizer(model, config, include_frozen, capturable=graphs_blocker is None)
    if graphs_blocker is None:
        make_lr_tensors(optimizer, accelerator.device)
    model, optimizer, train_loader, eval_loader = accelerator.prepare(
        model, optimizer, plan.train_loader, plan.eval_loader
    )
    if config.compile != "no":
        model.compile(mode=config.compile)
    steps_per_epoch = math.ceil(len(train_loader) / config.gradient_accumulation_steps)
    scheduler, step_each_update = build_scheduler(optimizer, config, steps_per_epoch)
    weights = class_weights(config.class_weights, plan.train_labels, len(plan.label_names))
    weights = weights.to(accelerator.device) if weights is not None else None

    log = JsonlLog(run_dir / "log.jsonl", accelerator.is_main_process)
    loop = Loop(model, optimizer, scheduler, accelerator, config, callbacks)
    for callback in callbacks:
        callback.on_train_begin(loop)  # a resumed run restores loop.state and loop.best_weights here
    state = loop.state

    def train_step(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Forward, backward and update; no CPU synchronisation, so it can be a CUDA graph."""
        inputs, labels = split_batch(batch)
        logits = model(**inputs)
        loss = F.cross_entropy(logits.float(), labels, weight=weights, label_smoothing=config.label_smoothing)
        progress_done = min(state.update / max(config.epochs * steps_per_epoch, 1), 1.0)
        for callback in callbacks:
            extra = callback.extra_loss(model, inputs, progress_done)
            if extra is not None:
                loss = loss + extra
        accelerator.backward(loss)
        if accelerator.sync_gradients and config.max_grad_norm:
            accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    step = GraphedStep(train_step, optimizer) if graphs_blocker is None else train_step
    if config.cuda_graphs and accelerator.device.type == "cuda":
        accelerator.print(f"CUDA graphs: {'on' if graphs_blocker is None else f'off ({graphs_blocker})'}")
    epoch_seconds = []
    progress = tqdm(
        total=config.epochs * steps_per_epoch, initial=state.update, disable=not accelerator.is_local_main_process
    )

    for epoch in range(state.epoch, config.epochs):
        loop.epoch = epoch
        for callback in callbacks:
            callback.on_epoch_begin(loop, epoch)
        set_train_mode(model)
        # the batch order depends on (seed, epoch) only, so a resumed epoch repeats it and skips what was done
        set_loader_epoch(train_loader, epoch)
        batches = resume_batches(train_loader, state.batches_done) if state.batches_done else train_loader
        loop.restart_clock()
        epoch_started = time.perf_counter()
        for batch in batches:
            with accelerator.accumulate(model):
                loss = step(batch)
            state.samples += len(batch["labels"]) * accelerator.num_processes
            loop.losses.add(loss, state.update + 1)
            state.loss_count += 1
            state.batches_done += 1
            if accelerator.sync_gradients:
                state.update += 1
                if step_each_update:
                    scheduler.step()
                progress.update(1)
                if state.update % config.logging_steps == 0:
                    loop.fold_losses()
                    lr, loss_so_far = float(optimizer.param_groups[0]["lr"]), loop.mean_loss()
                    log.write(step=state.update, epoch=epoch + 1, loss=loss_so_far, lr=lr)
                    progress.set_postfix(loss=f"{loss_so_far:.4f}")
                end_of_epoch = accelerator.gradient_state.end_of_dataloader
                for callback in callbacks:
                    callback.on_update(loop, end_of_epoch)
        loop.fold_losses()  # also waits for the GPU to finish the epoch, so the time below is true
        loop.stop_clock()
        epoch_seconds.append(time.perf_counter() - epoch_started)
        if not step_each_update:
            scheduler.step()

        metrics = evaluate(model, eval_loader, accelerator, plan.label_names)
        record = {"epoch": epoch + 1, "train_loss": loop.mean_loss(), **scalar_metrics(metrics)}
        state.history.append(record)
        state.epoch, state.batches_done, state.running_loss, state.loss_count = epoch + 1, 0, 0.0, 0
        log.write(**record)
        if accelerator.is_main_process:  # through tqdm, so the line does not land inside the bar
            progress.write(f"epoch {epoch + 1}: " + ", ".join(f"{k}={v:.4g}" for k, v in record.items() if k != "epoch"))
        for callback in callbacks:
            callback.on_epoch_end(loop, metrics)
        if loop.stop:
            break
    progress.close()

    if loop.best_weights is not None:
        accelerator.unwrap_model(model).load_state_dict(loop.best_weights, strict=False)
    return TrainResult(
        best_metrics=state.best_metrics,
        best_epoch=state.best_epoch,
        history=state.history,
        stopped_early=state.stopped_early,
        train_seconds=state.train_seconds,
        train_samples_per_second=state.samples / state.train_seconds if state.train_seconds else 0.0,
        epoch_seconds=epoch_seconds,
    )
