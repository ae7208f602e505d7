"""strategy auto: train the ladder's rungs (rules.py) within the time budget and save the winner.

Each rung is the run its strategy would be on its own (run.py's pieces: the task built afresh from
the pretrained weights, seeded the same, the frozen-feature cache and the head fitted first where
they apply), with early stopping; its log goes to OUTPUT/ladder/<strategy>/. The fine-tuning rungs
share the epochs by successive halving (rules.HALVING_RULE): a rung that pauses writes a checkpoint
into OUTPUT/ladder/<strategy>/checkpoints/, and one that goes on is built again and resumed from it,
so it trains exactly as it would have without the pause (training/checkpoint.py); the checkpoints
are removed once the rung is done. Rungs that can still win keep their trained model in memory (on
the CPU); the others are dropped.
The output folder then holds the winner's files as if its strategy had been named (recipe.yaml
names it), and metrics.json and the card say what was tried, what each rung reached, which were
skipped and why, and why the winner won.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from hf_transfer.console import say
from hf_transfer.errors import HfTransferError
from hf_transfer.export.folder import write_text
from hf_transfer.export.layout import LOG_FILE, RECIPE_FILE
from hf_transfer.ladder.rules import (
    BUDGET_RULE,
    HALVING_RULE,
    LADDER,
    LORA_LR_SCALE,
    LORA_RULE,
    PATIENCE_RULE,
    TIE_RULE,
    RungResult,
    budget_blocker,
    continue_blocker,
    halve,
    pass_seconds,
    pick_winner,
    rung_patience,
    still_in_the_running,
    tie_tolerance,
)
from hf_transfer.recipe import Recipe
from hf_transfer.run import (
    announce,
    build_task,
    check_before_writing,
    finish_run,
    make_accelerator,
    run_summary,
    save_run,
    start_output_folder,
    training_plan,
)
from hf_transfer.sources.base import TransferModel
from hf_transfer.tasks import task_builder
from hf_transfer.training.callbacks import Checkpointing, Deadline, interpolation_share, recipe_callbacks
from hf_transfer.training.checkpoint import CHECKPOINTS_DIR, Checkpointer, list_checkpoints
from hf_transfer.training.loop import train
from hf_transfer.training.state import Loop

LADDER_DIR = "ladder"  # OUTPUT/ladder/<strategy>/log.jsonl: each rung's log; OUTPUT/ladder/recipe.yaml: the search's recipe


@dataclass
class Trained:
    """A trained rung that may still win: how to save it, and what its run would have written."""

    recipe: Recipe
    save: Callable[[Path], None]
    card: str
    summary: dict[str, Any]


class Pause(Checkpointing):
    """A fine-tuning rung's checkpoints: it restores a rung that goes on, and after `epoch` epochs (None: never)
    it saves one and stops the rung, for successive halving (its Checkpointer has no step interval, so nothing
    is saved mid-epoch). Last among the callbacks, so the epoch rule and
    early stopping have spoken, and a rung they stop is done rather than paused."""

    def __init__(self, checkpoints: Checkpointer, epoch: int | None):
        super().__init__(checkpoints)
        self.epoch = epoch
        self.paused = False

    def on_epoch_end(self, loop: Loop, metrics: dict[str, Any]) -> None:
        epochs = len(loop.state.history)
        if self.epoch is not None and epochs >= self.epoch and epochs < loop.config.epochs and not loop.stop:
            super().on_epoch_end(loop, metrics)
            self.paused = loop.stop = True


def rung_recipe(recipe: Recipe, strategy: str) -> Recipe:
    """The recipe of one rung: the run of `strategy` alone, as recipe.yaml will name the winner's (LORA_RULE); its
    early stopping patience is set once its plan is built (PATIENCE_RULE)."""
    training = dataclasses.replace(recipe.training, time_budget=None)
    if strategy == "lora":  # strategy auto takes numbers for training.lr (recipe/checks.py)
        backbone_lr = training.backbone_lr * LORA_LR_SCALE if training.backbone_lr else None
        training = dataclasses.replace(training, lr=training.lr * LORA_LR_SCALE, backbone_lr=backbone_lr)
    if strategy == "freeze_backbone":  # its backbone is the start's: there is nothing to interpolate
        training = dataclasses.replace(training, weight_interpolation=None)
    return dataclasses.replace(recipe, strategy=dataclasses.replace(recipe.strategy, name=strategy), training=training)


def agreed(value: Any) -> Any:
    """The main process's value on every process: decisions made on a clock must not differ between them."""
    return broadcast_object_list([value])[0]


