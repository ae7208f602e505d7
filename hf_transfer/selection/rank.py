"""`hf-transfer rank`: score candidate source models on the recipe's data before training any.

For each candidate the recipe's task is built with that model and a frozen backbone; the features of
the train and validation splits come through the feature cache (the entries a later freeze_backbone
`train` reads), and the scores below are computed on them. LogME and H-score read only the training
features; the two accuracies are measured on the validation split. The winner is the candidate with
the highest `rank.score`. ranking.json records every candidate, and those that could not load with
their error.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn

from hf_transfer.cache.head import feature_cache_dir, split_features
from hf_transfer.cache.solver import fit_logistic_head
from hf_transfer.console import bar, say
from hf_transfer.errors import HfTransferError
from hf_transfer.export.folder import check_output_dir, create_output_dir, write_json
from hf_transfer.recipe import Recipe
from hf_transfer.selection.candidates import candidate_names, candidate_recipe
from hf_transfer.selection.scores import KNN_NEIGHBOURS, hscore, knn_accuracy, logme
from hf_transfer.sources.offline import (
    hub_is_offline,
    use_offline_mode_if_hub_unreachable,
)
from hf_transfer.strategies import count_parameters
from hf_transfer.tasks import task_builder
from hf_transfer.training.optim import class_weights
from hf_transfer.training.plan import Plan
from hf_transfer.training.precision import resolve_mixed_precision

RANKING_FILE = "ranking.json"


@dataclass
class SplitFeatures:
    """One candidate's frozen features (float32, CPU) and labels, as the scores take them."""

    train: torch.Tensor
    train_labels: torch.Tensor
    validation: torch.Tensor
    validation_labels: torch.Tensor
    num_classes: int
    class_weights: torch.Tensor | None
    seed: int


def probe_accuracy(features: SplitFeatures) -> float:
    """Validation accuracy of the linear head `train` fits on these features with head.solver auto
    (the cross-validated logistic regression of cache/solver.py): what a freeze_backbone run scores."""
    head = nn.Linear(features.train.shape[1], features.num_classes)
    fit_logistic_head(head, [features.train], features.train_labels, features.class_weights, features.seed)
    with torch.no_grad():
        predicted = head(features.validation).argmax(-1)
    return float((predicted == features.validation_labels).float().mean())


@dataclass(frozen=True)
class Score:
    title: str  # the table's column
    compute: Callable[[SplitFeatures], float]


SCORES: dict[str, Score] = {
    "logme": Score("LogME", lambda f: logme(f.train.numpy(), f.train_labels.numpy())),
    "hscore": Score("H-score", lambda f: hscore(f.train.numpy(), f.train_labels.numpy())),
    "probe_accuracy": Score("probe acc", probe_accuracy),
    "knn_accuracy": Score(
        f"{KNN_NEIGHBOURS}-NN acc",
        lambda f: knn_accuracy(f.train.numpy(), f.train_labels.numpy(), f.validation.numpy(),
                               f.validation_labels.numpy()),
    ),
}


def default_output_dir(recipe: Recipe) -> Path:
    return Path("runs") / f"{recipe.name}-rank"


def _error_line(error: Exception) -> str:
    if isinstance(error, HfTransferError):
        return " ".join(str(error).split())
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {first}"


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None  # ranking.json stays standard JSON (no NaN, no Infinity)


def scored_features(recipe: Recipe, task: Plan, accelerator: Accelerator) -> tuple[SplitFeatures, dict[str, list[str]]]:
    """A candidate's frozen features as the scores read them (through the feature cache), and the cache's hits."""
    features, cache_use = split_features(recipe, task.model, task.feature_source, accelerator)
    (train, train_labels), (validation, validation_labels) = features["train"], features["validation"]
    inputs = SplitFeatures(
        train.float().cpu(), train_labels.cpu(), validation.float().cpu(), validation_labels.cpu(),
        len(task.label_names), class_weights(recipe.training.class_weights, task.train_labels, len(task.label_names)),
        recipe.training.seed,
    )
    return inputs, cache_use


def _scored(recipe: Recipe, task: Plan, accelerator: Accelerator) -> dict[str, Any]:
    inputs, cache_use = scored_features(recipe, task, accelerator)
    return {
        **{key: _finite(score.compute(inputs)) for key, score in SCORES.items()},
        "parameters": count_parameters(task.model)[1], "feature_dim": int(inputs.train.shape[1]),
        "train_examples": len(inputs.train_labels), "validation_examples": len(inputs.validation_labels),
        "feature_cache": cache_use,
    }


def score_candidate(recipe: Recipe, accelerator: Accelerator) -> dict[str, Any]:
    """One row of the ranking: the candidate's scores, time, size and feature-cache use, or (`error`)
    why it could not load or run; either way the other candidates are still ranked."""
    started = time.perf_counter()
    set_seed(recipe.training.seed)  # a new head part initialised as `train` initialises it: the same cache key
    task, row = None, {}
    try:
        task = task_builder(recipe)(recipe)
    except Exception as error:  # any failure to load one candidate (a bad id, files, a config) must not stop the rest
        row = {"error": f"cannot load: {_error_line(error)}"}
    if task is not None:
        try:
            row = {**_scored(recipe, task, accelerator), "error": None}
        except (HfTransferError, RuntimeError, ValueError) as error:  # runs out of memory, or fails on this data
            row = {"error": f"cannot compute its features: {_error_line(error)}"}
    del task
    gc.collect()  # one candidate's model in memory at a time
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"model": recipe.model.name, **row, "seconds": round(time.perf_counter() - started, 2)}


