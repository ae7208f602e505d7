"""One loader of a saved model: what `predict` and `evaluate` (and Python users) load back.

What a run wrote is enough to rebuild its model: the recipe (recipe.yaml), the label names
(metrics.json, or the model's own config), and the weights the library saved. Weights are read
from safetensors only; custom modelling code runs only when the run's recipe allowed it. The
folder's kind (export/layout.py) picks the loader from `LOADERS`; an optimised folder
(`hf-transfer optimize`) loads through inference/optimized.py.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

from torch import nn

from hf_transfer.errors import HfTransferError
from hf_transfer.export.layout import (
    ADAPTED,
    ADAPTER_CONFIG_FILE,
    AUDIO,
    AUDIO_HEAD_FILE,
    CONFIG_FILE,
    HEAD_INFO_FILE,
    IMAGE,
    OPTIMIZED,
    RECIPE_FILE,
    SENTENCE_MODULES_FILE,
    TEXT,
    TWO_TOWER,
    folder_kind,
)
from hf_transfer.inference.optimized import load_optimized
from hf_transfer.inference.saved import (
    LogitsOf,
    PixelLogits,
    SavedModel,
    read_json,
    run_label_names,
    run_recipe,
)
from hf_transfer.recipe import HeadConfig, ModelConfig
from hf_transfer.sources.base import prefer_channels_last
from hf_transfer.sources.folding import folded_if_same
from hf_transfer.tasks.text import load_mean_pooled

# ---------------------------------------------------------------------------------------------
# Text: transformers (or peft on the source model)


def _refuse_remote_code(folder: Path) -> None:
    config = folder / CONFIG_FILE
    if config.is_file() and "auto_map" in read_json(config):
        raise HfTransferError(
            f"{folder}'s config.json names modelling code of its own (auto_map), which would run on loading. "
            "Pass --trust-remote-code only if you trust where the folder came from."
        )


def load_text_classifier(folder: Path, trust_remote_code: bool = False) -> SavedModel:
    """A text run's classifier: the saved transformers model, or the source model plus the LoRA adapter.

    Custom modelling code runs only with `trust_remote_code` from the caller: the folder's own
    recipe.yaml, which came with the folder, cannot allow it.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    recipe = run_recipe(folder)
    label_names = run_label_names(folder)
    trust = trust_remote_code
    if not trust:
        _refuse_remote_code(folder)
    if (folder / SENTENCE_MODULES_FILE).is_file():
        model = load_mean_pooled(folder, trust)
    elif (folder / ADAPTER_CONFIG_FILE).is_file():
        from peft import PeftModel

        from hf_transfer.sources.text import load_text_model

        # the source model rebuilt as in training (offline copies included), then the adapter and head
        source = dataclasses.replace(recipe.model, trust_remote_code=trust)
        base = load_text_model(source, label_names).model
        model = PeftModel.from_pretrained(base, str(folder))
    elif (folder / CONFIG_FILE).is_file():
        model = AutoModelForSequenceClassification.from_pretrained(
            folder, use_safetensors=True, trust_remote_code=trust
        )
    else:
        raise HfTransferError(
            f"{folder} holds no saved model (no config.json or adapter_config.json); did the run finish?"
        )
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust)
    return SavedModel(LogitsOf(model).eval(), label_names, TEXT, recipe, tokenizer=tokenizer)


# ---------------------------------------------------------------------------------------------
# Images: a stock timm folder, the same with an mlp/bottleneck head, or a LoRA adapter


def _label_names(config: dict) -> list[str]:
    names = config.get("label_names")
    if isinstance(names, list):
        return [str(n) for n in names]
    if isinstance(names, dict):  # timm allows {id: name} when ids have gaps
        return [str(names.get(str(i), names.get(i, i))) for i in range(config["num_classes"])]
    return [str(i) for i in range(config["num_classes"])]


def _load_custom_head(folder: Path, info: dict) -> nn.Module:
    """timm rebuilds the architecture from config.json; the head comes from hf_transfer.json."""
    import timm
    from safetensors.torch import load_file

    from hf_transfer.sources.vision import attach_head

    model = timm.create_model(f"local-dir:{folder}", pretrained=False)
    attach_head(model, HeadConfig(**info["head"]))
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    return model


def _load_lora(folder: Path, info: dict, label_names: list[str]) -> nn.Module:
    """The source model rebuilt as in training, then peft's adapter (with the trained head) on it."""
    from peft import PeftModel

    from hf_transfer.sources.vision import load_vision_model

    source = ModelConfig(**info["source_model"])
    if not source.pretrained:
        raise HfTransferError(
            f"{folder} holds a LoRA adapter on a randomly initialised source model, which cannot be rebuilt; "
            "train with strategy.merge_lora true and predict with OUTPUT/merged."
        )
    base = load_vision_model(source, HeadConfig(**info["head"]), label_names, info.get("image_size"))
    return PeftModel.from_pretrained(base.model, str(folder))


def load_saved_model(folder: str | Path) -> tuple[nn.Module, list[str]]:
    """(timm model in eval mode, label names) from an output folder of an image run, or a timm export."""
    import timm

    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file():
        raise HfTransferError(
            f"{folder} is not a saved image model (no config.json); give the output folder of an image run."
        )
    config = read_json(folder / CONFIG_FILE)
    if "architecture" not in config:
        raise HfTransferError(f"{folder}/config.json is not a timm config (no 'architecture'); is it an image model?")
    label_names = _label_names(config)
    info_file = folder / HEAD_INFO_FILE
    info = read_json(info_file) if info_file.is_file() else {}
    if (folder / ADAPTER_CONFIG_FILE).is_file():
        model = _load_lora(folder, info, label_names)
    elif info.get("head", {}).get("type", "linear") != "linear":
        model = _load_custom_head(folder, info)
    else:
        model = timm.create_model(f"local-dir:{folder}", pretrained=True)
    return prefer_channels_last(model).eval(), label_names


