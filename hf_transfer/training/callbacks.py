"""The loop's standard callbacks: which epoch a run keeps, early stopping, checkpoints.

Mode-specific callbacks live with their mode (gradual unfreezing in strategies.py, the cached
view in cache/, the domain loss in adaptation/); `recipe_callbacks` adds these, in this order,
after the plan's own: the epoch rule decides first, early stopping reads its verdict, and the
checkpoint stores both.
"""

from __future__ import annotations

from typing import Any

from hf_transfer.console import say
from hf_transfer.recipe import TrainingConfig
from hf_transfer.training.checkpoint import Checkpointer
from hf_transfer.training.plan import Callback, Plan
from hf_transfer.training.state import Loop
from hf_transfer.training.trackers import TrackerLogging


class KeepBestEpoch(Callback):
    """Keep the epoch with the highest validation `metric` (training.metric_for_best)."""

    def __init__(self, metric: str):
        self.metric = metric

    def on_epoch_end(self, loop: Loop, metrics: dict[str, Any]) -> None:
        score = metrics[self.metric]
        if score > loop.state.best_score:
            loop.keep_epoch(metrics, score)
        else:
            loop.state.epochs_without_gain += 1


class KeepLastEpoch(Callback):
    """Keep (and report) the last epoch, for evaluation data that must not choose the model."""

    def __init__(self, metric: str):
        self.metric = metric

    def on_epoch_end(self, loop: Loop, metrics: dict[str, Any]) -> None:
        loop.keep_epoch(metrics, metrics[self.metric])


EPOCH_RULES: dict[str, type[Callback]] = {"best": KeepBestEpoch, "last": KeepLastEpoch}


class EarlyStopping(Callback):
    """Stop after `patience` epochs in a row that the epoch rule did not keep."""

    def __init__(self, patience: int):
        self.patience = patience

    def on_epoch_end(self, loop: Loop, metrics: dict[str, Any]) -> None:
        if loop.state.epochs_without_gain >= self.patience:
            say(loop.accelerator,
                f"early stopping: no better {loop.config.metric_for_best} for {loop.state.epochs_without_gain} epochs"
            )
            loop.state.stopped_early = True
            loop.stop = True  # no checkpoint: a resumed run repeats this epoch and stops here again


class Checkpointing(Callback):
    """Checkpoints at epoch ends (and every N optimiser steps if asked); restores a resumed run."""

    def __init__(self, checkpoints: Checkpointer):
        self.checkpoints = checkpoints

    def on_train_begin(self, loop: Loop) -> None:
        if self.checkpoints.resume_from is not None:
            loop.state, loop.best_weights = self.checkpoints.restore(loop.scheduler)

    def on_update(self, loop: Loop, end_of_epoch: bool) -> None:
        if self.checkpoints.due(loop.state.update, end_of_epoch):
            loop.fold_losses()  # a non-finite loss must not reach a checkpoint
            with loop.untimed():
                self.checkpoints.save(loop.model, loop.scheduler, loop.state, loop.best_weights)

    def on_epoch_end(self, loop: Loop, metrics: dict[str, Any]) -> None:
        if not loop.stop:
            self.checkpoints.save(loop.model, loop.scheduler, loop.state, loop.best_weights)

    def failure_note(self) -> str:
        return self.checkpoints.describe_last_good()


def recipe_callbacks(config: TrainingConfig, plan: Plan, checkpoints: Checkpointer | None = None) -> list[Callback]:
    """The epoch rule the plan asks for, early stopping if the recipe sets it, checkpoints if kept,
    trackers if the recipe names them."""
    callbacks: list[Callback] = [EPOCH_RULES[plan.epoch_rule](config.metric_for_best)]
    if config.report_to:
        callbacks.append(TrackerLogging())
    if config.early_stopping_patience:
        callbacks.append(EarlyStopping(config.early_stopping_patience))
    if checkpoints is not None:
        callbacks.append(Checkpointing(checkpoints))
    return callbacks
