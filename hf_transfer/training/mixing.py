"""Mixup and CutMix of training batches (timm's `Mixup`), as a callback on each batch before its step.

timm mixes a batch with itself reversed: the pixels (a Beta(alpha, alpha) blend, or a pasted box) and
the one-hot labels by the same weight, so the loss reads soft targets (cross-entropy takes class
probabilities). Two choices of ours: timm needs an even batch, so an odd last batch keeps its last
example unmixed; and each batch's draw is seeded by (seed, epoch, batch, process), because timm draws
from numpy's global generator and a resumed run must mix its batches as the first run did.
"""

from __future__ import annotations

import numpy as np
import torch

from hf_transfer.recipe import AugmentConfig
from hf_transfer.training.plan import Callback
from hf_transfer.training.state import Loop


def mixing_requested(augment: AugmentConfig) -> bool:
    return bool(augment.mixup or augment.cutmix)


class BatchMixing(Callback):
    """Mixes every training batch's `input_name` tensor and labels (with probability augment.mix_prob)."""

    cuda_graphs_blocker = "mixup / cutmix draw their mixing on the CPU every step"
    mixes_inputs = True  # cached features cannot be mixed: the frozen-feature cache steps aside

    def __init__(self, augment: AugmentConfig, num_classes: int, seed: int, input_name: str = "pixel_values"):
        from timm.data import Mixup

        self.input_name, self.seed, self.num_classes = input_name, seed, num_classes
        self.mixup = Mixup(
            mixup_alpha=augment.mixup, cutmix_alpha=augment.cutmix, prob=augment.mix_prob,
            label_smoothing=0.0,  # the loop applies training.label_smoothing itself
            num_classes=num_classes,
        )

    def on_batch(self, loop: Loop, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        images, labels = batch[self.input_name], batch["labels"]
        even = len(labels) - len(labels) % 2
        if even == 0:
            return batch
        saved = np.random.get_state()
        # every batch its own draw (micro-batches of one accumulated step, and each process, too)
        np.random.seed([self.seed, loop.epoch, loop.state.batches_done, loop.accelerator.process_index])
        mixed, targets = self.mixup(images[:even].clone(), labels[:even])
        np.random.set_state(saved)
        if even < len(labels):  # the odd one out keeps its own image and a one-hot target
            last = torch.nn.functional.one_hot(labels[even:], self.num_classes).to(targets.dtype)
            mixed, targets = torch.cat([mixed, images[even:]]), torch.cat([targets, last])
        return {**batch, self.input_name: mixed, "labels": targets}
