"""A linear head on cached frozen features, fitted to convergence instead of trained for epochs.

On frozen features a linear head is a convex problem: multinomial logistic regression. SGD epochs
only approach its optimum, at a learning rate and epoch count nobody tuned for the user's data
(on SST-2 the loop's head stopped 9 points under a logistic regression on the same features).
scikit-learn's `LogisticRegressionCV` solves it with L-BFGS for a grid of L2 strengths and picks
the strength by cross-validation on the training features, never on the validation split, which so
stays an honest estimate. The fitted weights go into the model's own head module, so the run saves
the same folder as after the loop.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn

from hf_transfer.console import say
from hf_transfer.recipe import Recipe, TrainingConfig
from hf_transfer.training.loop import JsonlLog, TrainResult
from hf_transfer.training.metrics import evaluate, scalar_metrics
from hf_transfer.training.optim import class_weights
from hf_transfer.training.plan import Callback, Plan

# L2 strengths tried (C, the inverse, on the scaled features): half-decade steps from strong to weak
C_GRID = tuple(10.0 ** exponent for exponent in np.arange(-4.0, 2.01, 0.5))
MAX_FOLDS = 5
# BLAS threads while fitting (None: the library's own count). One: each L-BFGS step multiplies matrices
# too small to share out; on two cores the library's two threads made the fit 6-12x slower on 1,600
# examples' features and 1.25-1.28x slower on 25,600 (benchmarks/solver_threads.py, BENCHMARKS.md)
BLAS_THREADS: int | None = 1


def solver_blocker(recipe: Recipe, head: nn.Module) -> str | None:
    """Why head.solver auto keeps the training loop for this cached head, or None when it can fit it."""
    if recipe.head.solver == "loop":
        return "head.solver is loop"
    if not isinstance(head, nn.Linear):
        return f"the head is a {type(head).__name__}, not one linear layer"
    if recipe.training.label_smoothing:
        return "training.label_smoothing is set (the solver fits the plain cross-entropy)"
    if recipe.training.ema_decay:
        return "training.ema_decay is set (an average of the loop's weights)"
    return None


@dataclass
class LogisticFit:
    C: float
    folds: int
    train_loss: float  # the log loss on the training features
    seconds: float

    def as_record(self) -> dict[str, Any]:
        return {"method": "logistic regression (L-BFGS, to convergence)", "C": self.C,
                "cv_folds": self.folds, "seconds": round(self.seconds, 2)}

    def announcement(self) -> str:
        chosen = f"chosen by {self.folds}-fold cross-validation" if self.folds else "too few examples to cross-validate"
        return (f"head: logistic regression fitted to convergence in {self.seconds:.1f} s "
                f"(C={self.C:g}, {chosen} on the training features)")


class HeadFit(Protocol):
    """What a head fitter reports: its seconds, its training loss, a record and a sentence for the user."""

    seconds: float
    train_loss: float

    def as_record(self) -> dict[str, Any]: ...

    def announcement(self) -> str: ...


# fits a linear head in place on the training views' features: (head, views, labels, class weights, seed)
HeadFitter = Callable[[nn.Linear, Sequence[torch.Tensor], torch.Tensor, "torch.Tensor | None", int], HeadFit]


def fit_logistic_head(head: nn.Linear, views: Sequence[torch.Tensor], labels: torch.Tensor,
                      weights: torch.Tensor | None, seed: int) -> LogisticFit:
    """Fit `head` in place as a multinomial logistic regression on the stacked views' features.

    The features are centred and divided by one number, their root-mean-square spread, so that one C
    grid fits every backbone's scale; the map is folded back into the weights, so the head reads the
    raw features as before. One number, not a spread per dimension: standardising each dimension
    inflates the near-constant ones, and lost 3.5 points on PACS cartoon (benchmarks/BENCHMARKS.md).
    C is chosen by the cross-validated log loss: a proper score, smooth where small folds tie on
    accuracy over much of the grid (accuracy scoring measured no better: benchmarks/BENCHMARKS.md).
    The views of one example stay in the same cross-validation fold.
    """
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
    from sklearn.metrics import log_loss
    from sklearn.model_selection import StratifiedGroupKFold
    from threadpoolctl import threadpool_limits  # a scikit-learn dependency

    started = time.perf_counter()
    x = torch.cat([view.float().cpu() for view in views]).numpy().astype(np.float64)
    y = labels.cpu().numpy()
    y = np.tile(y, len(views))
    groups = np.tile(np.arange(len(labels)), len(views))
    mean, spread = x.mean(0), float(np.sqrt(x.var(0).mean())) + 1e-12
    z = (x - mean) / spread
    classes = np.unique(y)
    class_weight = {int(c): float(weights[c]) for c in classes} if weights is not None else None
    folds = int(min(MAX_FOLDS, np.bincount(y)[classes].min())) if len(classes) > 1 else 0
    with threadpool_limits(limits=BLAS_THREADS, user_api="blas"):
        if folds >= 2:
            splits = list(StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed).split(z, y, groups))
            model = LogisticRegressionCV(Cs=list(C_GRID), cv=splits, scoring="neg_log_loss", max_iter=2000,
                                         class_weight=class_weight, random_state=seed)
            with warnings.catch_warnings():  # scikit-learn 1.9 announces renamed attributes; C_ is in every version
                warnings.simplefilter("ignore", FutureWarning)
                model.fit(z, y)
            C = float(np.atleast_1d(model.C_)[0])
        else:  # too few examples of some class to cross-validate: scikit-learn's default strength
            C = 1.0
            model = LogisticRegression(C=C, max_iter=2000, class_weight=class_weight).fit(z, y)
    coef, intercept = model.coef_, model.intercept_
    if coef.shape[0] == 1 and len(model.classes_) == 2:  # binary: one logit difference, split evenly
        coef, intercept = np.concatenate([-coef / 2, coef / 2]), np.concatenate([-intercept / 2, intercept / 2])
    full_coef = np.zeros((head.out_features, x.shape[1]))
    full_intercept = np.full(head.out_features, -1e4)  # a class absent from training is never predicted
    full_coef[model.classes_], full_intercept[model.classes_] = coef, intercept
    with torch.no_grad():  # w.(x - mean)/s + b  ==  (w/s).x + (b - w.mean/s)
        scaled = full_coef / spread
        head.weight.copy_(torch.as_tensor(scaled, dtype=head.weight.dtype))
        head.bias.copy_(torch.as_tensor(full_intercept - scaled @ mean, dtype=head.bias.dtype))
    loss = log_loss(y, model.predict_proba(z), labels=model.classes_)
    return LogisticFit(C, folds, float(loss), time.perf_counter() - started)


class SolvedHeadTrainer:
    """Trains a cached head plan as `training.loop.train` would, with a solver in place of the epochs:
    the logistic regression above, or the fitter a task gives (`FeatureSource.head_fit`).

    The plan's training views and labels are what the cache computed; the result is one evaluation,
    recorded as epoch 1 in log.jsonl and metrics.json.
    """

    def __init__(self, views: Sequence[torch.Tensor], labels: torch.Tensor, fit_head: HeadFitter = fit_logistic_head):
        self.views, self.labels, self.fit_head = views, labels, fit_head
        self.fit: HeadFit | None = None

    def __call__(self, plan: Plan, config: TrainingConfig, accelerator: Accelerator, run_dir: Path,
                 callbacks: Sequence[Callback] = ()) -> TrainResult:
        head = plan.model.model
        weights = class_weights(config.class_weights, plan.train_labels, len(plan.label_names))
        self.fit = self.fit_head(head, self.views, self.labels, weights, config.seed)
        say(accelerator, self.fit.announcement())
        model = plan.model.to(accelerator.device)
        metrics = evaluate(model, accelerator.prepare(plan.eval_loader), accelerator, plan.label_names, config.extra_metrics)
        record = {"epoch": 1, "train_loss": self.fit.train_loss, **scalar_metrics(metrics)}
        JsonlLog(run_dir / "log.jsonl", accelerator.is_main_process).write(**record)
        say(accelerator, "epoch 1: " + ", ".join(f"{k}={v:.4g}" for k, v in record.items() if k != "epoch"))
        return TrainResult(best_metrics=metrics, best_epoch=1, history=[record], train_seconds=self.fit.seconds,
                           epoch_seconds=[self.fit.seconds])

    def summary(self) -> dict[str, Any]:
        return {"head_solver": self.fit.as_record() if self.fit else None}
