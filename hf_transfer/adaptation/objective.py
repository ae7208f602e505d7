"""The domain objective a domain-adaptation run adds to the task loss, as a callback of the shared loop."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from hf_transfer.adaptation.losses import DomainBatch, dann_weight, domain_loss, domain_method
from hf_transfer.recipe import AdaptationConfig
from hf_transfer.training.plan import Callback


def domain_loss_weight(config: AdaptationConfig) -> float:
    return config.weight if config.weight is not None else domain_method(config.method).default_weight


class DomainObjective(Callback):
    """The method's domain loss on a step's source and target batches, added to the task loss.

    `view(model, inputs)` gives the step's `DomainBatch` (the features the loss aligns, and the logits
    that cdan and mcc read): the frozen path's bottleneck (plan.py), or the backbone's own head input
    (backbone.py). Adversarial methods ramp their reversal weight up as DANN does.
    """

    cuda_graphs_blocker = "an auxiliary loss"  # its weight changes every step, which a recorded graph cannot follow

    def __init__(self, config: AdaptationConfig, view: Callable[[nn.Module, dict[str, torch.Tensor]], DomainBatch],
                 discriminator: nn.Module | None):
        self.config, self.view, self.discriminator = config, view, discriminator
        self.method = domain_method(config.method)

    def extra_loss(self, model: nn.Module, inputs: dict[str, torch.Tensor], progress: float) -> torch.Tensor:
        batch, weight = self.view(model, inputs), domain_loss_weight(self.config)
        if self.method.ramped:
            weight = dann_weight(progress, self.config.ramp_gamma, weight)
        return domain_loss(self.config.method, batch.source_features, batch.target_features, weight,
                           self.discriminator, batch.source_logits, batch.target_logits,
                           temperature=self.config.mcc_temperature)
