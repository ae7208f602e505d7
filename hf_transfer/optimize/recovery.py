"""The short fine-tune that follows pruning (`--recovery-epochs N`): the project's training loop, on the
run's own training split, with the run's recipe (learning rate, schedule, batch size, seed, precision).

Every weight trains: the pruned model is a full model (LoRA was merged before pruning), so the run's
strategy (which named the source model's blocks) does not apply. The loop keeps its last epoch; the
log goes to a temporary folder, as the run's own folder is never written.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

from accelerate import Accelerator
from torch import nn

from hf_transfer.errors import HfTransferError
from hf_transfer.inference.saved import SavedModel
from hf_transfer.training.loop import train
from hf_transfer.training.plan import Plan


def _check_settled(saved: SavedModel) -> None:
    training = saved.recipe.training
    unsettled = [name for name in ("lr", "batch_size") if getattr(training, name) == "auto"]
    if unsettled:
        raise HfTransferError(
            f"--recovery-epochs: the run's recipe leaves training.{' and training.'.join(unsettled)} to auto; "
            "recovery reuses the recipe as it is, so set them in the run's recipe.yaml (metrics.json has what auto found)."
        )


def recover(inner: nn.Module, saved: SavedModel, epochs: int) -> dict:
    """Fine-tune the pruned `inner` model in place for `epochs` epochs; the last epoch's validation metrics."""
    from hf_transfer.data.text import load_text_splits, text_loader, tokenize
    from hf_transfer.sources.text import TextClassifier

    _check_settled(saved)
    recipe, tokenizer = saved.recipe, saved.tokenizer
    training = dataclasses.replace(recipe.training, epochs=epochs)
    splits = load_text_splits(recipe.data, training.seed)

    def loader(dataset, shuffle: bool, batch_size: int):
        return text_loader(tokenize(dataset, tokenizer, recipe.data), tokenizer, batch_size, shuffle, 0, training.seed,
                           pad_to_multiple_of=recipe.data.pad_to_multiple_of)

    model = TextClassifier(inner, [], saved.label_names)
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    plan = Plan(
        model=model, train_loader=loader(splits.train, True, training.batch_size),
        eval_loader=loader(splits.validation, False, training.eval_batch_size), label_names=saved.label_names,
        train_labels=list(splits.train["label"]), save=lambda _folder: None,
    )
    accelerator = Accelerator(mixed_precision=training.mixed_precision,
                              gradient_accumulation_steps=training.gradient_accumulation_steps)
    with tempfile.TemporaryDirectory(prefix="hf-transfer-recovery-") as log_dir:
        result = train(plan, training, accelerator, Path(log_dir))
    inner.cpu().eval()
    return {"epochs": epochs, "strategy": "full (every weight)", "last_epoch": result.history[-1] if result.history else {}}
