"""Two-tower sources: an image tower and a text tower whose pooled features a fusion head joins.

An image tower (any timm model, see vision.py) and a text tower (any transformers encoder, see
text.py) each map their input to pooled features; a fusion head joins the two:

- concat: both towers' features side by side into an MLP;
- gated:  a gated multimodal unit (Arevalo et al., 2017) that weighs the two towers per dimension.

The towers' own classifiers are not used: the fusion head replaces them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hf_transfer.recipe import HeadConfig, MultimodalConfig
from hf_transfer.sources.base import TransferModel
from hf_transfer.sources.heads import MLPHead
from hf_transfer.sources.pooling import pooled_features
from hf_transfer.sources.text import load_text_model, load_tokenizer
from hf_transfer.sources.vision import VisionClassifier, create_vision_model

TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids")


# ---------------------------------------------------------------------------------------------
# Fusion heads


class ConcatFusion(nn.Module):
    """Each tower's features layer-normalised (so neither drowns the other), concatenated, into an MLP."""

    def __init__(self, image_dim: int, text_dim: int, num_classes: int, hidden_dim: int, dropout: float):
        super().__init__()
        self.image_norm, self.text_norm = nn.LayerNorm(image_dim), nn.LayerNorm(text_dim)
        self.mlp = MLPHead(image_dim + text_dim, num_classes, hidden_dim, dropout)

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.mlp(torch.cat([self.image_norm(image), self.text_norm(text)], dim=-1))


class GatedFusion(nn.Module):
    """A gated multimodal unit: h = z * tanh(W_i x_i) + (1 - z) * tanh(W_t x_t), z = sigmoid(W_z [x_i; x_t]).

    The gate, computed from both towers, decides per dimension and per example how much each tower
    contributes; an MLP then classifies h.
    """

    def __init__(self, image_dim: int, text_dim: int, num_classes: int, hidden_dim: int, dropout: float):
        super().__init__()
        self.image_norm, self.text_norm = nn.LayerNorm(image_dim), nn.LayerNorm(text_dim)
        self.image_projection = nn.Linear(image_dim, hidden_dim)
        self.text_projection = nn.Linear(text_dim, hidden_dim)
        self.gate = nn.Linear(image_dim + text_dim, hidden_dim)
        self.mlp = MLPHead(hidden_dim, num_classes, hidden_dim, dropout)

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        image, text = self.image_norm(image), self.text_norm(text)
        gate = torch.sigmoid(self.gate(torch.cat([image, text], dim=-1)))
        mixed = gate * torch.tanh(self.image_projection(image)) + (1 - gate) * torch.tanh(self.text_projection(text))
        return self.mlp(mixed)


FUSIONS: dict[str, type[nn.Module]] = {"concat": ConcatFusion, "gated": GatedFusion}


def build_fusion(config: MultimodalConfig, image_dim: int, text_dim: int, num_classes: int) -> nn.Module:
    return FUSIONS[config.fusion](image_dim, text_dim, num_classes, config.hidden_dim, config.dropout)


# ---------------------------------------------------------------------------------------------
# The two-tower model


class TwoTowerClassifier(TransferModel):
    """Image tower + text tower + fusion head. Strategies apply per tower (tasks/multimodal.py)."""

    input_names = ("pixel_values", *TOKEN_KEYS)

    def __init__(self, image_tower: TransferModel, text_tower: TransferModel, fusion: nn.Module,
                 label_names: list[str], text_pooling: str):
        super().__init__()
        self.model = nn.ModuleDict({"image": image_tower, "text": text_tower, "fusion": fusion})
        self.label_names, self.text_pooling = label_names, text_pooling
        self.head_modules = ["fusion"]
        self.head_prefixes = ["model.fusion."]
        self.block_prefixes = []  # each tower keeps its own blocks; strategies apply tower by tower

    def tower_features(self, pixel_values: torch.Tensor, **text_inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        text_inputs = {k: v for k, v in text_inputs.items() if k in TOKEN_KEYS}
        image = self.model["image"].features(pixel_values=pixel_values)
        text = pooled_features(self.model["text"], self.text_pooling, **text_inputs)
        return image, text

    def forward(self, pixel_values: torch.Tensor, **text_inputs: torch.Tensor) -> torch.Tensor:
        return self.model["fusion"](*self.tower_features(pixel_values, **text_inputs))

    def features(self, pixel_values: torch.Tensor, **text_inputs: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.tower_features(pixel_values, **text_inputs), dim=-1)


def load_towers(config: MultimodalConfig, image_size: int | None) -> tuple[TransferModel, TransferModel, Any]:
    """(image tower, text tower, tokenizer), each tower without a classifier of its own to speak of."""
    # num_classes=0: timm's classifier becomes an identity, the tower a feature extractor
    image_model = create_vision_model(config.image_model, 0, image_size)
    image_tower = VisionClassifier(image_model, ["features"], HeadConfig())
    text_tower = load_text_model(config.text_model, ["unused_0", "unused_1"])
    return image_tower, text_tower, load_tokenizer(config.text_model)