# equal scores (accuracies on a small validation split often are) go to the higher LogME: it reads the
# training split, which the accuracies do not
TIE_BREAK = "logme"


def order_rows(rows: list[dict[str, Any]], score: str) -> list[dict[str, Any]]:
    """Best first by `score`, equal scores by TIE_BREAK; candidates without the score (a failed load, a
    score that is not finite) last, in the order given."""
    def key(row: dict[str, Any]) -> tuple[bool, float, float]:
        value, tie_break = row.get(score), row.get(TIE_BREAK)
        return (value is None, -value if value is not None else 0.0, -tie_break if tie_break is not None else 0.0)

    ranked = sorted(rows, key=key)
    for place, row in enumerate(ranked, 1):
        row["rank"] = place if row.get(score) is not None else None
    return ranked


def rank_accelerator(recipe: Recipe) -> Accelerator:
    """The Accelerator rank computes features with."""
    # the precision fine-tuning the candidates would run in: ranking is worth its cost only as a small share
    # of fine-tuning them, and fp32 features on a CPU whose fine-tuning runs bf16 cost 2.2x the time for the
    # same scores (SST-2 sample, three text candidates: BENCHMARKS.md, issue 12). The cache keys carry it,
    # and the `train it` hint names it, so the frozen run it suggests reads these very features
    precision = resolve_mixed_precision(recipe.training.mixed_precision, trains_backbone=True, task=recipe.task)
    return Accelerator(mixed_precision=precision)


def rank_models(recipe: Recipe, candidates: list[str] | None = None, output_dir: Path | None = None,
                overwrite: bool = False) -> dict[str, Any]:
    """Rank `candidates` (default: rank.candidates) on the recipe's data; write and return ranking.json's
    record, in `output_dir` (default runs/<recipe name>-rank).

    Every check (task, candidates' modality, recipe values, output folder) passes before anything is
    loaded or written.
    """
    names = candidate_names(recipe, candidates)
    output_dir = Path(output_dir) if output_dir is not None else default_output_dir(recipe)
    recipes = [candidate_recipe(recipe, name, output_dir) for name in names]
    check_output_dir(output_dir, overwrite)
    accelerator = rank_accelerator(recipe)
    if not hub_is_offline() and use_offline_mode_if_hub_unreachable():
        say(accelerator, "The Hugging Face Hub is out of reach: using local files and packaged models only.")
    score = recipe.rank.score
    train_limit = recipes[0].data.max_train_samples  # rank.max_train_examples or the recipe's own smaller sample
    say(accelerator, f"ranking {len(names)} candidate{'s' if len(names) > 1 else ''} on {recipe.name}'s data "
                     f"({'the whole training split' if train_limit is None else f'at most {train_limit} training examples'}) by "
                     f"rank.score {score} (the highest {SCORES[score].title} wins); frozen features cached in "
                     f"{feature_cache_dir(recipes[0])}")
    rows = [score_candidate(candidate, accelerator) for candidate in bar(recipes, desc="ranking", unit="model")]
    for row in rows:
        if row["error"] is not None:
            say(accelerator, f"{row['model']} {row['error']}")
    if all(row["error"] is not None for row in rows):
        failures = "; ".join(f"{row['model']}: {row['error']}" for row in rows)
        raise HfTransferError(f"No candidate could be ranked ({failures}). Fix the names, or check the data.")
    ranked = order_rows(rows, score)
    record = {
        "recipe": recipe.name, "task": recipe.task, "score": score,
        "rule": f"the highest {SCORES[score].title} (rank.score {score}; equal scores: the higher {SCORES[TIE_BREAK].title})",
        "winner": ranked[0]["model"] if ranked[0]["rank"] is not None else None,
        "feature_cache_dir": str(feature_cache_dir(recipes[0])), "mixed_precision": accelerator.mixed_precision,
        "max_train_examples": train_limit, "candidates": ranked,
    }
    create_output_dir(output_dir)
    write_json(output_dir / RANKING_FILE, record)
    return record


def ranking_table(record: dict[str, Any]) -> str:
    """The ranking as a fixed-width table, best first; a candidate that could not load shows its error."""
    columns = [*SCORES, "seconds", "parameters"]
    titles = [SCORES[key].title for key in SCORES] + ["seconds", "parameters"]
    formats: dict[str, Callable[[Any], str]] = {"seconds": "{:.1f}".format, "parameters": "{:,}".format}
    width = max(len("candidate"), *(len(row["model"]) for row in record["candidates"]))
    lines = ["  ".join([f"{'candidate':<{width}}", *(f"{title:>11}" for title in titles)])]
    for row in record["candidates"]:
        if row["error"] is not None:
            lines.append(f"{row['model']:<{width}}  {row['error']}")
            continue
        cells = ["-" if row.get(key) is None else formats.get(key, "{:.4f}".format)(row[key]) for key in columns]
        lines.append("  ".join([f"{row['model']:<{width}}", *(f"{cell:>11}" for cell in cells)]))
    winner = record["winner"]
    lines.append(f"would train: {winner}, by {record['rule']}" if winner else
                 f"no winner: no candidate has a finite {record['score']}")
    return "\n".join(lines)
