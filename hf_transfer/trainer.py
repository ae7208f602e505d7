"""The training loop on Accelerate, readable top to bottom.

One loop for every modality and strategy: batches are dicts with `labels`, the model maps the
rest to logits. Mixed precision, accumulation and device placement are Accelerate's; the loop
adds the schedule, clipping, evaluation each epoch, the best epoch's weights and early stopping.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from hf_transfer.checkpoint import (
    Checkpointer,
    LoopState,
    resume_batches,
    set_loader_epoch,
)
from hf_transfer.cuda_graphs import GraphedStep, make_lr_tensors
from hf_transfer.errors import HfTransferError
from hf_transfer.metrics import classification_metrics, scalar_metrics
from hf_transfer.recipe import TrainingConfig
from hf_transfer.sources.base import TransferModel
from hf_transfer.strategies import EpochHook, parameter_groups, set_train_mode

# An extra objective added to the task loss each step: (model, batch inputs, progress in [0, 1]) -> loss.
# Domain adaptation (domain.py) plugs in here, with target inputs riding in the same batch.
AuxiliaryLoss = Callable[[torch.nn.Module, dict[str, torch.Tensor], float], torch.Tensor]


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


def build_optimizer(
    model: TransferModel, config: TrainingConfig, include_frozen: bool, capturable: bool = False
) -> torch.optim.Optimizer:
    """`capturable`: an optimiser whose step can be recorded in a CUDA graph (see cuda_graphs.py)."""
    groups = parameter_groups(model, config, include_frozen)
    if not groups:
        raise HfTransferError("The strategy left no parameter to train; check strategy.name.")
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)
    optimizer_class = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    # the fused kernel is one launch per step instead of one per tensor; it needs every
    # parameter on a CUDA device
    fused = all(p.is_cuda for g in groups for p in g["params"]) or None
    return optimizer_class(groups, lr=config.lr, fused=fused, capturable=capturable)


def cuda_graphs_blocker(config: TrainingConfig, accelerator: Accelerator, has_epoch_hook: bool) -> str | None:
    """Why training steps cannot be CUDA graphs here, or None when they can."""
    checks = {
        "training.cuda_graphs is false": not config.cuda_graphs,
        "the device is not a CUDA GPU": accelerator.device.type != "cuda",
        "several processes": accelerator.num_processes > 1,
        "fp16 loss scaling synchronises with the CPU": accelerator.mixed_precision == "fp16",
        "gradient accumulation": config.gradient_accumulation_steps > 1,
        f"optimizer {config.optimizer}": config.optimizer not in ("adam", "adamw"),
        "the onecycle schedule changes momentum too": config.scheduler == "onecycle",
        "trainable parameters change between epochs": has_epoch_hook,
        "torch.compile is on": config.compile != "no",
    }
    return next((reason for reason, blocked in checks.items() if blocked), None)


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


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainingConfig, steps_per_epoch: int):
    """Returns (scheduler, steps per optimiser step?): step and one-cycle by epoch / by step."""
    total = config.epochs * steps_per_epoch
    if config.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.step_size, gamma=config.gamma), False
    if config.scheduler == "onecycle":
        max_lrs = [g["lr"] for g in optimizer.param_groups]
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lrs, total_steps=total), True
    name = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[config.scheduler]
    warmup = math.ceil(config.warmup_ratio * total)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total), True


def split_batch(batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return inputs, batch["labels"]


@torch.no_grad()
def predict_logits(model: torch.nn.Module, loader: DataLoader, accelerator: Accelerator) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels of the whole loader, gathered from every process exactly once."""
    model.eval()
    all_logits, all_labels = [], []
    for batch in loader:
        inputs, labels = split_batch(batch)
        logits = model(**inputs)
        logits, labels = accelerator.gather_for_metrics((logits.float(), labels))
        all_logits.append(logits.cpu())
        all_labels.append(labels.cpu())
    return torch.cat(all_logits).numpy(), torch.cat(all_labels).numpy()


