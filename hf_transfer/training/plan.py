"""The one thing every mode hands to the loop: a `Plan`, and the `Callback`s that plug into it.

A plain task, the head on cached frozen features, domain adaptation and a two-tower model all
produce a Plan: the module to train, its loaders, the callbacks its mode needs (gradual
unfreezing, the cached view of each epoch, a domain loss, which epoch to keep), how to save what
was trained, and which model card describes it. The loop (loop.py) runs any Plan the same way.

A `Callback` is behaviour that plugs into the loop, in the spirit of transformers' TrainerCallback
but kept small: every method is optional, and the loop calls them in list order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader

if TYPE_CHECKING:  # annotations only
    from hf_transfer.sources.base import TransferModel
    from hf_transfer.training.state import Loop


class Callback:
    """Hooks into the training loop; override what you need.

    `unfreezes_parameters`: parameters frozen now may train later (the optimiser must hold them).
    `cuda_graphs_blocker`: why steps cannot be replayed as CUDA graphs while this callback runs.
    `mixes_inputs`: it changes the model's inputs, so the frozen-feature cache cannot serve the run.
    """

    unfreezes_parameters: bool = False
    cuda_graphs_blocker: str | None = None
    mixes_inputs: bool = False  # changes the model's inputs (mixup), which cached features cannot stand in for

    def on_train_setup(self, model: torch.nn.Module) -> None:
        """Once the plan's model is on its device, before the optimiser is built from its trainable parameters:
        a callback may change the model for training here (and give it back in on_train_end)."""

    def on_train_begin(self, loop: Loop) -> None:
        """Before the first epoch (a resumed run restores its state here)."""

    def on_epoch_begin(self, loop: Loop, epoch: int) -> None:
        """At the start of each epoch, before the model is put in train mode."""

    def on_batch(self, loop: Loop, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A training batch before its step: return it, changed or not (mixup blends inputs and labels)."""
        return batch

    def extra_loss(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor], progress: float) -> torch.Tensor | None:
        """A loss added to the task loss this step; `progress` is the share of training done, in [0, 1]."""
        return None

    def on_update(self, loop: Loop, end_of_epoch: bool) -> None:
        """After each optimiser step."""

    def on_log(self, loop: Loop, record: dict[str, Any]) -> None:
        """After each line of log.jsonl: a step's loss and learning rate, or an epoch's metrics."""

    def on_epoch_end(self, loop: Loop, metrics: dict[str, Any]) -> None:
        """After each epoch's evaluation; set `loop.stop` to end training."""

    def on_train_end(self, model: torch.nn.Module) -> None:
        """After training, the kept epoch's weights loaded into `model`; also when training failed, so that a callback
        which changed the model in on_train_setup gives it back."""

    def failure_note(self) -> str:
        """A sentence for the error a diverged run ends with (where to resume from, say)."""
        return ""


@dataclass
class Plan:
    """What a run trains, whatever its mode.

    `save(folder)` writes the trained model's files into `folder`; `card` names the model card's
    kind (export/card.py); `epoch_rule` which epoch the run keeps ("best" by
    training.metric_for_best, or "last" where the evaluation data must not choose, as a domain
    adaptation target); `summary(accelerator)` gives entries for metrics.json once training ends.
    `feature_source` is what the frozen-feature cache needs of a task (None: no cache).
    `trainer`, when set, trains the plan in place of the loop, with the loop's signature and result
    (a linear head on cached features fitted to convergence by a solver, cache/solver.py); the loop
    then never runs, so nothing of it (a learning rate, a batch size) is tuned.
    `train_loader_for(batch_size)` builds the training loader again at another batch size (as
    `train_loader`, whose batch size is training.batch_size): training.batch_size auto settles the
    batch size once the model is built (auto.py).
    """

    model: TransferModel
    train_loader: DataLoader
    eval_loader: DataLoader
    label_names: list[str]
    train_labels: list[int]
    save: Callable[[Path], None]
    card: str = "classifier"
    callbacks: list[Callback] = field(default_factory=list)
    epoch_rule: str = "best"
    summary: Callable[[Any], dict[str, Any]] = lambda _accelerator: {}
    feature_source: Any = None  # cache.FeatureSource; typed loosely because the cache stage comes later
    trainer: Callable[..., Any] | None = None
    # fine-tuning starts from pretrained weights with the head fitted on their features (cache/head_first.py): the
    # start training.weight_interpolation auto mixes back towards (a random backbone's is no start worth keeping)
    starts_from_probe: bool = False
    train_loader_for: Callable[[int], DataLoader] | None = None