def load_image_classifier(folder: Path, trust_remote_code: bool = False) -> SavedModel:  # timm runs no remote code
    from timm.data import create_transform, resolve_data_config

    model, label_names = load_saved_model(folder)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    transform = create_transform(**resolve_data_config({}, model=base))  # the model's own eval preprocessing
    recipe = run_recipe(folder) if (folder / RECIPE_FILE).is_file() else None
    return SavedModel(PixelLogits(model).eval(), label_names, IMAGE, recipe, transform=transform)


# ---------------------------------------------------------------------------------------------
# Audio: a transformers speech encoder, masked mean pooling, the head (task audio)


def load_audio_classifier(folder: Path, trust_remote_code: bool = False) -> SavedModel:
    """The encoder as transformers saved it (its own class, named in hf_transfer.json), the head's
    weights, and the feature extractor saved beside them."""
    import importlib

    from safetensors.torch import load_file
    from transformers import AutoFeatureExtractor

    from hf_transfer.sources.heads import build_head
    from hf_transfer.sources.speech import MeanPooledSpeech

    info = read_json(folder / HEAD_INFO_FILE) if (folder / HEAD_INFO_FILE).is_file() else {}
    module_name, class_name = info.get("encoder_module", ""), info.get("encoder_class", "")
    if not module_name.startswith("transformers.") or not (folder / AUDIO_HEAD_FILE).is_file():
        raise HfTransferError(f"{folder} is not the output of an audio run (no {HEAD_INFO_FILE} naming a transformers "
                              f"encoder, or no {AUDIO_HEAD_FILE}); did the run finish?")
    _refuse_remote_code(folder) if not trust_remote_code else None
    encoder = getattr(importlib.import_module(module_name), class_name).from_pretrained(folder, use_safetensors=True)
    label_names = [str(name) for name in info["label_names"]]
    hidden = int(getattr(encoder.config, "d_model", None) or encoder.config.hidden_size)
    model = MeanPooledSpeech(encoder, build_head(HeadConfig(**info["head"]), hidden, len(label_names)))
    model.head.load_state_dict(load_file(str(folder / AUDIO_HEAD_FILE)))
    extractor = AutoFeatureExtractor.from_pretrained(folder)
    recipe = run_recipe(folder) if (folder / RECIPE_FILE).is_file() else None
    return SavedModel(model.eval(), label_names, AUDIO, recipe, feature_extractor=extractor)


# ---------------------------------------------------------------------------------------------
# The registry


def _python_only(what: str) -> Callable[..., SavedModel]:
    def refuse(folder: Path, trust_remote_code: bool = False) -> SavedModel:
        raise HfTransferError(f"{folder} holds {what}; evaluate and predict do not serve it yet.")

    return refuse


LOADERS: dict[str, Callable[..., SavedModel]] = {
    TEXT: load_text_classifier,
    IMAGE: load_image_classifier,
    AUDIO: load_audio_classifier,
    # two towers and adapted heads are not one library's classifier: they load in Python instead
    TWO_TOWER: _python_only("a two-tower model; load it with hf_transfer.multimodal.load_two_tower(folder)"),
    ADAPTED: _python_only("a domain-adapted model; load it with hf_transfer.adapted_model.load_adapted_model(folder)"),
    OPTIMIZED: load_optimized,  # `hf-transfer optimize`'s folder: PyTorch (float or int8) or ONNX Runtime
}


def fold_for_inference(saved: SavedModel) -> SavedModel:
    """`saved` as predict and evaluate run it: an image model with each BatchNorm folded into the convolution before
    it (sources/folding.py) where that gives the same logits on a random image; any other model as it is. Not done
    by load_saved_run itself: `optimize` prunes channels by their BatchNorm scales."""
    if saved.kind != IMAGE or saved.transform is None:
        return saved
    import numpy as np
    import torch
    from PIL import Image

    noise = np.random.default_rng(0).integers(0, 256, size=(2, 256, 256, 3), dtype=np.uint8)
    probe = torch.stack([saved.transform(Image.fromarray(image)) for image in noise])
    device = next(saved.model.parameters(), torch.empty(0)).device  # an ONNX Runtime session holds none
    probe = probe.to(device).contiguous(memory_format=torch.channels_last)
    return dataclasses.replace(saved, model=folded_if_same(saved.model, "forward", {"pixel_values": probe}))


def load_saved_run(folder: str | Path, trust_remote_code: bool = False) -> SavedModel:
    """The model in `folder`, whatever its kind, ready for inference."""
    from safetensors import SafetensorError

    folder = Path(folder)
    if not folder.is_dir():
        raise HfTransferError(f"{folder} is not a folder; give the output folder of a run.")
    try:
        return LOADERS[folder_kind(folder)](folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, RuntimeError, SafetensorError, json.JSONDecodeError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise HfTransferError(
            f"Cannot load the model in {folder} ({type(error).__name__}: {first_line}); a file may be truncated "
            "or missing: train again, or restore the folder."
        ) from None
