"""training.batch_size auto and training.lr auto, settled once before training into plain numbers.

The plan is built with `start_config` (a batch size auto reads as the size its search starts
from), then `tune` settles both on the built plan: the batch size first (batch_finder.py), since
the learning rate that suits a run depends on its batch, then the learning rate (lr_finder.py).
The loop, the scheduler and every callback get the tuned config and never see "auto"; the recipe
keeps "auto" (recipe.yaml), and metrics.json records what was found.

A plan with a trainer of its own (the solver that fits a linear head, cache/solver.py) never runs
the loop: it has no learning rate nor batches to tune, so auto is recorded as not used there.
A resumed run takes the numbers its checkpoint recorded, so it continues as the first run started.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from hf_transfer.console import say
from hf_transfer.errors import HfTransferError
from hf_transfer.recipe import TrainingConfig
from hf_transfer.training.batch_finder import choice, settle_batch, start_batch
from hf_transfer.training.lr_finder import RangeTest, lr_range_test
from hf_transfer.training.plan import Plan

SOLVER = "not used: the head is fitted by a solver on all its features at once, not trained in the loop"


@dataclass
class Tuning:
    plan: Plan  # its training loader at the batch size found
    config: TrainingConfig  # every key a number
    record: dict[str, Any]  # metrics.json's `batch_size_finder` and `lr_finder`; a checkpoint keeps it too


def start_config(config: TrainingConfig, device: torch.device, resumed: dict[str, Any] | None = None) -> TrainingConfig:
    """The config a plan is built with: batch size auto as the first size tried on `device`, or as a
    resumed run found it."""
    if config.batch_size != "auto":
        return config
    found = (resumed or {}).get("batch_size_finder")
    return dataclasses.replace(config, batch_size=found["batch_size"] if found else start_batch(config, device))


def _resumed(plan: Plan, config: TrainingConfig, accelerator: Accelerator, record: dict[str, Any]) -> Tuning:
    batch, lr = record.get("batch_size_finder"), record.get("lr_finder")
    if batch:
        config = dataclasses.replace(config, batch_size=batch["batch_size"],
                                     gradient_accumulation_steps=batch["gradient_accumulation_steps"])
    if config.lr == "auto":
        config = dataclasses.replace(config, lr=lr["lr"] if lr and lr["lr"] is not None else TrainingConfig.lr)
    say(accelerator, f"batch size / learning rate auto: as the resumed run found them (batch {config.batch_size} "
                     f"x {config.gradient_accumulation_steps} accumulation, lr {config.lr:g})")
    accelerator.gradient_accumulation_steps = config.gradient_accumulation_steps
    return Tuning(plan, config, record)


def _shared_range_test(plan: Plan, config: TrainingConfig, accelerator: Accelerator) -> RangeTest:
    """The range test on the main process, its result (or its error) shared: every process trains at one rate."""
    found: list[RangeTest | HfTransferError | None] = [None]
    if accelerator.is_main_process:
        try:
            found = [lr_range_test(plan, config, accelerator)]
        except HfTransferError as error:  # shared too, or the other processes would wait for a result forever
            found = [error]
    test = broadcast_object_list(found)[0]
    if isinstance(test, HfTransferError):
        raise test
    return test


def tune(plan: Plan, config: TrainingConfig, accelerator: Accelerator, resumed: dict[str, Any] | None = None) -> Tuning:
    """Settle training.batch_size and training.lr auto on the built plan (and the accelerator's accumulation).

    `config` is the recipe's, "auto" included; `resumed` the record a checkpoint kept (checkpoint.py).
    """
    if resumed and (resumed.get("batch_size_finder") or resumed.get("lr_finder")):
        return _resumed(plan, config, accelerator, resumed)
    record: dict[str, Any] = {"batch_size_finder": None, "lr_finder": None}
    if config.batch_size == "auto":
        start = start_batch(config, accelerator.device)
        batch = choice(config, start, SOLVER) if plan.trainer is not None else settle_batch(plan, config, accelerator)
        if batch.batch_size != start:
            if plan.train_loader_for is None:
                raise HfTransferError("training.batch_size auto needs a plan that can rebuild its training loader; "
                                      "this mode cannot: give training.batch_size a number.")
            plan = dataclasses.replace(plan, train_loader=plan.train_loader_for(batch.batch_size))
        config = dataclasses.replace(config, batch_size=batch.batch_size,
                                     gradient_accumulation_steps=batch.gradient_accumulation_steps)
        record["batch_size_finder"] = batch.as_record()
        say(accelerator, f"batch size auto: {batch.batch_size} x {batch.gradient_accumulation_steps} accumulation "
                         f"(effective batch {batch.batch_size * batch.gradient_accumulation_steps}; {batch.how}"
                         + (f"; tried {batch.tried}" if batch.tried else "") + ")")
    if config.lr == "auto" and plan.trainer is not None:
        # the solver reads no learning rate; the schema's default stands in, so the config holds numbers only
        config = dataclasses.replace(config, lr=TrainingConfig.lr)
        record["lr_finder"] = {"lr": None, "how": SOLVER}
        say(accelerator, f"learning rate auto: {SOLVER}")
    elif config.lr == "auto":
        test = _shared_range_test(plan, config, accelerator)
        config = dataclasses.replace(config, lr=test.lr)
        record["lr_finder"] = test.as_record()
        say(accelerator, f"learning rate auto: {test.lr:g} from a range test of {len(test.lrs)} steps "
                         f"({test.stopped}; {test.seconds:.1f} s); its curve is drawn in the output folder")
    accelerator.gradient_accumulation_steps = config.gradient_accumulation_steps
    return Tuning(plan, config, record)
