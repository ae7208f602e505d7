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
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from hf_transfer.console import bar, is_quiet, say
from hf_transfer.recipe import TrainingConfig
from hf_transfer.training.checkpoint import resume_batches, set_loader_epoch
from hf_transfer.training.cuda_graphs import GraphedStep, make_lr_tensors
from hf_transfer.training.metrics import evaluate, scalar_metrics, split_batch
from hf_transfer.training.optim import (
    build_optimizer,
    build_scheduler,
    class_weights,
    set_train_mode,
    training_loss,
)
from hf_transfer.training.plan import Callback, Plan
from hf_transfer.training.state import Loop


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


def train(
    plan: Plan, config: TrainingConfig, accelerator: Accelerator, run_dir: Path, callbacks: Sequence[Callback] = ()
) -> TrainResult:
    """Train the plan, evaluate every epoch, and leave the kept epoch's weights in `plan.model`.

    `callbacks` run after the plan's own, in order (callbacks.py: the epoch rule, early stopping,
    checkpoints); without an epoch rule the model ends with its last weights and no kept metrics.
    """
    callbacks = [*plan.callbacks, *callbacks]
    model = plan.model.to(accelerator.device)  # before the optimiser, so that it can pick its fused CUDA kernel
    try:
        for callback in callbacks:
            callback.on_train_setup(model)
        return _train(plan, model, config, accelerator, run_dir, callbacks)
    finally:  # a callback that changed the model for training gives it back, also when training failed
        for callback in callbacks:
            callback.on_train_end(model)


def _train(plan: Plan, model: torch.nn.Module, config: TrainingConfig, accelerator: Accelerator, run_dir: Path,
           callbacks: list[Callback]) -> TrainResult:
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

    def failure_note() -> str:
        return " ".join(note for note in (c.failure_note() for c in callbacks) if note)

    loop = Loop(model, optimizer, scheduler, accelerator, config, failure_note)
    for callback in callbacks:
        callback.on_train_begin(loop)  # a resumed run restores loop.state and loop.best_weights here
    state = loop.state

    def train_step(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Forward, backward and update; no CPU synchronisation, so it can be a CUDA graph."""
        inputs, labels = split_batch(batch)
        progress_done = min(state.update / max(config.epochs * steps_per_epoch, 1), 1.0)
        loss = training_loss(model(**inputs), labels, model, inputs, config, weights, callbacks, progress_done)
        accelerator.backward(loss)
        if accelerator.sync_gradients and config.max_grad_norm:
            accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    step = GraphedStep(train_step, optimizer) if graphs_blocker is None else train_step
    if config.cuda_graphs and accelerator.device.type == "cuda":
        say(accelerator, f"CUDA graphs: {'on' if graphs_blocker is None else f'off ({graphs_blocker})'}")
    epoch_seconds = []
    # the bar closes (ends its line) however training ends, so an error prints on a line of its own
    with bar(desc="training", total=config.epochs * steps_per_epoch, initial=state.update, unit="step") as progress:
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
                for callback in callbacks:
                    batch = callback.on_batch(loop, batch)
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
                        logged = {"step": state.update, "epoch": epoch + 1, "loss": loss_so_far, "lr": lr}
                        log.write(**logged)
                        for callback in callbacks:
                            callback.on_log(loop, logged)
                        progress.set_postfix(loss=f"{loss_so_far:.4f}")
                    end_of_epoch = accelerator.gradient_state.end_of_dataloader
                    for callback in callbacks:
                        callback.on_update(loop, end_of_epoch)
            loop.fold_losses()  # also waits for the GPU to finish the epoch, so the time below is true
            loop.stop_clock()
            epoch_seconds.append(time.perf_counter() - epoch_started)
            if not step_each_update:
                scheduler.step()

            metrics = evaluate(model, eval_loader, accelerator, plan.label_names, config.extra_metrics)
            record = {"epoch": epoch + 1, "train_loss": loop.mean_loss(), **scalar_metrics(metrics)}
            state.history.append(record)
            state.epoch, state.batches_done, state.running_loss, state.loss_count = epoch + 1, 0, 0.0, 0
            log.write(**record)
            for callback in callbacks:
                callback.on_log(loop, record)
            if accelerator.is_main_process and not is_quiet():  # through tqdm: not inside the bar
                progress.write(f"epoch {epoch + 1}: " + ", ".join(f"{k}={v:.4g}" for k, v in record.items() if k != "epoch"))
            for callback in callbacks:
                callback.on_epoch_end(loop, metrics)
            if loop.stop:
                break

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
