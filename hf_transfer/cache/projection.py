"""The adaptation layer of speech->text transfer: speech features projected into a text model's features,
where the text model's own head reads them.

A text run classifies text; its head reads the mean-pooled states of its encoder. Given speech clips
and what they say (transcripts), a linear map from the frozen speech features to the text model's
features of the transcripts is fitted by ridge regression, and the text head, unchanged, classifies
the projected speech. The clips need no labels: the text model's reading of each transcript is the
target. Map and head are both linear, so they fold into one linear head on the speech features,
which is what the run saves: the folder is an ordinary audio classifier.

The ridge strength is chosen by cross-validation on the training pairs, scored by the squared error
of the text head's logits (not of all text features: only the directions the head reads matter
for its predictions), so no label and no validation clip chooses it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

# ridge strengths tried, per training pair, on speech features scaled to unit mean variance
STRENGTH_GRID = tuple(10.0 ** exponent for exponent in np.arange(-4.0, 2.01, 0.5))
MAX_FOLDS = 5


@dataclass
class TextTargets:
    """What the fit needs of the text run: its features of each training clip's transcript (in the
    training split's order) and its linear head, rows in the task's label order."""

    features: torch.Tensor  # (clips, text feature size)
    weight: torch.Tensor  # (labels, text feature size)
    bias: torch.Tensor  # (labels,)
    run: str  # the text run's folder, for the record


@dataclass
class ProjectionFit:
    strength: float
    folds: int
    agreement: float  # held-out pairs whose projected speech the text head labels as it labels their transcript
    train_loss: float  # mean squared error of the text head's logits on the training pairs
    seconds: float
    run: str

    def as_record(self) -> dict[str, Any]:
        return {"kind": "text_projection", "text_run": self.run, "ridge_strength": self.strength,
                "cv_folds": self.folds, "cv_agreement_with_text_model": round(self.agreement, 4),
                "seconds": round(self.seconds, 2)}

    def announcement(self) -> str:
        return (f"head: adaptation layer fitted in {self.seconds:.1f} s: speech features projected into the features "
                f"of {self.run} (ridge, strength {self.strength:g} chosen by {self.folds}-fold cross-validation on "
                f"the transcripts), read by its head; on held-out pairs it labels the speech as the text model labels "
                f"the transcript {self.agreement:.1%} of the time")


def fit_projected_text_head(head: nn.Linear, speech: torch.Tensor, targets: TextTargets, seed: int) -> ProjectionFit:
    """Set `head` (on the speech features) to the text head composed with the fitted projection."""
    from sklearn.linear_model import Ridge, RidgeCV
    from sklearn.model_selection import KFold, cross_val_predict

    started = time.perf_counter()
    x = speech.float().cpu().numpy().astype(np.float64)
    y = targets.features.float().cpu().numpy().astype(np.float64)
    if len(x) != len(y):
        raise ValueError(f"{len(x)} speech features but {len(y)} transcript features")
    text_weight = targets.weight.double().cpu().numpy()
    text_bias = targets.bias.double().cpu().numpy()
    # one spread for all dimensions (as the logistic solver), so one strength grid fits every encoder's scale
    mean, spread = x.mean(0), float(np.sqrt(x.var(0).mean())) + 1e-12
    z = (x - mean) / spread

    def logit_error(estimator, features: np.ndarray, wanted: np.ndarray) -> float:
        return -float(np.mean(((estimator.predict(features) - wanted) @ text_weight.T) ** 2))

    def labels(features: np.ndarray) -> np.ndarray:  # the text head's reading of text features
        return (features @ text_weight.T + text_bias).argmax(1)

    folds = KFold(n_splits=min(MAX_FOLDS, len(z)), shuffle=True, random_state=seed)
    strengths = [s * len(z) for s in STRENGTH_GRID]
    ridge = RidgeCV(alphas=strengths, cv=folds, scoring=logit_error).fit(z, y)
    held_out = cross_val_predict(Ridge(alpha=ridge.alpha_), z, y, cv=folds)
    agreement = float(np.mean(labels(held_out) == labels(y)))
    projection, offset = ridge.coef_, ridge.intercept_  # text features = projection @ z + offset
    # logits = W (P (x - mean) / spread + c) + b  ==  (W P / spread) x + (W c + b - (W P / spread) mean)
    weight = text_weight @ projection / spread
    bias = text_weight @ offset + text_bias - weight @ mean
    with torch.no_grad():
        head.weight.copy_(torch.as_tensor(weight, dtype=head.weight.dtype))
        head.bias.copy_(torch.as_tensor(bias, dtype=head.bias.dtype))
    train_loss = -logit_error(ridge, z, y)
    return ProjectionFit(float(ridge.alpha_) / len(z), folds.get_n_splits(), agreement, train_loss,
                         time.perf_counter() - started, targets.run)


def text_projection_fitter(targets: TextTargets) -> Callable[..., ProjectionFit]:
    """A head fitter for the cached-head trainer: the projection in place of the logistic regression.

    The training labels are not read: the text model's reading of each transcript is the target.
    """

    def fit(head: nn.Linear, views: Sequence[torch.Tensor], _labels: torch.Tensor, _weights: torch.Tensor | None,
            seed: int) -> ProjectionFit:
        return fit_projected_text_head(head, views[0], targets, seed)

    return fit
