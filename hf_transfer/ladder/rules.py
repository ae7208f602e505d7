"""The rules of strategy auto: the rungs in order of cost, why one is skipped, what a rung is
estimated to cost, and which rung wins. Decisions only; search.py runs the rungs.

The order is the order of cost, cheapest first: the frozen backbone with the head fitted by the
solver (one pass over the data), LoRA (every example forward and backward, few weights updated,
a small adapter saved), partial fine-tuning (the top blocks), full fine-tuning (every weight).
Gradual unfreezing is left out: it costs what full fine-tuning costs and, in the ladder, would
only repeat partial and full in one run.

The fine-tuning rungs share the epochs by successive halving (Jamieson and Talwalkar, 2016, the
inner loop of Hyperband): each trains one epoch, then the better half goes on for another, and so
on until one is left, which trains to the end. A rung's best score can only rise as it goes on, so
the rungs dropped can only win a tie; three rungs over three epochs cost 6 rung-epochs instead of 9.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from hf_transfer.recipe import Recipe
from hf_transfer.sources.base import TransferModel

# training.early_stopping_patience of every rung when the recipe leaves it null: one epoch without
# a better metric ends a rung. The ladder is a search, and each rung keeps its best epoch anyway, so
# an epoch spent confirming a plateau is budget the costlier rungs lose.
LADDER_PATIENCE = 1
# A rung evaluated on weights mixed with its start (training.weight_interpolation, a share of the fine-tuned
# ones) moves only that share as far per epoch, so on a small validation split an epoch that does not beat the
# best is often a tie, not a plateau: the ladder's own patience then counts 1 / share epochs (2 at auto's 0.5).
# Hymenoptera, full with the interpolation: 95.4, 95.4, 96.1, ... stopped after epoch 2 at patience 1
# (benchmarks/BENCHMARKS.md, issue 12). A patience the recipe sets is kept as it is.
PATIENCE_RULE = (f"a rung stops after {LADDER_PATIENCE} epoch(s) without a better {{metric}}, or 1 / share as many "
                 "where its epochs are evaluated on weights mixed with its start (training.weight_interpolation)")


def rung_patience(share: float | None) -> int:
    """The ladder's own patience for a rung whose evaluated weights hold `share` of the fine-tuned ones (None: all)."""
    return LADDER_PATIENCE if share is None else math.ceil(LADDER_PATIENCE / share)


# a fine-tuning epoch passes every training example forward and backward (about three forward
# passes' work), where the frozen rung passed each example once, without gradients
FORWARD_PASSES_PER_EPOCH = 3
# a costlier rung must beat the best by more than this many validation examples' worth of the metric
TIE_EXAMPLES = 0.5
# the LoRA rung trains at training.lr (and backbone_lr, where set) times this: low-rank updates want a larger
# step than the full fine-tuning a recipe's rate is chosen for. MiniLM-L6, 3 epochs, last epoch at 5x / 1x the
# recipe's 1e-4: SST-2 sample 82.6% / 78.3%, Amazon electronics 81.5% / 78.3% (benchmarks/BENCHMARKS.md)
LORA_LR_SCALE = 5.0
LORA_RULE = f"the lora rung trains at {LORA_LR_SCALE:g}x training.lr (and training.backbone_lr where set)"

TIE_RULE = (f"the best {{metric}}, and among the rungs within {TIE_EXAMPLES:g} of a validation example's worth of it "
            f"({TIE_EXAMPLES:g} / validation examples) the cheapest, i.e. the earliest in the ladder")
HALVING_RULE = (
    "the fine-tuning rungs train their first epoch in turn, cheapest first; then, round after round, the better "
    "half of the rungs still training (rounded up, with any rung tied with the last one kept) by the best {metric} "
    "so far trains one epoch more, resumed from its checkpoint as if it had not stopped, and the others stop; the "
    "last one left trains to training.epochs. A rung that stops early stops for good"
)
BUDGET_RULE = (
    "the frozen rung always runs. A fine-tuning rung does not start when the seconds spent so far plus its "
    "estimated first epoch exceed training.time_budget; the estimate is the seconds per epoch of the last "
    "fine-tuning rung (its whole time, task build included, over the epochs it ran), or, before any, the frozen "
    "rung's seconds (a fine-tuning rung builds its task too, and with strategy.head_first fits its head first: an "
    f"over-estimate without it) + {FORWARD_PASSES_PER_EPOCH} x the seconds of the frozen rung's pass over the data "
    "(forward and backward: about three forward passes); no estimate when the frozen features came from the cache "
    "(the rung starts). A rung does not go on to a further epoch that, at its own seconds per epoch, would end past "
    "the budget, and a running rung stops after an epoch when one more, at its mean epoch time, would"
)


