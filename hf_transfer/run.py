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
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch.utils.data import DataLoader

from hf_transfer.checkpoint import Checkpointer, find_resume_checkpoint
from hf_transfer.domain import prepare_adaptation
from hf_transfer.errors import HfTransferError
from hf_transfer.export import prepare_output_dir, staged, write_json, write_text
from hf_transfer.features import (
    CachedTraining,
    FeatureSource,
    prepare_cached_training,
    unsupported_reason,
)
from hf_transfer.hub import push_folder, write_model_card
from hf_transfer.recipe import Recipe, StrategyConfig
from hf_transfer.sources.base import TransferModel
from hf_transfer.sources.offline import (
    hub_is_offline,
    use_offline_mode_if_hub_unreachable,
)
from hf_transfer.strategies import EpochHook, apply_strategy, count_parameters
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
    # what the frozen-feature cache needs (features.py); None: this task cannot use the cache
    feature_source: FeatureSource | None = None
    # how the recipe's strategy applies to this task's model; None: strategies.apply_strategy
    # (a two-tower model applies one strategy per tower, see multimodal.py)
    apply_strategy: Callable[[StrategyConfig], EpochHook | None] | None = None


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
    batching = dict(group_by_length=recipe.data.group_by_length, pad_to_multiple_of=recipe.data.pad_to_multiple_of)

    def save(trained: TransferModel, folder: Path) -> None:
        trained.model.save_pretrained(folder)  # a peft model writes only its adapter and head
        tokenizer.save_pretrained(folder)
        if recipe.strategy.name == "lora" and recipe.strategy.merge_lora:
            trained.model.merge_and_unload().save_pretrained(folder / "merged")
            tokenizer.save_pretrained(folder / "merged")

    def feature_loader(split: str, _view: int | None) -> DataLoader:
        # length-sorted batches: the fastest pass, and order does not matter to the cache
        dataset = train_set if split == "train" else eval_set
        return text_loader(dataset, tokenizer, training.eval_batch_size, False, workers, seed, group_by_length=True)

    from hf_transfer.features import dataset_fingerprint

    return Task(
        model=model,
        train_loader=text_loader(train_set, tokenizer, training.batch_size, True, workers, seed, **batching),
        eval_loader=text_loader(eval_set, tokenizer, training.eval_batch_size, False, workers, seed, **batching),
        label_names=splits.label_names,
        train_labels=list(splits.train["label"]),
        save=save,
        # token ids are the whole preprocessing, and the fingerprints hash them
        feature_source=FeatureSource(
            loader=feature_loader,
            fingerprint=lambda split: dataset_fingerprint(train_set if split == "train" else eval_set),
            preprocessing="token ids",
        ),
    )


def build_image_task(recipe: Recipe) -> Task:
    from hf_transfer.data.images import (
        image_num_workers,
        image_loader,
        image_transforms,
        load_image_splits,
        with_transform,
    )
    from hf_transfer.sources.vision import (
        load_vision_model,
        model_data_config,
        save_vision_model,
    )

    seed, training, data = recipe.training.seed, recipe.training, recipe.data
    workers = image_num_workers(training.num_workers)
    splits, _ = load_image_splits(data, seed, workers)  # unreadable images dropped (and logged) here
    model = load_vision_model(recipe.model, recipe.head, splits.label_names, data.image_size)
    # preprocessing comes from the model (timm's data config): mean/std/size match its pretraining
    data_config = model_data_config(model.model, data.image_size)
    train_transform, eval_transform = image_transforms(data_config, data.augment)
    train_set = with_transform(splits.train, train_transform, data.image_column)
    eval_set = with_transform(splits.validation, eval_transform, data.image_column)

    def save(trained: TransferModel, folder: Path) -> None:
        save_vision_model(trained, folder, recipe, data_config)

    def feature_loader(split: str, view: int | None) -> DataLoader:
        # dataset order; view None: the eval transform, view k: the training augmentation
        images = splits.train if split == "train" else splits.validation
        transform = train_transform if view is not None else eval_transform
        return image_loader(with_transform(images, transform, data.image_column), training.eval_batch_size, False, workers, seed)

    from hf_transfer.features import dataset_fingerprint

    return Task(
        model=model,
        train_loader=image_loader(train_set, training.batch_size, True, workers, seed),
        eval_loader=image_loader(eval_set, training.eval_batch_size, False, workers, seed),
        label_names=splits.label_names,
        train_labels=list(splits.train["label"]),
        save=save,
        feature_source=FeatureSource(
            loader=feature_loader,
            fingerprint=lambda split: dataset_fingerprint(
                splits.train if split == "train" else splits.validation, file_column=data.image_column
            ),
            preprocessing=f"eval: {eval_transform!r}; train: {train_transform!r}",
            augmented=True,
        ),
    )


