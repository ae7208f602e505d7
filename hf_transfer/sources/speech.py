"""Speech source models: a transformers speech encoder, its states mean-pooled over the real audio, a new head.

The encoder is the library's own (`AutoModel`; for an encoder-decoder such as Whisper, its encoder):
Whisper, wav2vec2, HuBERT. Pooling is a masked mean over the frames that hold audio, not over the
padding: Whisper pads every clip to 30 s, and transformers' WhisperForAudioClassification averages
over that padding too, which drowns a 3 s clip in 27 s of silence. The pooled states are the
features the frozen-feature cache stores, and the head (linear, mlp, bottleneck) is the recipe's.

`openai/whisper-tiny.en` (and its aliases) resolves, when the Hub is out of reach, to the packaged
copy converted from CTranslate2's format (offline.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from hf_transfer.errors import HfTransferError
from hf_transfer.recipe import HeadConfig, ModelConfig
from hf_transfer.sources.base import TransferModel, blocks_from_layers
from hf_transfer.sources.heads import build_head
from hf_transfer.sources.offline import (
    hub_is_offline,
    load_pretrained,
    offline_speech_model_dir,
    packaged_source,
)
from hf_transfer.sources.pooling import masked_mean

ENCODER_INPUTS = ("input_features", "input_values")  # Whisper's log-mel frames; wav2vec2 / HuBERT's wave


def resolve_speech_source(name: str) -> str:
    """A local folder as it is; a Hub id, or its packaged offline copy when the Hub is out of reach."""
    if Path(name).is_dir():
        return name
    if hub_is_offline():
        offline_dir = offline_speech_model_dir(name)
        if offline_dir is not None:
            return str(offline_dir)
    return name


def _from_pretrained(loader, config: ModelConfig, **kwargs):
    return load_pretrained(loader, config.name, config, resolve_speech_source, offline_speech_model_dir, "speech",
                           **kwargs)


def load_feature_extractor(config: ModelConfig) -> Any:
    from transformers import AutoFeatureExtractor

    return _from_pretrained(AutoFeatureExtractor.from_pretrained, config)


def speech_encoder(model: nn.Module) -> nn.Module:
    """The encoder of a transformers speech model: itself, or an encoder-decoder's encoder (Whisper's)."""
    if getattr(model.config, "is_encoder_decoder", False):
        return model.get_encoder()
    return model


class MeanPooledSpeech(nn.Module):
    """encoder -> its last states averaged over the frames holding audio -> head: the logits."""

    def __init__(self, encoder: nn.Module, head: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.config = encoder.config  # peft reads the model type here
        self.head = head

    def pooled(self, attention_mask: torch.Tensor | None = None, **inputs: torch.Tensor) -> torch.Tensor:
        states = self.encoder(**inputs).last_hidden_state
        if attention_mask is None:
            return states.mean(1)
        return masked_mean(states, frame_mask(self.encoder, attention_mask, states.shape[1]))

    def forward(self, attention_mask: torch.Tensor | None = None, **inputs: torch.Tensor) -> torch.Tensor:
        return self.head(self.pooled(attention_mask, **inputs))


def frame_mask(encoder: nn.Module, attention_mask: torch.Tensor, frames: int) -> torch.Tensor:
    """The input's attention mask (per sample or per mel frame) brought to the encoder's output frames."""
    if hasattr(encoder, "_get_feature_vector_attention_mask"):  # wav2vec2 / HuBERT: their conv stack's own arithmetic
        return encoder._get_feature_vector_attention_mask(frames, attention_mask)
    # Whisper: its convolutions halve the mel frames (stride 2, padding 1), so frame j covers input frame 2j
    stride = max(1, attention_mask.shape[1] // frames)
    return attention_mask[:, ::stride][:, :frames]


class SpeechClassifier(TransferModel):
    head_modules = ["head"]
    head_prefixes = ["model.head."]
    lora_targets = ["q_proj", "v_proj"]  # the attention projections of Whisper, wav2vec2 and HuBERT alike

    def __init__(self, model: MeanPooledSpeech, label_names: list[str], input_name: str):
        super().__init__()
        self.model = model
        self.label_names = label_names
        self.input_names = (input_name, "attention_mask")
        layers = _encoder_layers(model.encoder)
        names = [n for n, _ in self.named_parameters() if not self.is_head_parameter(n)]
        self.block_prefixes = blocks_from_layers(names, [f"model.encoder.{layers}.{i}." for i in
                                                        range(len(model.encoder.get_submodule(layers)))], input_side="conv")

    def _inputs(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v for k, v in inputs.items() if k in self.input_names}

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        return self.model(**self._inputs(inputs))

    def features(self, **inputs: torch.Tensor) -> torch.Tensor:
        library_model = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        return library_model.pooled(**self._inputs(inputs))


def _encoder_layers(encoder: nn.Module) -> str:
    """Where the encoder keeps its stack of transformer layers (Whisper: layers; wav2vec2: encoder.layers)."""
    for name in ("layers", "encoder.layers"):
        try:
            if isinstance(encoder.get_submodule(name), nn.ModuleList):
                return name
        except AttributeError:
            continue
    raise HfTransferError(f"Could not find the layers of {type(encoder).__name__}; use strategy full, freeze_backbone or lora.")


def encoder_input_name(encoder: nn.Module) -> str:
    return "input_features" if getattr(encoder, "main_input_name", "") == "input_features" else "input_values"


def load_speech_model(config: ModelConfig, head: HeadConfig, label_names: list[str]) -> SpeechClassifier:
    """The source's speech encoder (pretrained, or random from its config) with a new head for `label_names`."""
    from transformers import AutoConfig, AutoModel

    if config.pretrained:
        library_model = _from_pretrained(AutoModel.from_pretrained, config)
    else:
        library_model = AutoModel.from_config(_from_pretrained(AutoConfig.from_pretrained, config))
    encoder = speech_encoder(library_model)
    hidden = int(getattr(encoder.config, "d_model", None) or encoder.config.hidden_size)
    model = MeanPooledSpeech(encoder, build_head(head, hidden, len(label_names)))
    classifier = SpeechClassifier(model, label_names, encoder_input_name(encoder))
    classifier.weights_package = packaged_source(getattr(library_model, "name_or_path", None)) if config.pretrained else None
    return classifier
