"""The loop's standard callbacks: which epoch a run keeps, early stopping, the weights evaluated (an average,
an interpolation with the start), checkpoints.

Mode-specific callbacks live with their mode (gradual unfreezing in strategies.py, the cached
view in cache/, the domain loss in adaptation/); `recipe_callbacks` adds these, in this order,
after the plan's own: the epoch rule decides first, early stopping reads its verdict, and the
checkpoint stores both.
"""

from __future__ import annotations

import time
from typing import Any

import torch

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


class Deadline(Callback):
    """Stop after the epoch past which one more epoch, as long as this run's epochs have taken on average,
    would end after `deadline` (a `time.perf_counter()` value): the rest of a time budget is kept.

    The main process's clock decides, so every process stops at the same epoch. Only the epochs run since
    training began here count towards the mean (a resumed run's history holds earlier ones too).
    """

    def __init__(self, deadline: float):
        self.deadline = deadline
        self.started: float | None = None
        self.epochs_before: int | None = None  # epochs in the history when the first epoch here began
        self.stopped_at: int | None = None  # the epoch after which the deadline stopped training

    def on_train_begin(self, loop: Loop) -> None:
        self.started = time.perf_counter()

    def on_epoch_begin(self, loop: Loop, epoch: int) -> None:
        if self.epochs_before is None:  # after every on_train_begin, so a resumed run's history is restored
            self.epochs_before = len(loop.state.history)

    def on_epoch_end(self, loop: Loop, metrics: dict[str, Any]) -> None:
        from accelerate.utils import broadcast_object_list

        now, epochs = time.perf_counter(), len(loop.state.history)
        late = [now + (now - self.started) / max(epochs - (self.epochs_before or 0), 1) > self.deadline]
        if broadcast_object_list(late)[0] and epochs < loop.config.epochs and not loop.stop:
            say(loop.accelerator, f"time budget: one more epoch would not fit; stopping after epoch {epochs}")
            self.stopped_at, loop.stop = epochs, True


class EvaluatedWeights(Callback):
    """Each epoch is evaluated, and kept, with other weights than the live ones the loop trains on.

    `evaluated_weights(model)` gives them; they are swapped in after the epoch's last update (before the
    evaluation) and swapped out at the epoch's end, after the epoch rule stored what it keeps and before
    a checkpoint stores the live weights.
    """

    cuda_graphs_blocker = "other weights are swapped in for each evaluation"

    def __init__(self) -> None:
        self.live: dict | None = None

    @staticmethod
    def _model(loop: Loop):
        return loop.accelerator.unwrap_model(loop.model)

    def evaluated_weights(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def on_update(self, loop: Loop, end_of_epoch: bool) -> None:
        if end_of_epoch:
            model = self._model(loop)
            self.live = {k: v.detach().clone() for k, v in model.state_dict().items()}
            model.load_state_dict(self.evaluated_weights(model))

    def on_epoch_end(self, loop: Loop, metrics: dict[str, Any]) -> None:
        if self.live is not None:
            self._model(loop).load_state_dict(self.live)
            self.live = None


class WeightAveraging(EvaluatedWeights):
    """An EMA of the weights (timm's ModelEmaV3), evaluated and kept each epoch (training.ema_decay).

    A resumed run starts a fresh average from the resumed weights: the average is made when the first
    epoch begins, after every callback's on_train_begin (the checkpoint's restore among them).
    """

    def __init__(self, decay: float):
        super().__init__()
        self.decay = decay
        self.average = None

    def on_epoch_begin(self, loop: Loop, epoch: int) -> None:
        from timm.utils import ModelEmaV3

        if self.average is None:
            self.average = ModelEmaV3(self._model(loop), decay=self.decay, use_warmup=True)

    def on_update(self, loop: Loop, end_of_epoch: bool) -> None:
        self.average.update(self._model(loop), step=loop.state.update)
        super().on_update(loop, end_of_epoch)

    def evaluated_weights(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        return self.average.module.state_dict()


class WeightInterpolation(EvaluatedWeights):
    """The weights fine-tuning started from and the live ones, mixed: (1 - share) x start + share x live,
    evaluated and kept each epoch (training.weight_interpolation).

    WiSE-FT (Wortsman et al., CVPR 2022, "Robust fine-tuning of zero-shot models"): fine-tuned and
    starting weights lie in one basin, and their average often beats both. The start is the model the
    plan built (the pretrained backbone, the head fitted first where it is), taken in on_train_begin
    before a checkpoint's restore (Checkpointing comes after this callback), so a resumed run mixes
    with the same start. Integer buffers (BatchNorm's batch count) are the live ones.
    """

    def __init__(self, share: float):
        super().__init__()
        self.share = share
        self.start: dict[str, torch.Tensor] | None = None

    def on_train_begin(self, loop: Loop) -> None:
        self.start = {k: v.detach().clone() for k, v in self._model(loop).state_dict().items()}

    def evaluated_weights(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {
            name: torch.lerp(self.start[name].to(live.device), live, self.share) if live.is_floating_point() else live
            for name, live in model.state_dict().items()
        }


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


# training.weight_interpolation auto: halfway (the WiSE-FT paper's middle point) where fine-tuning starts from the
# probe fitted on a pretrained backbone. EfficientNet-Lite0 `full`, five image sets x two seeds: the last epoch +1.3
# points on average, higher in 9 of 10 runs, and over shares 0, 0.1, ..., 1 of the same runs 0.4 and 0.5 have the
# best mean; from a zero head (text, SST-2 sample, two seeds) it lost 1.9 points (benchmarks/BENCHMARKS.md, issue 11)
AUTO_INTERPOLATION = 0.5


def interpolation_share(config: TrainingConfig, plan: Plan) -> float | None:
    """The share of the fine-tuned weights in those each epoch is evaluated and saved with, or None (off)."""
    if config.weight_interpolation != "auto":
        return config.weight_interpolation
    return AUTO_INTERPOLATION if plan.starts_from_probe and not config.ema_decay else None


def recipe_callbacks(config: TrainingConfig, plan: Plan, checkpoints: Checkpointer | None = None) -> list[Callback]:
    """The epoch rule the plan asks for, early stopping if the recipe sets it, checkpoints if kept,
    trackers if the recipe names them."""
    callbacks: list[Callback] = [EPOCH_RULES[plan.epoch_rule](config.metric_for_best)]
    if config.report_to:
        callbacks.append(TrackerLogging())
    if config.early_stopping_patience:
        callbacks.append(EarlyStopping(config.early_stopping_patience))
    # after the epoch rule (it keeps what they swap in), before checkpoints (they store the live weights and restore
    # a resumed run after the start of the interpolation is taken)
    if config.ema_decay:
        callbacks.append(WeightAveraging(config.ema_decay))
    if (share := interpolation_share(config, plan)) is not None:
        callbacks.append(WeightInterpolation(share))
    if checkpoints is not None:
        callbacks.append(Checkpointing(checkpoints))
    return callbacks