def write_recipe(path: Path, recipe: Recipe) -> None:
    # --overwrite is the user's permission for this run, not part of the recipe to reuse (as run.py)
    write_text(path, dataclasses.replace(recipe, output=dataclasses.replace(recipe.output, overwrite=False)).to_yaml())


class Ladder:
    """The search's state: the clock, the rungs' results, the trained rungs still in the running."""

    def __init__(self, recipe: Recipe, accelerator: Accelerator):
        self.recipe, self.accelerator = recipe, accelerator
        self.patience = recipe.training.early_stopping_patience  # None: the ladder's own (rules.PATIENCE_RULE)
        self.budget = recipe.training.time_budget
        self.started = time.perf_counter()
        self.results: list[RungResult] = []
        self.kept: dict[str, Trained] = {}
        self.paused: set[str] = set()  # fine-tuning rungs with a checkpoint to go on from (successive halving)
        self.blocked: dict[str, str | None] | None = None  # each rung's blocker, read on the frozen rung's model
        self.validation_examples = 0
        self.folder_started = False

    def spent(self) -> float:
        return time.perf_counter() - self.started

    def rung_dir(self, strategy: str) -> Path:
        return self.recipe.output_dir / LADDER_DIR / strategy

    def start_folder(self) -> None:
        """Once the first rung has loaded: recipe.yaml and the rungs' logs start afresh (run.py's contract)."""
        start_output_folder(self.recipe, self.accelerator, None)
        if self.accelerator.is_main_process:
            (self.recipe.output_dir / LADDER_DIR).mkdir(exist_ok=True)
            write_recipe(self.recipe.output_dir / LADDER_DIR / RECIPE_FILE, self.recipe)
            for rung in LADDER:  # an earlier search's logs (--overwrite) must not be read as this one's
                (self.rung_dir(rung.strategy) / LOG_FILE).unlink(missing_ok=True)
        self.accelerator.wait_for_everyone()
        self.folder_started = True

    def read_source(self, model: TransferModel) -> None:
        """What the rungs' blockers say of the source model (the frozen rung's, strategy applied)."""
        self.blocked = {rung.strategy: rung.blocker(rung_recipe(self.recipe, rung.strategy), model)
                        for rung in LADDER}

    def skip_reason(self, strategy: str) -> str | None:
        if self.blocked is None:
            return None  # the frozen rung always runs
        reason = self.blocked[strategy]
        if reason is None:
            reason = budget_blocker(self.results, 1, self.spent(), self.budget)  # a rung's first round: one epoch
        return agreed(reason)

    def train_rung(self, strategy: str, until: int | None, earlier: RungResult | None = None) -> RungResult:
        """Train a rung from its start, or from where `earlier` paused, until epoch `until` (None: the end)."""
        recipe, accelerator = rung_recipe(self.recipe, strategy), self.accelerator
        started = time.perf_counter()
        accelerator.free_memory()  # a checkpoint saves what the accelerator holds: this rung's objects only
        task, parameters = build_task(recipe, accelerator)
        plan_started = time.perf_counter()
        plan = training_plan(recipe, task, accelerator)  # the frozen rung: its features computed (or read) here
        plan_seconds = time.perf_counter() - plan_started
        patience = self.patience or rung_patience(interpolation_share(recipe.training, plan))
        recipe = dataclasses.replace(recipe, training=dataclasses.replace(recipe.training, early_stopping_patience=patience))
        if not self.folder_started:
            self.start_folder()
            self.read_source(task.model)
        if accelerator.is_main_process:
            self.rung_dir(strategy).mkdir(exist_ok=True)
        callbacks = recipe_callbacks(recipe.training, plan)
        deadline = Deadline(self.started + self.budget) if self.budget is not None else None
        callbacks += [deadline] if deadline else []
        pause = None
        if plan.trainer is None and (until is not None or earlier is not None):  # a loop that pauses or goes on
            resume_from = list_checkpoints(self.rung_dir(strategy) / CHECKPOINTS_DIR)[-1] if earlier else None
            checkpoints = Checkpointer(self.rung_dir(strategy), accelerator, recipe.to_dict(), resume_from=resume_from)
            callbacks.append(pause := Pause(checkpoints, until))
        trainer = plan.trainer or train  # the loop, or the solver that fits the frozen head
        result = trainer(plan, recipe.training, accelerator, self.rung_dir(strategy), callbacks)
        summary = run_summary(recipe, task, plan, parameters, result, accelerator, None)
        seconds = agreed(time.perf_counter() - started) + (earlier.seconds if earlier else 0.0)
        self.validation_examples = result.best_metrics["num_samples"]
        task.model.to("cpu")  # a rung kept for the end waits off the accelerator
        self.kept[strategy] = Trained(recipe, plan.save, plan.card, summary)
        if pause and pause.paused:
            self.paused.add(strategy)
        else:
            self.paused.discard(strategy)
            self.remove_checkpoints(strategy)
        return RungResult(
            strategy, "trained", accuracy=result.best_metrics["accuracy"], f1_macro=result.best_metrics["f1_macro"],
            score=result.best_metrics[recipe.training.metric_for_best], best_epoch=result.best_epoch,
            epochs=len(result.history), seconds=seconds, stopped_early=result.stopped_early, patience=patience,
            stopped_by_budget=bool(deadline and deadline.stopped_at), trainable_parameters=parameters[0],
            pass_seconds=agreed(pass_seconds(summary, plan_seconds)) if earlier is None else earlier.pass_seconds,
        )

    def remove_checkpoints(self, strategy: str) -> None:
        if self.accelerator.is_main_process:
            shutil.rmtree(self.rung_dir(strategy) / CHECKPOINTS_DIR, ignore_errors=True)

    def attempt(self, strategy: str, until: int | None, earlier: RungResult | None = None) -> RungResult:
        """Train a rung (train_rung); a rung that does not fit fails alone, with status "failed" and the reason."""
        try:
            return self.train_rung(strategy, until, earlier)
        except (HfTransferError, torch.OutOfMemoryError) as error:
            if strategy == LADDER[0].strategy:
                raise  # the frozen rung failing is the data's or the model's fault: every rung would
            # a costlier rung that does not fit loses only itself: the cheaper rungs' models are kept
            why = str(error) if isinstance(error, HfTransferError) else (
                "out of memory: a smaller training.batch_size (or batch_size auto) would fit")
            say(self.accelerator, f"strategy auto: {strategy} failed: {why}")
        # outside the except block: there the error's traceback still holds the failed rung's model
        self.paused.discard(strategy)
        self.remove_checkpoints(strategy)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return RungResult(strategy, "failed", why)

    def report(self, outcome: RungResult) -> None:
        say(self.accelerator, f"strategy auto: {outcome.strategy} reached {self.recipe.training.metric_for_best} "
                              f"{outcome.score:.4f} (epoch {outcome.best_epoch} of {outcome.epochs}) in "
                              f"{outcome.seconds:.1f} s")

    def run(self) -> None:
        """The frozen rung, then every fine-tuning rung's first epoch, then the rounds of successive halving."""
        first_round = 1 if self.recipe.training.epochs > 1 else None
        for number, rung in enumerate(LADDER, 1):
            reason = self.skip_reason(rung.strategy)
            if reason is not None:
                self.results.append(RungResult(rung.strategy, "skipped", reason))
                say(self.accelerator, f"strategy auto: {rung.strategy} skipped: {reason}")
                continue
            say(self.accelerator, f"strategy auto: rung {number} of {len(LADDER)}, {rung.strategy}")
            outcome = self.attempt(rung.strategy, first_round if number > 1 else None)
            self.results.append(outcome)
            if outcome.status == "trained":
                self.report(outcome)
            self.drop_losers()
        epochs_done = 1
        while self.paused:
            self.halving_round(epochs_done)
            epochs_done += 1

    def halving_round(self, epochs_done: int) -> None:
        """The better half of the paused rungs trains one epoch more (the last one left: to the end)."""
        training = [r for r in self.results if r.strategy in self.paused]
        going_on, stopping = halve(training, self.tolerance())
        for result in stopping:
            self.stop(result, f"stopped after epoch {epochs_done} by successive halving: in the lower half of the "
                              f"{len(training)} rungs still training")
        for result in going_on:
            self.go_on(result, until=epochs_done + 1 if len(going_on) > 1 else None)
        self.drop_losers()

    def go_on(self, result: RungResult, until: int | None) -> None:
        """Resume a paused rung, within the budget; its result replaces the one it paused with."""
        reason = agreed(continue_blocker(result, self.spent(), self.budget))
        if reason is not None:
            result.stopped_by_budget = True
            return self.stop(result, reason)
        say(self.accelerator, f"strategy auto: {result.strategy} goes on to epoch {until or self.recipe.training.epochs}")
        outcome = self.attempt(result.strategy, until, result)
        if outcome.status == "failed":  # it keeps what it reached before
            return self.stop(result, f"stopped after epoch {result.epochs}: {outcome.reason}")
        self.results[self.results.index(result)] = outcome
        self.report(outcome)

    def stop(self, result: RungResult, why: str) -> None:
        """A paused rung stops for good: its result stands, its checkpoint goes."""
        result.halted = why
        say(self.accelerator, f"strategy auto: {result.strategy} {why}")
        self.paused.discard(result.strategy)
        self.remove_checkpoints(result.strategy)

    def tolerance(self) -> float:
        return tie_tolerance(self.validation_examples)

    def drop_losers(self) -> None:
        """Rungs that can no longer win give their memory back."""
        if self.validation_examples:
            running = still_in_the_running(self.results, self.tolerance())
            self.kept = {name: trained for name, trained in self.kept.items() if name in running}
        self.accelerator.free_memory()

    def patience_rule(self, metric: str) -> str:
        if self.patience is None:
            return PATIENCE_RULE.format(metric=metric)
        return f"a rung stops after {self.patience} epoch(s) without a better {metric} (training.early_stopping_patience)"

    def record(self, winner: RungResult, why: str) -> dict[str, Any]:
        """metrics.json's strategy_search."""
        spent = self.spent()
        metric = self.recipe.training.metric_for_best
        return {
            "requested": "auto",
            "metric": metric,
            "winner": winner.strategy,
            "why": why,
            "rungs": [result.as_record() for result in self.results],
            "seconds": round(spent, 2),
            "time_budget": self.budget,
            "budget_exceeded": self.budget is not None and spent > self.budget,
            "early_stopping_patience": self.patience,  # None: the ladder's own, by the rule below
            "tie_tolerance": self.tolerance(),
            "rules": {"order": [rung.strategy for rung in LADDER], "tie": TIE_RULE.format(metric=metric),
                      "halving": HALVING_RULE.format(metric=metric), "patience": self.patience_rule(metric),
                      "budget": BUDGET_RULE, "lora_lr": LORA_RULE},
        }


