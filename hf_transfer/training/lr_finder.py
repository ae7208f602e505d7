"""training.lr auto: the learning-rate range test, and the rule that reads a learning rate off its curve.

The test (Smith, "Cyclical Learning Rates for Training Neural Networks", 2017; fastai's `lr_find`,
Lightning's `LearningRateFinder`): train for up to `STEPS` optimiser steps while the learning rate
grows exponentially from `START_LR` to `END_LR`, record the loss, smoothed by a bias-corrected
moving average, and stop once the smoothed loss exceeds `DIVERGED` times its best. It runs on the
run's own model, optimiser (kind, parameter groups, weight decay, clipping), loss (with a domain
loss, as training's first step adds it) and training batches as loaded (mixup / CutMix, drawn per
training step, are not applied), each step over gradient_accumulation_steps batches as training's
steps are, and the model is put back afterwards (trial.py). fastai's and Lightning's finders run
inside their own trainers (a Learner, a LightningModule) and accelerate and torch have none, so it
is written here; its constants are theirs.

The rule (`valley`, fastai's default suggestion): the learning rate halfway along the longest
stretch over which the smoothed loss keeps falling (the longest decreasing subsequence of the
curve, its first tenth and last five points left out as fastai does). Chosen over the steepest
descent (Lightning's default) because the slope of a loss measured on one small batch per step is
noise, which the small data sets this toolkit serves make worse, and the steepest point often
lands on a single lucky batch; the valley depends only on which losses are lower than which,
along a long stretch, and its midpoint keeps away from the bottom, where the loss is about to turn
up. It is cautious: where the curve starts on a plateau that drifts down, the stretch starts on the
plateau, and the rate lands near where the visible fall begins.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

from hf_transfer.errors import HfTransferError
from hf_transfer.recipe import TrainingConfig
from hf_transfer.training.metrics import split_batch
from hf_transfer.training.optim import (
    build_optimizer,
    class_weights,
    own_rate_key,
    set_train_mode,
    training_loss,
)
from hf_transfer.training.plan import Plan
from hf_transfer.training.trial import leaves_no_trace

START_LR, END_LR = 1e-7, 10.0  # fastai's range, which its valley rule was made for; the test stops at divergence
STEPS = 100  # fastai's and Lightning's num_it / num_training
SMOOTHING = 0.98  # weight of the past in the loss's moving average (both)
DIVERGED = 4.0  # stop once the smoothed loss is this many times its best (both)
RULE = "valley: halfway along the longest fall of the smoothed loss (fastai)"


@dataclass
class RangeTest:
    """The curve of one range test and the learning rate read off it."""

    lrs: list[float]
    losses: list[float]  # smoothed
    raw_losses: list[float]
    lr: float
    stopped: str
    seconds: float

    def as_record(self) -> dict[str, Any]:
        return {
            "lr": self.lr, "rule": RULE, "start_lr": START_LR, "end_lr": END_LR, "steps": len(self.lrs),
            "stopped": self.stopped, "seconds": round(self.seconds, 2),
            "lrs": self.lrs, "losses": self.losses, "raw_losses": self.raw_losses,
        }


def valley(losses: Sequence[float]) -> int:
    """Index of the point halfway along the longest decreasing subsequence of `losses` (fastai's valley)."""
    longest = [1] * len(losses)  # the longest decreasing subsequence ending at each point
    end = 0
    for i in range(1, len(losses)):
        longest[i] = 1 + max((longest[j] for j in range(i) if losses[j] > losses[i]), default=0)
        if longest[i] > longest[end]:
            end = i
    start = end - longest[end] + 1
    return start + (end - start) // 2


def suggest(lrs: Sequence[float], losses: Sequence[float]) -> float:
    """The rule above, on a curve; the first tenth and last five points are left out where enough remain."""
    skip_start, skip_end = len(losses) // 10, 5
    if len(losses) - skip_start - skip_end < 10:  # a test that stopped early: read the whole curve
        skip_start, skip_end = 0, 0
    window = slice(skip_start, len(losses) - skip_end)
    return float(lrs[window][valley(losses[window])])


def _batches(loader: DataLoader) -> Iterator[dict[str, torch.Tensor]]:
    """The loader's batches, epoch after epoch: a small data set has fewer batches than the test has steps."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise HfTransferError("training.lr auto: the training data gives no batch to test learning rates on.")


def lr_range_test(plan: Plan, config: TrainingConfig, accelerator: Accelerator) -> RangeTest:
    """Run the test on the plan (its model on the accelerator's device) and read the learning rate off it.

    `config` holds the run's numbers (batch size, accumulation); its `lr` is ignored. The parameter
    groups that train at training.lr (those without a head_lr / backbone_lr of their own) sweep the
    range, keeping their layer-decay ratios; groups with a rate of their own keep it throughout,
    as they will in training.
    """
    device = accelerator.device
    model = plan.model.to(device)
    loader = plan.train_loader_for(config.batch_size) if plan.train_loader_for else plan.train_loader
    weights = class_weights(config.class_weights, plan.train_labels, len(plan.label_names))
    weights = weights.to(device) if weights is not None else None
    started = time.perf_counter()
    lrs: list[float] = []
    losses: list[float] = []
    raw_losses: list[float] = []
    stopped = f"reached lr {END_LR:g}"
    with leaves_no_trace(model, device):
        # at lr 1 each group's rate is its factor of training.lr (1, or its layer decay)
        optimizer = build_optimizer(model, dataclasses.replace(config, lr=1.0), include_frozen=False)
        factors = [None if getattr(config, own_rate_key(group)) is not None else group["lr"]
                   for group in optimizer.param_groups]
        scaler = torch.amp.GradScaler(device.type, enabled=accelerator.mixed_precision == "fp16")
        set_train_mode(model)
        batches = _batches(loader)
        average, best = 0.0, math.inf
        for step in range(STEPS):
            lr = START_LR * (END_LR / START_LR) ** (step / (STEPS - 1))
            for group, factor in zip(optimizer.param_groups, factors):
                if factor is not None:
                    group["lr"] = factor * lr
            loss_value = 0.0
            for _ in range(config.gradient_accumulation_steps):
                inputs, labels = split_batch({k: v.to(device) for k, v in next(batches).items()})
                with accelerator.autocast():
                    logits = model(**inputs)
                # a domain loss too, as training's first step adds it
                loss = training_loss(logits, labels, model, inputs, config, weights, plan.callbacks, 0.0)
                scaler.scale(loss / config.gradient_accumulation_steps).backward()
                loss_value += float(loss.detach()) / config.gradient_accumulation_steps
            if config.max_grad_norm:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if not math.isfinite(loss_value):
                stopped = f"the loss was not finite at lr {lr:.3g}"
                break
            average = SMOOTHING * average + (1 - SMOOTHING) * loss_value
            smoothed = average / (1 - SMOOTHING ** (step + 1))
            lrs.append(lr)
            losses.append(smoothed)
            raw_losses.append(loss_value)
            best = min(best, smoothed)
            if smoothed > DIVERGED * best:
                stopped = f"the smoothed loss passed {DIVERGED:g}x its best at lr {lr:.3g}"
                break
    if len(lrs) < 2:
        raise HfTransferError(
            f"training.lr auto: the learning-rate range test stopped at its first step ({stopped}), so it "
            "has no curve to read. Check the data and the model (train once with a small training.lr), or "
            "give training.lr a number."
        )
    # three significant digits: what the log, the card and a recipe would write anyway
    found = float(f"{suggest(lrs, losses):.3g}")
    return RangeTest(lrs, losses, raw_losses, found, stopped, time.perf_counter() - started)