def _always(recipe: Recipe, model: TransferModel) -> str | None:
    return None


def _lora_blocker(recipe: Recipe, model: TransferModel) -> str | None:
    if recipe.strategy.lora.target_modules or model.has_default_lora_targets:
        return None
    return ("the source model has no default LoRA targets (a CNN has no attention or MLP linears); set "
            "strategy.lora.target_modules to names of its layers to include lora")


def _partial_blocker(recipe: Recipe, model: TransferModel) -> str | None:
    blocks, trainable = len(model.block_prefixes), recipe.strategy.trainable_blocks
    if trainable < blocks:
        return None
    return (f"strategy.trainable_blocks ({trainable}) would leave none of the backbone's {blocks} blocks frozen: "
            "partial would repeat full")


@dataclass(frozen=True)
class Rung:
    strategy: str
    # why this rung cannot serve the source model (the frozen rung's model, strategy applied), or None
    blocker: Callable[[Recipe, TransferModel], str | None] = _always


LADDER: tuple[Rung, ...] = (
    Rung("freeze_backbone"),
    Rung("lora", _lora_blocker),
    Rung("partial", _partial_blocker),
    Rung("full"),
)


@dataclass
class RungResult:
    """What one rung reached, or why it did not run (status skipped) or did not finish (status failed)."""

    strategy: str
    status: str  # "trained", "skipped" or "failed"
    reason: str | None = None
    accuracy: float | None = None
    f1_macro: float | None = None
    score: float | None = None  # training.metric_for_best of the kept epoch
    best_epoch: int | None = None
    epochs: int | None = None  # epochs run (the solver: 1)
    seconds: float | None = None  # the whole rung: task build, features, head fit, training, evaluation
    stopped_early: bool = False
    patience: int | None = None  # the early stopping patience it trained with (PATIENCE_RULE)
    stopped_by_budget: bool = False
    trainable_parameters: int | None = None
    # the seconds of one forward pass over both splits (what the frozen rung measures; None: not measured)
    pass_seconds: float | None = None
    halted: str | None = None  # why a fine-tuning rung stopped before training.epochs, other than early stopping

    def as_record(self) -> dict[str, Any]:
        rounded = {k: round(v, 2) if v is not None else None for k, v in (("seconds", self.seconds),
                                                                          ("pass_seconds", self.pass_seconds))}
        return asdict(self) | rounded


def pass_seconds(summary: dict[str, Any], plan_seconds: float) -> float | None:
    """One forward pass over the data, as a frozen rung measured it: the features it computed while its plan was
    built, or, where the cache did not serve it, its mean loop epoch; None when its features came from the cache."""
    cache = summary.get("feature_cache")
    if cache is None:
        epochs = summary["epoch_train_seconds"]
        return sum(epochs) / len(epochs) if epochs else None
    return plan_seconds if cache["computed"] else None


def estimated_seconds(results: Sequence[RungResult], epochs: int) -> tuple[float | None, str]:
    """The next fine-tuning rung's estimated seconds and how it was estimated (BUDGET_RULE)."""
    trained = [r for r in results if r.status == "trained"]
    tuned = [r for r in trained if r.strategy != LADDER[0].strategy]
    if tuned:
        last = tuned[-1]
        per_epoch = last.seconds / max(last.epochs, 1)
        return epochs * per_epoch, f"{epochs} epochs x {per_epoch:.1f} s per epoch of {last.strategy}"
    frozen = trained[0] if trained and trained[0].strategy == LADDER[0].strategy else None
    if frozen is None or frozen.pass_seconds is None:
        return None, "no estimate: the frozen features came from the cache"
    # a fine-tuning rung builds its task (and, with strategy.head_first, fits its head) as the frozen rung did,
    # then trains its epochs: without head_first this over-estimates by one pass, so it errs towards skipping
    estimate = frozen.seconds + epochs * FORWARD_PASSES_PER_EPOCH * frozen.pass_seconds
    return estimate, (f"the frozen rung's {frozen.seconds:.1f} s + {epochs} epochs x {FORWARD_PASSES_PER_EPOCH} x "
                      f"{frozen.pass_seconds:.1f} s per pass over the data")


