"""Loading an optimised folder (`hf-transfer optimize`): PyTorch (float or int8) or ONNX Runtime.

The folder holds optimized.json (what was done, how to rebuild the model), the run's recipe.yaml,
the float weights (model.safetensors: LoRA merged, pruned layers at their shrunken shapes), the
architecture's config and its preprocessing (tokenizer, or timm's pretrained_cfg), and model.onnx
when exported. int8 is not stored: dynamic quantisation is re-applied to the float weights on
loading (deterministic, and it keeps the folder to safetensors, with no pickles to unpickle).
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hf_transfer.errors import HfTransferError
from hf_transfer.export.layout import CONFIG_FILE, IMAGE, ONNX_FILE, OPTIMIZED_FILE, TEXT, WEIGHTS_FILE
from hf_transfer.inference.saved import LogitsOf, PixelLogits, SavedModel, read_json, run_recipe
from hf_transfer.sources.base import prefer_channels_last

OPTIONAL_INSTALL = "pip install 'hf-transfer-learning[optimize]'"
ONNX_RUNTIME, PYTORCH = "onnxruntime", "pytorch"


def require(module: str, purpose: str) -> None:
    """Refuse early, naming the install command, when an optional package of the optimize extra is missing."""
    if importlib.util.find_spec(module) is None:
        raise HfTransferError(f"{purpose} needs the optional package {module}: {OPTIONAL_INSTALL}")


def read_manifest(folder: Path) -> dict[str, Any]:
    manifest = read_json(folder / OPTIMIZED_FILE)
    if manifest.get("task") not in (TEXT, IMAGE) or manifest.get("architecture") not in ARCHITECTURES:
        raise HfTransferError(f"{folder / OPTIMIZED_FILE} is not an optimize manifest; run `hf-transfer optimize` again.")
    return manifest


# ---------------------------------------------------------------------------------------------
# Rebuilding the PyTorch model: the architecture from its config, then the saved (shrunken) shapes


def _transformers_classifier(folder: Path, manifest: dict, trust_remote_code: bool) -> nn.Module:
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    return AutoModelForSequenceClassification.from_config(config, trust_remote_code=trust_remote_code)


def _mean_pooled(folder: Path, manifest: dict, trust_remote_code: bool) -> nn.Module:
    from transformers import AutoConfig, AutoModel

    from hf_transfer.sources.text import MeanPooledClassifier

    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    encoder = AutoModel.from_config(config, trust_remote_code=trust_remote_code)
    return MeanPooledClassifier(encoder, len(manifest["label_names"]), dropout=0.0)


def _timm(folder: Path, manifest: dict, trust_remote_code: bool) -> nn.Module:
    import timm

    from hf_transfer.recipe import HeadConfig
    from hf_transfer.sources.vision import attach_head

    model = timm.create_model(f"local-dir:{folder}", pretrained=False)
    if manifest.get("head") and manifest["head"].get("type", "linear") != "linear":
        attach_head(model, HeadConfig(**manifest["head"]))
    return model


# manifest "architecture" -> how the float model is rebuilt before its weights are loaded
ARCHITECTURES: dict[str, Callable[[Path, dict, bool], nn.Module]] = {
    "transformers": _transformers_classifier,
    "mean_pooled": _mean_pooled,
    "timm": _timm,
}


def _resize_conv(module: nn.Module, weight: torch.Tensor) -> None:
    depthwise = module.groups > 1 and module.groups == module.in_channels == module.out_channels
    module.out_channels = weight.shape[0]
    module.groups = weight.shape[0] if depthwise else module.groups  # a depthwise conv stays depthwise
    module.in_channels = weight.shape[1] * module.groups


def _resize_linear(module: nn.Module, weight: torch.Tensor) -> None:
    module.out_features, module.in_features = weight.shape


def _resize_norm(module: nn.Module, weight: torch.Tensor) -> None:
    module.num_features = weight.shape[0]


# the layer types a pruned model may hold at a shrunken size -> the size fields their forward reads
RESIZERS: dict[type, Callable[[nn.Module, torch.Tensor], None]] = {
    nn.Linear: _resize_linear, nn.Conv2d: _resize_conv, nn.modules.batchnorm._BatchNorm: _resize_norm,
}


def resize_to_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Give every layer the shape its saved weights have: a pruned model is rebuilt at its original size
    from the config, then each shrunken layer gets tensors of the saved shapes (filled by load_state_dict)
    and its size fields. In place, so subclasses (timm's Conv2dSame, BatchNormAct2d) keep their type."""
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        own = {**dict(module.named_parameters(recurse=False)), **dict(module.named_buffers(recurse=False))}
        changed = {key for key, tensor in own.items()
                   if tensor is not None and prefix + key in weights and weights[prefix + key].shape != tensor.shape}
        if not changed:
            continue
        resize = next((fn for kind, fn in RESIZERS.items() if isinstance(module, kind)), None)
        if resize is None:
            raise HfTransferError(f"{name} ({type(module).__name__}) has a saved shape the loader cannot rebuild.")
        for key in changed:
            saved = weights[prefix + key]
            tensor = torch.empty(saved.shape, dtype=saved.dtype)
            setattr(module, key, nn.Parameter(tensor) if key in dict(module.named_parameters(recurse=False)) else tensor)
        resize(module, weights[prefix + "weight"])