def run_ladder(recipe: Recipe, resume: str | None = None) -> dict[str, Any]:
    """Train `recipe` with strategy auto: the ladder's rungs, then the winner saved as its own run.

    Returns the winner's metrics record, with `strategy_search` saying what was tried.
    """
    if resume:
        raise HfTransferError("strategy auto does not resume (its rungs' checkpoints serve the halving only and are "
                              "removed as it goes): run it again without --resume; the frozen-feature cache keeps the "
                              "features already computed.")
    task_builder(recipe)  # an unknown task is refused before anything else
    accelerator = make_accelerator(recipe)
    check_before_writing(recipe, accelerator, None)
    announce(recipe, accelerator)
    ladder = Ladder(recipe, accelerator)
    ladder.run()
    frozen = ladder.results[0]
    if ladder.budget is not None and frozen.seconds > ladder.budget:
        say(accelerator, f"strategy auto: the time budget of {ladder.budget:g} s was exceeded by the frozen rung "
                         f"({frozen.seconds:.1f} s), which always runs; no other rung was tried")
    winner, why = pick_winner(ladder.results, ladder.tolerance(), recipe.training.metric_for_best)
    say(accelerator, f"strategy auto: the winner is {why}")
    kept = ladder.kept[winner.strategy]
    summary = kept.summary | {"strategy_search": ladder.record(winner, why)}
    output_dir = recipe.output_dir
    if accelerator.is_main_process:  # the folder as the winner's own run would have left it
        write_recipe(output_dir / RECIPE_FILE, kept.recipe)
        shutil.copyfile(ladder.rung_dir(winner.strategy) / LOG_FILE, output_dir / LOG_FILE)
    save_run(kept.save, kept.card, kept.recipe, summary, accelerator)
    finish_run(recipe, accelerator)
    return summary
