"""One training run, recipe to output folder, in the order of the design's flow:
recipe -> source model -> data -> strategy -> train -> evaluate -> export.

Each modality contributes a `Task`: its model, its loaders and how its model is saved. Everything
else (strategy, loop, metrics, output folder) is shared.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader

from hf_transfer.errors import HfTransferError
from hf_transfer.export import prepare_output_dir, staged, write_json, write_text
from hf_transfer.recipe import Recipe
from hf_transfer.sources.offline import hub_is_offline, use_offline_mode_if_hub_unreachable
from hf_transfer.sources.base import TransferModel
from hf_transfer.strategies import apply_strategy, count_parameters
from hf_transfer.trainer import TrainResult, train


@dataclass
class Task:
    """What a modality provides to a run."""

    model: TransferModel
    train_loader: DataLoader
    eval_loader: DataLoader
    label_names: list[str]
    train_labels: list[int]
    save: Callable[[TransferModel, Path], None]


def build_text_task(recipe: Recipe) -> Task:
    from hf_transfer.data.text import load_text_splits, text_loader, tokenize
    from hf_transfer.sources.text import load_text_model, load_tokenizer

    seed, training = recipe.training.seed, recipe.training
    splits = load_text_splits(recipe.data, seed)
    tokenizer = load_tokenizer(recipe.model)
    model = load_text_model(recipe.model, splits.label_names)
    train_set = tokenize(splits.train, tokenizer, recipe.data)
    eval_set = tokenize(splits.validation, tokenizer, recipe.data)
    # tokenised text collates in microseconds: worker processes would only add start-up cost
    workers = training.num_workers if training.num_workers is not None else 0

    def save(trained: TransferModel, folder: Path) -> None:
        trained.model.save_pretrained(folder)  # a peft model writes only its adapter and head
        tokenizer.save_pretrained(folder)
        if recipe.strategy.name == "lora" and recipe.strategy.merge_lora:
            trained.model.merge_and_unload().save_pretrained(folder / "merged")
            tokenizer.save_pretrained(folder / "merged")

    return Task(
        model=model,
        train_loader=text_loader(train_set, tokenizer, training.batch_size, True, workers, seed),
        eval_loader=text_loader(eval_set, tokenizer, training.eval_batch_size, False, workers, seed),
        label_names=splits.label_names,
        train_labels=list(splits.train["label"]),
        save=save,
    )


def build_image_task(recipe: Recipe) -> Task:
    from hf_transfer.data.images import (
        default_num_workers, image_loader, image_transforms, load_image_splits, with_transform,
    )
    from hf_transfer.sources.vision import load_vision_model, model_data_config, save_vision_model

    seed, training, data = recipe.training.seed, recipe.training, recipe.data
    workers = training.num_workers if training.num_workers is not None else default_num_workers()
    splits, _ = load_image_splits(data, seed, workers)  # unreadable images dropped (and logged) here
    model = load_vision_model(recipe.model, recipe.head, splits.label_names, data.image_size)
    # preprocessing comes from the model (timm's data config): mean/std/size match its pretraining
    data_config = model_data_config(model.model, data.image_size)
    train_transform, eval_transform = image_transforms(data_config, data.augment)
    train_set = with_transform(splits.train, train_transform, data.image_column)
    eval_set = with_transform(splits.validation, eval_transform, data.image_column)

    def save(trained: TransferModel, folder: Path) -> None:
        save_vision_model(trained, folder, recipe, data_config)

    return Task(
        model=model,
        train_loader=image_loader(train_set, training.batch_size, True, workers, seed),
        eval_loader=image_loader(eval_set, training.eval_batch_size, False, workers, seed),
        label_names=splits.label_names,
        train_labels=list(splits.train["label"]),
        save=save,
    )


TASKS: dict[str, Callable[[Recipe], Task]] = {"text": build_text_task, "image": build_image_task}


def class_weights(setting: str | list[float] | None, train_labels: list[int], num_classes: int) -> torch.Tensor | None:
    """Loss weights per class: given, or 'auto' = inverse frequency (n / (k * count_c))."""
    if setting is None:
        return None
    if setting == "auto":
        counts = Counter(train_labels)
        return torch.tensor(
            [len(train_labels) / (num_classes * max(counts.get(c, 0), 1)) for c in range(num_classes)]
        )
    if len(setting) != num_classes:
        raise HfTransferError(f"training.class_weights has {len(setting)} values for {num_classes} classes.")
    return torch.tensor(setting, dtype=torch.float)


def run_training(recipe: Recipe) -> dict[str, Any]:
    """Train as the recipe says and write the output folder; returns the final metrics record."""
    if recipe.task not in TASKS:
        raise HfTransferError(f"task '{recipe.task}' is not available; choose one of {sorted(TASKS)}.")
    output_dir = recipe.output_dir
    accelerator = Accelerator(
        mixed_precision=recipe.training.mixed_precision,
        gradient_accumulation_steps=recipe.training.gradient_accumulation_steps,
    )
    if accelerator.is_main_process:
        prepare_output_dir(output_dir, recipe.output.overwrite)
        write_text(output_dir / "recipe.yaml", recipe.to_yaml())
        (output_dir / "log.jsonl").unlink(missing_ok=True)
    accelerator.wait_for_everyone()
    accelerator.print(f"recipe {recipe.name}:\n{recipe.to_yaml()}")
    if not hub_is_offline() and use_offline_mode_if_hub_unreachable():
        accelerator.print("The Hugging Face Hub is out of reach: using local files and packaged models only.")
    set_seed(recipe.training.seed)

    task = TASKS[recipe.task](recipe)
    epoch_hook = apply_strategy(task.model, recipe.strategy)
    trainable, total = count_parameters(task.model)
    accelerator.print(
        f"strategy {recipe.strategy.name}: {trainable:,} trainable of {total:,} parameters "
        f"({100 * trainable / total:.2f}%); seed {recipe.training.seed}; device {accelerator.device}; "
        f"precision {accelerator.mixed_precision}; processes {accelerator.num_processes}"
    )
    weights = class_weights(recipe.training.class_weights, task.train_labels, len(task.label_names))
    result: TrainResult = train(
        task.model, task.train_loader, task.eval_loader, recipe.training, accelerator,
        output_dir, task.label_names, epoch_hook, weights,
    )
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
        "history": result.history,
        "eval": result.best_metrics,
    }
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with staged(output_dir) as staging:
            task.save(accelerator.unwrap_model(task.model), staging)
        write_json(output_dir / "metrics.json", summary)
        accelerator.print(
            f"best epoch {result.best_epoch}: accuracy {result.best_metrics['accuracy']:.4f}, "
            f"macro F1 {result.best_metrics['f1_macro']:.4f}; saved to {output_dir}"
        )
    accelerator.end_training()
    return summary
