"""The recipe section of `hf-transfer rank` (kept apart from schema.py, which holds the training sections)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from hf_transfer.recipe.fields import _f


@dataclass
class RankConfig:
    """`hf-transfer rank`: which source models to compare on the recipe's data, and by which score."""

    candidates: list[str] = _f(
        [], "Source models `hf-transfer rank` compares, named as model.name takes them (Hub id, local folder, timm "
        "name), all of the recipe's task; --candidates replaces this list."
    )
    score: Literal["logme", "hscore", "probe_accuracy", "knn_accuracy"] = _f(
        "probe_accuracy",
        "The score `hf-transfer rank` names its winner by (the highest wins; equal scores: the higher LogME). "
        "probe_accuracy: validation accuracy of the logistic-regression head that train fits on these features "
        "(what a freeze_backbone run reports; of the four, the score whose order best matched fine-tuned accuracy "
        "on four data sets, BENCHMARKS.md); logme: the evidence of a Bayesian linear model on the frozen training "
        "features (You et al. 2021), no validation split, nothing to tune; hscore: tr(cov(f)^-1 cov(E[f|y])) on the "
        "training features (Bao et al. 2019); knn_accuracy: validation accuracy of a 5-nearest-neighbour vote (cosine).",
    )
    max_train_examples: int | None = _f(
        1000,
        "At most this many training examples, a seeded random sample (data.max_train_samples's), are scored per "
        "candidate; the validation split is always whole, and a smaller data.max_train_samples wins; null: the whole "
        "training split. 1000: on four text sets every score named the whole split's winner from such samples, and "
        "a frozen pass over fewer examples keeps ranking a small share of fine-tuning (BENCHMARKS.md, issue 12).",
        at_least=2,
    )
