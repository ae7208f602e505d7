"""training.batch_size auto: the largest batch, at most training.max_batch_size, whose training step fits.

On a GPU, accelerate's `find_executable_batch_size` runs one training step (forward, loss,
backward and an optimiser step, so the optimiser's state counts too) on the first training batch
cut to each size, largest first, and on an out-of-memory error frees the cache and tries the next
smaller size. The first batch is the worst case: the text sampler puts its longest batch first,
and images and cached features all have one size. The model is put back afterwards (trial.py).

On a CPU there is no out-of-memory error worth going by: Linux hands out memory it does not have
and its OOM killer ends the process, or the machine swaps for hours, before any allocation fails.
So on a CPU auto takes the largest size at most `CPU_BATCH_SIZE` (the default batch_size), untried.

Either way the effective batch stays max_batch_size x gradient_accumulation_steps: the sizes
tried are divisors of max_batch_size (each the largest at most half the last one: plain halving
for a power of two), and accumulation grows by max_batch_size / batch size, exactly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import find_executable_batch_size
from accelerate.utils.memory import clear_device_cache

from hf_transfer.errors import HfTransferError
from hf_transfer.recipe import TrainingConfig
from hf_transfer.training.metrics import split_batch
from hf_transfer.training.optim import build_optimizer, set_train_mode
from hf_transfer.training.plan import Plan
from hf_transfer.training.trial import leaves_no_trace

CPU_BATCH_SIZE = 32  # the schema's default training.batch_size


@dataclass
class BatchChoice:
    """The batch size and accumulation a run trains with, and how they were found."""

    batch_size: int
    gradient_accumulation_steps: int
    max_batch_size: int
    how: str
    tried: list[int] = field(default_factory=list)

    def as_record(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size, "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "effective_batch_size": self.batch_size * self.gradient_accumulation_steps,
            "max_batch_size": self.max_batch_size, "how": self.how, "tried": self.tried,
        }


def smaller_batch(cap: int, batch: int) -> int:
    """The next size to try after `batch`: the largest divisor of `cap` at most half of it (0 after 1)."""
    return max((size for size in range(1, batch // 2 + 1) if cap % size == 0), default=0)


def probes_memory(device: torch.device) -> bool:
    """Whether running out of memory on `device` raises an error to retry after (not on a CPU: see above)."""
    return device.type != "cpu"


def start_batch(config: TrainingConfig, device: torch.device) -> int:
    """The first size auto tries on `device` (on a CPU, the one it takes)."""
    cap = config.max_batch_size
    if probes_memory(device):
        return cap
    return cap if cap <= CPU_BATCH_SIZE else max(s for s in range(1, CPU_BATCH_SIZE + 1) if cap % s == 0)


def choice(config: TrainingConfig, batch_size: int, how: str, tried: list[int] | None = None) -> BatchChoice:
    """`batch_size` with the accumulation that keeps max_batch_size x gradient_accumulation_steps."""
    accumulation = config.gradient_accumulation_steps * config.max_batch_size // batch_size
    return BatchChoice(batch_size, accumulation, config.max_batch_size, how, tried or [])


def _probe(plan: Plan, config: TrainingConfig, accelerator: Accelerator, tried: list[int]) -> int:
    """The largest size whose training step fits; the model as it was afterwards, the optimiser gone."""
    device, cap = accelerator.device, config.max_batch_size
    model = plan.model.to(device)
    loader = plan.train_loader_for(cap) if plan.train_loader_for else plan.train_loader
    with leaves_no_trace(model, device):
        first = next(iter(loader), None)  # starting a loader draws from the RNG: inside, so training draws the same
        if first is None:
            raise HfTransferError("training.batch_size auto: the training data gives no batch to try.")
        # the rate does not matter (the weights are put back); a tiny one keeps the step finite
        optimizer = build_optimizer(model, dataclasses.replace(config, lr=1e-7), include_frozen=False)
        set_train_mode(model)

        def training_step(batch_size: int) -> int:
            tried.append(batch_size)
            inputs, labels = split_batch({k: v[:batch_size].to(device) for k, v in first.items()})
            with accelerator.autocast():
                logits = model(**inputs)
            F.cross_entropy(logits.float(), labels).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return batch_size

        return find_executable_batch_size(
            training_step, starting_batch_size=cap, reduce_batch_size_fn=lambda: smaller_batch(cap, tried[-1])
        )()


def largest_fitting_batch(plan: Plan, config: TrainingConfig, accelerator: Accelerator) -> BatchChoice:
    """Try training steps from max_batch_size down until one fits, on every process; all take the smallest found."""
    tried: list[int] = []
    try:
        found = _probe(plan, config, accelerator, tried)
    except RuntimeError as error:
        if "No executable batch size found" not in str(error):
            raise
        found = 0  # said below, once every process knows: one that stopped alone would leave the rest waiting
    finally:
        clear_device_cache(garbage_collection=True)  # the probe's optimiser state and activations
    if accelerator.num_processes > 1:  # every process must step alike; each probed its own device
        found = int(accelerator.gather(torch.tensor([found], device=accelerator.device)).min())
    if found == 0:
        raise HfTransferError(
            f"training.batch_size auto: not even a batch of 1 fits in {accelerator.device} memory for one training "
            "step. Train fewer parameters (strategy freeze_backbone or lora), use training.mixed_precision bf16, "
            "or shorten data.max_length / data.image_size."
        )
    return choice(config, found, "the largest batch whose training step fit in memory", tried)


def settle_batch(plan: Plan, config: TrainingConfig, accelerator: Accelerator) -> BatchChoice:
    """training.batch_size auto on this plan and device: searched on a GPU, taken as it starts on a CPU."""
    if not probes_memory(accelerator.device):
        size = start_batch(config, accelerator.device)
        how = f"on a CPU, which has no out-of-memory error to go by: at most {CPU_BATCH_SIZE}, untried"
        return choice(config, size, how)
    return largest_fitting_batch(plan, config, accelerator)