def halve(training: Sequence[RungResult], tolerance: float) -> tuple[list[RungResult], list[RungResult]]:
    """The rungs still training that go on after a round, and those that stop (HALVING_RULE): the better half
    by score, rounded up, and any rung within `tolerance` of the last one kept. Both lists keep ladder order."""
    ranked = sorted(training, key=lambda r: -r.score)  # stable: among equal scores the cheaper rung ranks first
    cut = ranked[math.ceil(len(ranked) / 2) - 1].score - tolerance
    return [r for r in training if r.score >= cut], [r for r in training if r.score < cut]


def continue_blocker(rung: RungResult, spent: float, budget: float | None) -> str | None:
    """Why a rung that won its round does not train one epoch more within the time budget, or None."""
    if budget is None:
        return None
    per_epoch = rung.seconds / max(rung.epochs, 1)
    if spent + per_epoch > budget:
        return (f"stopped after epoch {rung.epochs} by the time budget: one more epoch ({per_epoch:.1f} s) would end "
                f"past it ({budget - spent:.1f} s of {budget:g} s left)")
    return None


def budget_blocker(results: Sequence[RungResult], epochs: int, spent: float, budget: float | None) -> str | None:
    """Why the next fine-tuning rung does not fit the time budget, or None when it may start."""
    if budget is None:
        return None
    if spent >= budget:
        return f"the time budget is spent ({spent:.1f} s of {budget:g} s)"
    estimate, how = estimated_seconds(results, epochs)
    if estimate is not None and spent + estimate > budget:
        return f"estimated {estimate:.1f} s ({how}), {budget - spent:.1f} s of the {budget:g} s budget left"
    return None


def tie_tolerance(validation_examples: int) -> float:
    return TIE_EXAMPLES / max(validation_examples, 1)


def pick_winner(results: Sequence[RungResult], tolerance: float, metric: str) -> tuple[RungResult, str]:
    """The winner (TIE_RULE) among the trained rungs, and a sentence saying why it won."""
    trained = [r for r in results if r.status == "trained"]
    best = max(r.score for r in trained)
    winner = next(r for r in trained if r.score >= best - tolerance)
    ties = [r for r in trained if r is not winner and abs(r.score - winner.score) <= tolerance]
    top = max(trained, key=lambda r: r.score)  # the first of the highest
    if top is not winner:
        why = (f"{winner.strategy} reached {metric} {winner.score:.4f}, within the tie tolerance ({tolerance:.4g}, "
               f"{TIE_EXAMPLES:g} of a validation example) of the highest, {top.strategy}'s {top.score:.4f}; "
               "a tie goes to the cheaper rung")
    elif ties:
        tied = ", ".join(f"{r.strategy} ({r.score:.4f})" for r in ties)
        why = (f"{winner.strategy} reached the highest {metric}, {winner.score:.4f}, tied (within {tolerance:.4g}) "
               f"with the costlier {tied}: a tie goes to the cheaper rung")
    else:
        others = [r for r in trained if r is not winner]
        runner = max(others, key=lambda r: r.score) if others else None
        next_best = f" (next: {runner.strategy} {runner.score:.4f})" if runner else " (the only rung trained)"
        why = f"{winner.strategy} reached the highest {metric}, {winner.score:.4f}{next_best}"
    return winner, why


def still_in_the_running(results: Sequence[RungResult], tolerance: float) -> set[str]:
    """Rungs that may still win: within the tolerance of the best so far (a later rung only raises the best)."""
    trained = [r for r in results if r.status == "trained"]
    best = max((r.score for r in trained), default=None)
    return {r.strategy for r in trained if r.score >= best - tolerance}