def quantize_int8(model: nn.Module) -> nn.Module:
    """int8 dynamic quantisation of every nn.Linear (weights int8, activations quantised per batch), for CPU.

    torch.ao's eager API still works in torch 2.14 but warns that it moves to torchao; the warning is
    the library's, not the user's, so it is silenced here. Convolutions are untouched by it.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)


def load_pytorch_model(folder: Path, manifest: dict, trust_remote_code: bool = False) -> nn.Module:
    """The optimised model in PyTorch, in eval mode: float weights, re-quantised when the manifest says int8."""
    from safetensors.torch import load_file

    model = ARCHITECTURES[manifest["architecture"]](folder, manifest, trust_remote_code)
    weights = load_file(str(folder / WEIGHTS_FILE))
    resize_to_weights(model, weights)
    model.load_state_dict(weights)
    prefer_channels_last(model).eval()  # a CNN as fast as the run's own loaded model (load_saved_model)
    return quantize_int8(model) if manifest.get("quantize") == "int8" else model


class OnnxClassifier(nn.Module):
    """An ONNX Runtime session called like the loops call models: `model(**batch) -> logits` (a torch tensor)."""

    def __init__(self, path: Path, input_names: list[str]):
        super().__init__()
        require("onnxruntime", "Running the ONNX model")
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()  # the threads torch would use, not every core
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_names = input_names

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        feed = {name: inputs[name].detach().cpu().numpy() for name in self.input_names}
        return torch.from_numpy(self.session.run(None, feed)[0])


def image_transform(folder: Path) -> Callable:
    """The run's eval preprocessing, from the pretrained_cfg in the copied timm config.json."""
    from timm.data import create_transform, resolve_data_config

    config = read_json(folder / CONFIG_FILE)
    return create_transform(**resolve_data_config({}, pretrained_cfg=config.get("pretrained_cfg", {})))


def load_optimized(folder: Path, trust_remote_code: bool = False) -> SavedModel:
    """An optimised folder as `predict` and `evaluate` use it: ONNX Runtime when it holds model.onnx, else PyTorch."""
    manifest = read_manifest(folder)
    recipe, task = run_recipe(folder), manifest["task"]
    if manifest.get("serve") == ONNX_RUNTIME:
        model: nn.Module = OnnxClassifier(folder / ONNX_FILE, manifest["onnx"]["inputs"])
    else:
        inner = load_pytorch_model(folder, manifest, trust_remote_code)
        model = LogitsOf(inner) if task == TEXT else PixelLogits(inner)
    names = list(manifest["label_names"])
    if task == TEXT:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
        return SavedModel(model.eval(), names, TEXT, recipe, tokenizer=tokenizer)
    return SavedModel(model.eval(), names, IMAGE, recipe, transform=image_transform(folder))