def build_multimodal_task(recipe: Recipe) -> Task:
    from hf_transfer.multimodal import build_multimodal_task as build

    return build(recipe)


TASKS: dict[str, Callable[[Recipe], Task]] = {
    "text": build_text_task, "image": build_image_task, "multimodal": build_multimodal_task,
}


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


def feature_cache_training(recipe: Recipe, task: Task, accelerator: Accelerator) -> CachedTraining | None:
    """The head on cached frozen features when the recipe allows it (training.cache_features), else None."""
    setting = recipe.training.cache_features
    if setting is False:
        return None
    reason = unsupported_reason(task.model, recipe.strategy.name)
    if reason is None and task.feature_source is None:
        reason = f"the {recipe.task} task does not provide features"
    if reason is None:
        from hf_transfer.features import head_reproduces_model

        task.model.to(accelerator.device)
        probe = task.feature_source.loader("validation", None)
        if not head_reproduces_model(task.model, probe, accelerator.device, accelerator.autocast):
            reason = "the head on the model's features does not reproduce the model's logits"
    if reason is not None:
        if setting is True:
            raise HfTransferError(f"training.cache_features is true, but {reason}. Set it to auto or false.")
        if recipe.strategy.name == "freeze_backbone":
            accelerator.print(f"frozen-feature cache not used: {reason}")
        return None
    training = recipe.training
    cached = prepare_cached_training(
        task.model, task.feature_source,
        model_name=recipe.model.name,
        cache_dir=Path(training.feature_cache_dir) if training.feature_cache_dir else recipe.output_dir / "feature_cache",
        precision=accelerator.mixed_precision,
        device=accelerator.device,
        autocast=accelerator.autocast,
        batch_size=training.batch_size,
        views=training.cache_views,
        epochs=training.epochs,
        seed=training.seed,
    )
    augmentation = ""
    if task.feature_source.augmented:
        augmentation = (
            "; training augmentation off (training.cache_views=1)" if training.cache_views == 1
            else f"; {len(cached.train_loader.dataset.views)} augmented views"
        )
    accelerator.print(
        f"frozen-feature cache: the head trains on cached features (hits: {cached.hits or 'none'}; "
        f"computed: {cached.misses or 'none'}){augmentation}"
    )
    return cached


def prefer_channels_last(model: torch.nn.Module, device: torch.device) -> None:
    """CNNs on a GPU run faster with channels-last weights (cuDNN then picks NHWC kernels)."""
    if device.type == "cuda" and any(isinstance(m, torch.nn.Conv2d) for m in model.modules()):
        model.to(memory_format=torch.channels_last)


