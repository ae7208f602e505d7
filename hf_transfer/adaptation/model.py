"""The output folder of a domain-adaptation run, and the model it loads back to.

The backbone is the unchanged, frozen source model, so the folder names it instead of copying it:

    adaptation.json              source model, task, adaptation settings, labels
    adaptation_head.safetensors  standardisation, bottleneck and classifier (the discriminator only trains)
    tca.safetensors              TCA's fitted map (method tca only)
    target_norm_statistics.safetensors  the backbone's BatchNorm statistics on the target (norm_statistics per_domain)
    README.md                    what was adapted to what, the target accuracy, how to load it

`load_adapted_model(folder)` rebuilds backbone + pooling + map + head as one module whose forward
takes the backbone's inputs (pixel values, or token ids from the source model's tokenizer).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from hf_transfer.adaptation.features import FeatureMap
from hf_transfer.adaptation.head import AdaptationHead, AdaptedHeadModel
from hf_transfer.adaptation.tca import TransferComponentAnalysis
from hf_transfer.errors import HfTransferError
from hf_transfer.export.layout import ADAPTATION_FILE, TARGET_NORMS_FILE, TCA_FILE
from hf_transfer.export.layout import ADAPTATION_HEAD_FILE as HEAD_WEIGHTS_FILE
from hf_transfer.recipe import AdaptationConfig, HeadConfig, ModelConfig, Recipe
from hf_transfer.sources.base import TransferModel
from hf_transfer.sources.pooling import pooled_features
from hf_transfer.sources.text import load_text_model
from hf_transfer.sources.vision import load_vision_model


def save_adapted_model(model: AdaptedHeadModel, feature_map: FeatureMap | None, recipe: Recipe, folder: Path,
                       target_norm_statistics: dict[str, torch.Tensor] | None = None) -> None:
    """The head's weights (not the discriminator's), TCA's map, the target's BatchNorm statistics, and what
    rebuilds the rest."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.model.state_dict().items()}
    save_file(state, str(folder / HEAD_WEIGHTS_FILE))
    if target_norm_statistics is not None:
        save_file(target_norm_statistics, str(folder / TARGET_NORMS_FILE))
    if feature_map is not None:
        arrays = {"samples": feature_map.tca.samples_, "components": feature_map.tca.components_,
                  "mean": feature_map.mean, "std": feature_map.std}
        # float64, as fitted: the map is a kernel product, and rounding it moves the head's input
        save_file({k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float64)) for k, v in arrays.items()},
                  str(folder / TCA_FILE))
    info = {
        "format": 1,
        "task": recipe.task,
        "source_model": dataclasses.asdict(recipe.model),
        "adaptation": dataclasses.asdict(recipe.adaptation),
        "in_features": model.model.bottleneck[0].in_features,
        "label_names": model.label_names,
        "tca": {"gamma": feature_map.tca.gamma_, "scale": feature_map.scale} if feature_map else None,
    }
    (folder / ADAPTATION_FILE).write_text(json.dumps(info, indent=2) + "\n")


class AdaptedClassifier(nn.Module):
    """Frozen backbone -> pooling -> (TCA map) -> adapted head: the backbone's inputs to logits."""

    def __init__(self, backbone: TransferModel, pooling: str, head: AdaptationHead,
                 feature_map: FeatureMap | None, label_names: list[str]):
        super().__init__()
        self.backbone, self.pooling, self.head = backbone, pooling, head
        self.feature_map, self.label_names = feature_map, label_names

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        features = pooled_features(self.backbone, self.pooling, **inputs)
        if self.feature_map is not None:
            features = self.feature_map(features.float().cpu()).to(features.device)
        return self.head(features)


# the saved `task` -> its source model, rebuilt as in training (offline copies included)
BACKBONES: dict[str, Callable[[ModelConfig, list[str]], TransferModel]] = {
    "text": load_text_model,
    "image": lambda config, label_names: load_vision_model(config, HeadConfig(), label_names),
}


def _load_feature_map(folder: Path, config: AdaptationConfig, tca_info: dict[str, Any]) -> FeatureMap:
    arrays = {k: v.numpy() for k, v in load_file(str(folder / TCA_FILE)).items()}
    tca = TransferComponentAnalysis(config.tca_components, config.tca_kernel, config.tca_mu)
    tca.samples_, tca.components_, tca.gamma_ = arrays["samples"], arrays["components"], tca_info["gamma"]
    return FeatureMap(tca, arrays["mean"], arrays["std"], tca_info["scale"])


def load_adapted_model(folder: str | Path) -> AdaptedClassifier:
    """The adapted model of a run's output folder, in eval mode (the source backbone is loaded by name)."""
    folder = Path(folder)
    if not (folder / ADAPTATION_FILE).is_file():
        raise HfTransferError(f"{folder} has no {ADAPTATION_FILE}; it is not the output folder of a domain-adaptation run.")
    info = json.loads((folder / ADAPTATION_FILE).read_text())
    config = AdaptationConfig(**info["adaptation"])
    labels = info["label_names"]
    head = AdaptationHead(info["in_features"], len(labels), config.bottleneck_dim, config.dropout)
    head.load_state_dict(load_file(str(folder / HEAD_WEIGHTS_FILE)))
    feature_map = _load_feature_map(folder, config, info["tca"]) if info["tca"] else None
    backbone = BACKBONES[info["task"]](ModelConfig(**info["source_model"]), labels)
    if (folder / TARGET_NORMS_FILE).is_file():  # the source model, normalising as on the target
        loaded = backbone.model.load_state_dict(load_file(str(folder / TARGET_NORMS_FILE)), strict=False)
        if loaded.unexpected_keys:
            raise HfTransferError(f"{folder / TARGET_NORMS_FILE} names layers that {info['source_model']['name']} lacks: "
                                  f"{loaded.unexpected_keys[:3]}; it was saved for another source model.")
    return AdaptedClassifier(backbone, config.features, head, feature_map, labels).eval()