def evaluate(model: torch.nn.Module, loader: DataLoader, accelerator: Accelerator, label_names: list[str]) -> dict:
    logits, labels = predict_logits(model, loader, accelerator)
    return classification_metrics(logits.argmax(-1), labels, label_names)


def mean_over_processes(state: LoopState, accelerator: Accelerator) -> float:
    """The epoch's mean batch loss so far, averaged over processes (each saw different batches)."""
    mean = torch.tensor(state.running_loss / max(state.loss_count, 1), dtype=torch.float64, device=accelerator.device)
    return float(accelerator.reduce(mean, reduction="mean"))


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of what training can change: trainable parameters and buffers (BN statistics)."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    buffers = {n for n, _ in model.named_buffers()}
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items() if k in trainable | buffers}


def train(
    model: TransferModel,
    train_loader: DataLoader,
    eval_loader: DataLoader,
    config: TrainingConfig,
    accelerator: Accelerator,
    run_dir: Path,
    label_names: list[str],
    on_epoch_start: EpochHook | None = None,
    class_weights: torch.Tensor | None = None,
    checkpoints: Checkpointer | None = None,
    auxiliary_loss: AuxiliaryLoss | None = None,
    select_best_epoch: bool = True,
) -> TrainResult:
    """Train, evaluate every epoch, and leave the best epoch's weights in `model`.

    With `checkpoints`, the run is checkpointed at epoch ends (and every N steps if asked), and
    continues from `checkpoints.resume_from` when that is set. `auxiliary_loss` is added to the
    task loss; `select_best_epoch=False` keeps (and reports) the last epoch instead of the best,
    for evaluation data that must not choose the model (a domain-adaptation target).
    """
    model.to(accelerator.device)  # before the optimiser, so that it can pick its fused CUDA kernel
    graphs_blocker = cuda_graphs_blocker(config, accelerator, on_epoch_start is not None)
    if auxiliary_loss is not None:  # its weight changes every step, which a recorded graph cannot follow
        graphs_blocker = "an auxiliary loss"
    optimizer = build_optimizer(model, config, on_epoch_start is not None, capturable=graphs_blocker is None)
    if graphs_blocker is None:
        make_lr_tensors(optimizer, accelerator.device)
    model, optimizer, train_loader, eval_loader = accelerator.prepare(model, optimizer, train_loader, eval_loader)
    if config.compile != "no":
        model.compile(mode=config.compile)
    steps_per_epoch = math.ceil(len(train_loader) / config.gradient_accumulation_steps)
    scheduler, step_each_update = build_scheduler(optimizer, config, steps_per_epoch)
    if class_weights is not None:
        class_weights = class_weights.to(accelerator.device)

    log = JsonlLog(run_dir / "log.jsonl", accelerator.is_main_process)
    state, best_state = LoopState(), None  # position, counters, best metric, history: what a checkpoint keeps
    if checkpoints is not None and checkpoints.resume_from is not None:
        state, best_state = checkpoints.restore(scheduler)

    def train_step(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Forward, backward and update; no CPU synchronisation, so it can be a CUDA graph."""
        inputs, labels = split_batch(batch)
        logits = model(**inputs)
        loss = F.cross_entropy(logits.float(), labels, weight=class_weights, label_smoothing=config.label_smoothing)
        if auxiliary_loss is not None:
            progress_done = state.update / max(config.epochs * steps_per_epoch, 1)
            loss = loss + auxiliary_loss(model, inputs, min(progress_done, 1.0))
        accelerator.backward(loss)
        if accelerator.sync_gradients and config.max_grad_norm:
            accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    step = GraphedStep(train_step, optimizer) if graphs_blocker is None else train_step
    if config.cuda_graphs and accelerator.device.type == "cuda":
        accelerator.print(f"CUDA graphs: {'on' if graphs_blocker is None else f'off ({graphs_blocker})'}")
    losses, epoch_seconds = LossTally(accelerator.device), []

    def take_losses(epoch: int) -> None:
        """Fold the device-side loss sum into the loop state; stop at a non-finite loss."""
        total, bad_step, bad_value = losses.take(accelerator)
        if bad_step is not None:
            raise HfTransferError(
                f"The loss became {bad_value} at optimiser step {bad_step} (epoch {epoch + 1}). "
                + (checkpoints.describe_last_good() + " " if checkpoints else "")
                + "Lower training.lr, keep max_grad_norm set, or use bf16 instead of fp16."
            )
        state.running_loss += total
    progress = tqdm(
        total=config.epochs * steps_per_epoch, initial=state.update, disable=not accelerator.is_local_main_process
    )

    for epoch in range(state.epoch, config.epochs):
        if on_epoch_start is not None:
            on_epoch_start(epoch)
        set_train_mode(model)
        # the batch order depends on (seed, epoch) only, so a resumed epoch repeats it and skips what was done
        set_loader_epoch(train_loader, epoch)
        batches = resume_batches(train_loader, state.batches_done) if state.batches_done else train_loader
        started = epoch_started = time.perf_counter()
        for batch in batches:
            with accelerator.accumulate(model):
                loss = step(batch)
            state.samples += len(batch["labels"]) * accelerator.num_processes
            losses.add(loss, state.update + 1)
            state.loss_count += 1
            state.batches_done += 1
            if accelerator.sync_gradients:
                state.update += 1
                if step_each_update:
                    scheduler.step()
                progress.update(1)
                if state.update % config.logging_steps == 0:
                    take_losses(epoch)
                    lr, loss_so_far = float(optimizer.param_groups[0]["lr"]), mean_over_processes(state, accelerator)
                    log.write(step=state.update, epoch=epoch + 1, loss=loss_so_far, lr=lr)
                    progress.set_postfix(loss=f"{loss_so_far:.4f}")
                end_of_epoch = accelerator.gradient_state.end_of_dataloader
                if checkpoints is not None and checkpoints.due(state.update, end_of_epoch):
                    take_losses(epoch)  # a non-finite loss must not reach a checkpoint
                    state.train_seconds += time.perf_counter() - started
                    checkpoints.save(model, scheduler, state, best_state)
                    started = time.perf_counter()
        take_losses(epoch)  # also waits for the GPU to finish the epoch, so the time below is true
        state.train_seconds += time.perf_counter() - started
        epoch_seconds.append(time.perf_counter() - epoch_started)
        if not step_each_update:
            scheduler.step()

        metrics = evaluate(model, eval_loader, accelerator, label_names)
        record = {"epoch": epoch + 1, "train_loss": mean_over_processes(state, accelerator), **scalar_metrics(metrics)}
        state.history.append(record)
        state.epoch, state.batches_done, state.running_loss, state.loss_count = epoch + 1, 0, 0.0, 0
        log.write(**record)
        if accelerator.is_main_process:  # through tqdm, so the line does not land inside the bar
            progress.write(f"epoch {epoch + 1}: " + ", ".join(f"{k}={v:.4g}" for k, v in record.items() if k != "epoch"))

        score = metrics[config.metric_for_best]
        if score > state.best_score or not select_best_epoch:
            state.best_score, best_state, state.epochs_without_gain = score, _snapshot(accelerator.unwrap_model(model)), 0
            state.best_metrics, state.best_epoch = metrics, epoch + 1
        else:
            state.epochs_without_gain += 1
            if config.early_stopping_patience and state.epochs_without_gain >= config.early_stopping_patience:
                accelerator.print(f"early stopping: no better {config.metric_for_best} for {state.epochs_without_gain} epochs")
                state.stopped_early = True
                break  # no checkpoint: a resumed run repeats this epoch and stops here again
        if checkpoints is not None:
            checkpoints.save(model, scheduler, state, best_state)
    progress.close()

    unwrapped = accelerator.unwrap_model(model)
    unwrapped.load_state_dict(best_state, strict=False)
    return TrainResult(
        best_metrics=state.best_metrics,
        best_epoch=state.best_epoch,
        history=state.history,
        stopped_early=state.stopped_early,
        train_seconds=state.train_seconds,
        train_samples_per_second=state.samples / state.train_seconds if state.train_seconds else 0.0,
        epoch_seconds=epoch_seconds,
    )