def run_training(recipe: Recipe, resume: str | None = None) -> dict[str, Any]:
    """Train as the recipe says and write the output folder; returns the final metrics record.

    `resume`: "latest" (the newest checkpoint in the output folder), or the path of a checkpoint
    or of an output folder, to continue a run that was stopped.
    """
    if recipe.task not in TASKS:
        raise HfTransferError(f"task '{recipe.task}' is not available; choose one of {sorted(TASKS)}.")
    output_dir = recipe.output_dir
    accelerator = Accelerator(
        mixed_precision=recipe.training.mixed_precision,
        gradient_accumulation_steps=recipe.training.gradient_accumulation_steps,
        # non_blocking: with pinned batches, copies to the GPU overlap the previous step instead of
        # waiting for it; seedable sampler: each epoch's order depends on (seed, epoch) only, so a
        # resumed epoch draws the same batches (see checkpoint.py)
        dataloader_config=DataLoaderConfiguration(
            non_blocking=True, use_seedable_sampler=True, data_seed=recipe.training.seed
        ),
    )
    resume_from = find_resume_checkpoint(resume, output_dir) if resume else None
    if accelerator.is_main_process:
        if resume_from is None:
            prepare_output_dir(output_dir, recipe.output.overwrite)
        output_dir.mkdir(parents=True, exist_ok=True)
        write_text(output_dir / "recipe.yaml", recipe.to_yaml())
        if resume_from is None:
            (output_dir / "log.jsonl").unlink(missing_ok=True)
    accelerator.wait_for_everyone()
    accelerator.print(f"recipe {recipe.name}:\n{recipe.to_yaml()}")
    if not hub_is_offline() and use_offline_mode_if_hub_unreachable():
        accelerator.print("The Hugging Face Hub is out of reach: using local files and packaged models only.")
    set_seed(recipe.training.seed)

    task = TASKS[recipe.task](recipe)
    epoch_hook = (task.apply_strategy or (lambda strategy: apply_strategy(task.model, strategy)))(recipe.strategy)
    trainable, total = count_parameters(task.model)
    accelerator.print(
        f"strategy {recipe.strategy.name}: {trainable:,} trainable of {total:,} parameters "
        f"({100 * trainable / total:.2f}%); seed {recipe.training.seed}; device {accelerator.device}; "
        f"precision {accelerator.mixed_precision}; processes {accelerator.num_processes}"
    )
    weights = class_weights(recipe.training.class_weights, task.train_labels, len(task.label_names))
    prefer_channels_last(task.model, accelerator.device)
    # with a target, domain adaptation trains its own head on both domains' frozen features (domain.py)
    adaptation = prepare_adaptation(recipe, task, accelerator) if recipe.adaptation.target_path else None
    cached = None if adaptation else feature_cache_training(recipe, task, accelerator)
    # with the cache, the head alone trains (its parameters are the full model's own head)
    model, train_loader, eval_loader = (
        (cached.model, cached.train_loader, cached.eval_loader) if cached
        else (task.model, task.train_loader, task.eval_loader)
    )
    if adaptation:
        model, train_loader, eval_loader = adaptation.model, adaptation.train_loader, adaptation.eval_loader
    checkpoints = None
    if recipe.training.save_checkpoints or resume_from is not None:
        checkpoints = Checkpointer(
            output_dir, accelerator, recipe.to_dict(), recipe.training.checkpoint_every_steps,
            recipe.output.save_total_limit, resume_from,
        )
    result: TrainResult = train(
        model, train_loader, eval_loader, recipe.training, accelerator,
        output_dir, task.label_names, cached.on_epoch_start if cached else epoch_hook, weights, checkpoints,
        # the target's labels report, never choose: adaptation keeps the last epoch
        auxiliary_loss=adaptation.auxiliary_loss if adaptation else None, select_best_epoch=adaptation is None,
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
        "epoch_train_seconds": [round(seconds, 3) for seconds in result.epoch_seconds],
        "history": result.history,
        "eval": result.best_metrics,
        "train_samples": len(task.train_labels),
        "num_processes": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,
        "resumed_from": str(resume_from) if resume_from else None,
        "feature_cache": {"hits": cached.hits, "computed": cached.misses} if cached else None,
        "adaptation": adaptation.report(accelerator) if adaptation else None,  # then "eval" is the target's
    }
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with staged(output_dir) as staging:
            if adaptation:
                adaptation.save(staging)
            else:
                task.save(accelerator.unwrap_model(task.model), staging)
        write_json(output_dir / "metrics.json", summary)
        accelerator.print(
            f"best epoch {result.best_epoch}: accuracy {result.best_metrics['accuracy']:.4f}, "
            f"macro F1 {result.best_metrics['f1_macro']:.4f}; saved to {output_dir}"
        )
        # the generic card describes a classifier of one domain that its own library loads
        if adaptation:
            from hf_transfer.adapted_model import write_adaptation_card

            write_adaptation_card(output_dir, summary)
        elif recipe.task == "multimodal":
            from hf_transfer.multimodal import write_two_tower_card

            write_two_tower_card(output_dir, recipe, summary)
        else:
            write_model_card(output_dir, recipe, summary)
    accelerator.end_training()
    if recipe.output.push_to_hub and accelerator.is_main_process:
        url = push_folder(output_dir, recipe.output.hub_repo_id, private=recipe.output.hub_private)
        print(f"pushed {output_dir} to {url}")
    return summary
