"""The short fine-tune that follows pruning (`--recovery-epochs N`): the project's training loop, on the
run's own training split, with the run's recipe (learning rate, schedule, batch size, seed, precision,
and for images the run's augmentation).

Every weight trains: the pruned model is a full model (LoRA was merged before pruning), so the run's
strategy (which named the source model's blocks) does not apply. The loop keeps its last epoch; the
log goes to a temporary folder, as the run's own folder is never written.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable
from pathlib import Path

from accelerate import Accelerator
from torch import nn

from hf_transfer.errors import HfTransferError
from hf_transfer.export.layout import IMAGE, TEXT
from hf_transfer.inference.saved import SavedModel
from hf_transfer.recipe import TrainingConfig
from hf_transfer.training.loop import train
from hf_transfer.training.plan import Plan
from hf_transfer.training.precision import resolve_mixed_precision


def _check_settled(saved: SavedModel) -> None:
    training = saved.recipe.training
    unsettled = [name for name in ("lr", "batch_size") if getattr(training, name) == "auto"]
    if unsettled:
        raise HfTransferError(
            f"--recovery-epochs: the run's recipe leaves training.{' and training.'.join(unsettled)} to auto; "
            "recovery reuses the recipe as it is, so set them in the run's recipe.yaml (metrics.json has what auto found)."
        )


def _text_plan(inner: nn.Module, saved: SavedModel, training: TrainingConfig) -> Plan:
    from hf_transfer.data.splits import column_values
    from hf_transfer.data.text import load_text_splits, text_loader, tokenize
    from hf_transfer.sources.text import TextClassifier

    recipe, tokenizer = saved.recipe, saved.tokenizer
    splits = load_text_splits(recipe.data, training.seed)

    def loader(dataset, shuffle: bool, batch_size: int):
        return text_loader(tokenize(dataset, tokenizer, recipe.data), tokenizer, batch_size, shuffle, 0, training.seed,
                           pad_to_multiple_of=recipe.data.pad_to_multiple_of)

    return Plan(
        model=TextClassifier(inner, [], saved.label_names), train_loader=loader(splits.train, True, training.batch_size),
        eval_loader=loader(splits.validation, False, training.eval_batch_size), label_names=saved.label_names,
        train_labels=column_values(splits.train, "label"), save=lambda _folder: None,
    )


def _image_plan(inner: nn.Module, saved: SavedModel, training: TrainingConfig) -> Plan:
    from hf_transfer.data.augmented import training_image_loader
    from hf_transfer.data.images import image_loader, image_transforms, load_image_splits, with_transform
    from hf_transfer.data.splits import column_values
    from hf_transfer.sources.vision import VisionClassifier, model_data_config

    data = saved.recipe.data
    splits, _ = load_image_splits(data, training.seed, workers=0)
    # the run's own augmentation for training, the model's eval transform for validation
    train_transform, eval_transform = image_transforms(model_data_config(inner, data.image_size), data.augment)
    return Plan(
        model=VisionClassifier(inner, saved.label_names, saved.recipe.head),
        train_loader=training_image_loader(splits.train, train_transform, data.image_column, training.batch_size, 0,
                                           training.seed),
        eval_loader=image_loader(with_transform(splits.validation, eval_transform, data.image_column),
                                 training.eval_batch_size, False, 0, training.seed),
        label_names=saved.label_names, train_labels=column_values(splits.train, "label"), save=lambda _folder: None,
    )


# the run's kind -> the plan that fine-tunes its pruned model on the run's own data
RECOVERY_PLANS: dict[str, Callable[[nn.Module, SavedModel, TrainingConfig], Plan]] = {TEXT: _text_plan, IMAGE: _image_plan}


def recover(inner: nn.Module, saved: SavedModel, epochs: int) -> dict:
    """Fine-tune the pruned `inner` model in place for `epochs` epochs; the last epoch's validation metrics."""
    _check_settled(saved)
    training = dataclasses.replace(saved.recipe.training, epochs=epochs)
    plan = RECOVERY_PLANS[saved.kind](inner, saved, training)
    for parameter in plan.model.parameters():
        parameter.requires_grad_(True)
    precision = resolve_mixed_precision(training.mixed_precision, trains_backbone=True, task=saved.kind)
    accelerator = Accelerator(mixed_precision=precision,
                              gradient_accumulation_steps=training.gradient_accumulation_steps)
    with tempfile.TemporaryDirectory(prefix="hf-transfer-recovery-") as log_dir:
        result = train(plan, training, accelerator, Path(log_dir))
    inner.cpu().eval()
    return {"epochs": epochs, "strategy": "full (every weight)", "last_epoch": result.history[-1] if result.history else {}}
