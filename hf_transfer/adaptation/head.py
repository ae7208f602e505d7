"""The head a domain-adapted run trains on frozen features, and its domain discriminator.

    frozen backbone -> pooled features -> bottleneck -> classifier      (source labels)
                                              `-> domain loss           (source vs target, losses.py)
"""

from __future__ import annotations

import torch
from torch import nn

from hf_transfer.adaptation.losses import DomainDiscriminator, domain_method
from hf_transfer.recipe import AdaptationConfig
from hf_transfer.sources.base import TransferModel


class AdaptationHead(nn.Module):
    """Standardisation (source statistics), a bottleneck (the features the domain loss aligns), a classifier."""

    def __init__(self, in_features: int, num_classes: int, bottleneck_dim: int, dropout: float):
        super().__init__()
        self.register_buffer("feature_mean", torch.zeros(in_features))
        self.register_buffer("feature_std", torch.ones(in_features))
        self.bottleneck = nn.Sequential(nn.Linear(in_features, bottleneck_dim), nn.ReLU(), nn.Dropout(dropout))
        self.classifier = nn.Linear(bottleneck_dim, num_classes)

    def set_statistics(self, features: torch.Tensor) -> None:
        """Standardise with these features' statistics (the source's: the baseline must not see the target)."""
        self.feature_mean.copy_(features.mean(0))
        self.feature_std.copy_(features.std(0) + 1e-6)

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        return self.bottleneck((features - self.feature_mean) / self.feature_std)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(features))


def method_discriminator(config: AdaptationConfig, feature_dim: int, num_classes: int) -> DomainDiscriminator | None:
    """The discriminator the recipe's method trains on `feature_dim`-wide features, or None."""
    if config.method not in ("none", "tca") and domain_method(config.method).discriminator is not None:
        return domain_method(config.method).discriminator(feature_dim, num_classes, config.bottleneck_dim, config.dropout)
    return None


class AdaptedHeadModel(TransferModel):
    """The adapted head on frozen features, with the method's domain discriminator (dann, cdan) beside it while training."""

    input_names = ("features",)

    def __init__(self, in_features: int, label_names: list[str], config: AdaptationConfig):
        super().__init__()
        self.model = AdaptationHead(in_features, len(label_names), config.bottleneck_dim, config.dropout)
        self.discriminator = method_discriminator(config, config.bottleneck_dim, len(label_names))
        self.label_names = label_names
        self.head_modules = ["model"]
        self.head_prefixes = ["model.", "discriminator."]
        self.block_prefixes = []

    def forward(self, features: torch.Tensor, **_unused: torch.Tensor) -> torch.Tensor:
        return self.model(features)

    def features(self, features: torch.Tensor, **_unused: torch.Tensor) -> torch.Tensor:
        return features
