"""The training loop on Accelerate, readable top to bottom.

One loop for every modality and strategy: batches are dicts with `labels`, the model maps the
rest to logits. Mixed precision, accumulation and device placement are Accelerate's; the loop
adds the schedule, clipping, evaluation each epoch, the best epoch's weights and early stopping.
"""

from __future__ import annotations

import json
import math
import time
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

from hf_transfer.errors import HfTransferError
from hf_transfer.metrics import classification_metrics, scalar_metrics
from hf_transfer.recipe import TrainingConfig
from hf_transfer.sources.base import TransferModel
from hf_transfer.strategies import EpochHook, parameter_groups, set_train_mode


@dataclass
class TrainResult:
    best_metrics: dict[str, Any]
    best_epoch: int
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped_early: bool = False
    train_seconds: float = 0.0
    train_samples_per_second: float = 0.0


class JsonlLog:
    """Appends one JSON object per line; only the main process writes."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def write(self, **record: Any) -> None:
        if self.enabled:
            with self.path.open("a") as log:
                log.write(json.dumps(record) + "\n")


def build_optimizer(model: TransferModel, config: TrainingConfig, include_frozen: bool) -> torch.optim.Optimizer:
    groups = parameter_groups(model, config, include_frozen)
    if not groups:
        raise HfTransferError("The strategy left no parameter to train; check strategy.name.")
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)
    optimizer_class = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    # the fused kernel is one launch per step instead of one per tensor; it needs every
    # parameter on a CUDA device
    fused = all(p.is_cuda for g in groups for p in g["params"]) or None
    return optimizer_class(groups, lr=config.lr, fused=fused)


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
) -> TrainResult:
    """Train, evaluate every epoch, and leave the best epoch's weights in `model`."""
    optimizer = build_optimizer(model, config, include_frozen=on_epoch_start is not None)
    model, optimizer, train_loader, eval_loader = accelerator.prepare(model, optimizer, train_loader, eval_loader)
    steps_per_epoch = math.ceil(len(train_loader) / config.gradient_accumulation_steps)
    scheduler, step_each_update = build_scheduler(optimizer, config, steps_per_epoch)
    if class_weights is not None:
        class_weights = class_weights.to(accelerator.device)

    log = JsonlLog(run_dir / "log.jsonl", accelerator.is_main_process)
    result = TrainResult(best_metrics={}, best_epoch=-1)
    best_score, best_state, epochs_without_gain = -math.inf, None, 0
    progress = tqdm(total=config.epochs * steps_per_epoch, disable=not accelerator.is_local_main_process)
    update, samples, train_time = 0, 0, 0.0

    for epoch in range(config.epochs):
        if on_epoch_start is not None:
            on_epoch_start(epoch)
        set_train_mode(model)
        running_loss, loss_count, started = 0.0, 0, time.perf_counter()
        for batch in train_loader:
            with accelerator.accumulate(model):
                inputs, labels = split_batch(batch)
                logits = model(**inputs)
                loss = F.cross_entropy(
                    logits.float(), labels, weight=class_weights, label_smoothing=config.label_smoothing
                )
                if not torch.isfinite(loss):
                    raise HfTransferError(
                        f"The loss became {loss.item()} at optimiser step {update} (epoch {epoch + 1}). "
                        "Lower training.lr, keep max_grad_norm set, or use bf16 instead of fp16."
                    )
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            samples += len(labels) * accelerator.num_processes
            running_loss += loss.item()
            loss_count += 1
            if accelerator.sync_gradients:
                update += 1
                if step_each_update:
                    scheduler.step()
                progress.update(1)
                if update % config.logging_steps == 0:
                    lr = optimizer.param_groups[0]["lr"]
                    log.write(step=update, epoch=epoch + 1, loss=running_loss / loss_count, lr=lr)
                    progress.set_postfix(loss=f"{running_loss / loss_count:.4f}")
        train_time += time.perf_counter() - started
        if not step_each_update:
            scheduler.step()

        metrics = evaluate(model, eval_loader, accelerator, label_names)
        record = {"epoch": epoch + 1, "train_loss": running_loss / max(loss_count, 1), **scalar_metrics(metrics)}
        result.history.append(record)
        log.write(**record)
        if accelerator.is_main_process:  # through tqdm, so the line does not land inside the bar
            progress.write(f"epoch {epoch + 1}: " + ", ".join(f"{k}={v:.4g}" for k, v in record.items() if k != "epoch"))

        if config.metric_for_best not in metrics:
            raise HfTransferError(
                f"training.metric_for_best '{config.metric_for_best}' is not a metric; "
                f"choose one of {sorted(scalar_metrics(metrics))}."
            )
        score = metrics[config.metric_for_best]
        if score > best_score:
            best_score, best_state, epochs_without_gain = score, _snapshot(accelerator.unwrap_model(model)), 0
            result.best_metrics, result.best_epoch = metrics, epoch + 1
        else:
            epochs_without_gain += 1
            if config.early_stopping_patience and epochs_without_gain >= config.early_stopping_patience:
                accelerator.print(f"early stopping: no better {config.metric_for_best} for {epochs_without_gain} epochs")
                result.stopped_early = True
                break
    progress.close()

    unwrapped = accelerator.unwrap_model(model)
    unwrapped.load_state_dict(best_state, strict=False)
    result.train_seconds = train_time
    result.train_samples_per_second = samples / train_time if train_time else 0.0
    return result
