"""Labelling images with a saved image model: `hf-transfer predict OUTPUT_DIR IMAGE_OR_FOLDER ...`.

Loads what `hf-transfer train` wrote: a stock timm folder (linear head), the same layout with an
mlp/bottleneck head (rebuilt from hf_transfer.json), or a LoRA adapter on its source model.
Preprocessing is the eval transform of the saved model's own data config, as in validation.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from hf_transfer.errors import HfTransferError
from hf_transfer.recipe import HeadConfig, ModelConfig

logger = logging.getLogger(__name__)


@dataclass
class Prediction:
    path: str
    labels: list[str]  # best first
    probabilities: list[float]


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise HfTransferError(f"Cannot read {path}: {error}") from None


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
    """(model in eval mode, label names) from an output folder of an image run."""
    import timm

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise HfTransferError(
            f"{folder} is not a saved image model (no config.json); give the output folder of an image run."
        )
    config = _read_json(folder / "config.json")
    if "architecture" not in config:
        raise HfTransferError(f"{folder}/config.json is not a timm config (no 'architecture'); is it an image model?")
    label_names = _label_names(config)
    info_file = folder / "hf_transfer.json"
    info = _read_json(info_file) if info_file.is_file() else {}
    if (folder / "adapter_config.json").is_file():
        model = _load_lora(folder, info, label_names)
    elif info.get("head", {}).get("type", "linear") != "linear":
        model = _load_custom_head(folder, info)
    else:
        model = timm.create_model(f"local-dir:{folder}", pretrained=True)
    return model.eval(), label_names


def find_images(inputs: list[str]) -> list[Path]:
    """Image files named directly, and those inside named folders (recursively, sorted)."""
    from hf_transfer.data.images import IMAGE_EXTENSIONS

    found: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found.extend(sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS))
        elif item.is_file():
            found.append(item)
        else:
            raise HfTransferError(f"{item} does not exist.")
    if not found:
        raise HfTransferError(f"No images found in {', '.join(inputs)}.")
    return found


def _data_config(model: nn.Module) -> dict:
    from timm.data import resolve_data_config

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return resolve_data_config({}, model=base)


@torch.no_grad()
def predict_images(
    folder: str | Path, images: list[Path], top_k: int = 1, batch_size: int = 32
) -> Iterator[Prediction]:
    """Top-k labels and probabilities for each readable image; unreadable ones are logged and skipped."""
    from timm.data import create_transform

    from hf_transfer.data.images import load_rgb

    model, label_names = load_saved_model(folder)
    transform = create_transform(**_data_config(model))
    k = max(1, min(top_k, len(label_names)))
    for start in range(0, len(images), batch_size):
        paths, pixels = [], []
        for path in images[start:start + batch_size]:
            try:
                pixels.append(transform(load_rgb(path)))
                paths.append(path)
            except Exception as error:  # any decode failure: say which file, go on
                logger.warning("skipped %s: cannot decode it (%s)", path, type(error).__name__)
        if not pixels:
            continue
        probabilities = model(torch.stack(pixels)).float().softmax(dim=-1)
        top = probabilities.topk(k, dim=-1)
        for path, values, indices in zip(paths, top.values.tolist(), top.indices.tolist()):
            yield Prediction(str(path), [label_names[i] for i in indices], values)


def format_prediction(prediction: Prediction) -> str:
    """`path<TAB>label<TAB>probability`, one label/probability pair per top-k rank."""
    pairs = (f"{label}\t{p:.4f}" for label, p in zip(prediction.labels, prediction.probabilities))
    return "\t".join([prediction.path, *pairs])
