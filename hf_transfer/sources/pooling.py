"""Which backbone features a new head reads: the source's own head input, or mean-pooled token states.

`TransferModel.features` gives what the source's classifier reads (timm's pooled features, BERT's
pooler output of [CLS]). Sentence encoders such as all-MiniLM-L6-v2 were trained on the mean of
their last hidden states instead, and their [CLS] pooler is untrained; for them "mean" is the
feature their pretraining made meaningful.
"""

from __future__ import annotations

import torch
from torch import nn

from hf_transfer.errors import HfTransferError
from hf_transfer.sources.base import TransferModel

POOLINGS = ("head_input", "mean")


def text_encoder(model: TransferModel) -> nn.Module:
    """The transformers encoder inside a text TransferModel (under peft's wrapper, if any)."""
    library_model = model.model
    if hasattr(library_model, "get_base_model"):  # peft: the wrapped model, LoRA layers in place
        library_model = library_model.get_base_model()
    encoder = getattr(library_model, "base_model", None)
    if encoder is None or encoder is library_model:
        raise HfTransferError(f"{type(library_model).__name__} has no transformers encoder; mean pooling needs one.")
    return encoder


def mean_token_states(model: TransferModel, **inputs: torch.Tensor) -> torch.Tensor:
    """Mean of the encoder's last hidden states over the real (unpadded) tokens: (batch, hidden)."""
    if "attention_mask" not in inputs:
        raise HfTransferError("mean pooling needs text inputs with an attention_mask.")
    encoder_inputs = {k: v for k, v in inputs.items() if k in model.input_names}
    states = text_encoder(model)(**encoder_inputs).last_hidden_state
    return masked_mean(states, inputs["attention_mask"])


def masked_mean(states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(batch, tokens, hidden) -> (batch, hidden): the mean over the tokens the mask marks real."""
    mask = attention_mask.unsqueeze(-1).to(states.dtype)
    return (states * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def pooled_features(model: TransferModel, pooling: str, **inputs: torch.Tensor) -> torch.Tensor:
    if pooling == "head_input":
        return model.features(**inputs)
    if pooling == "mean":
        return mean_token_states(model, **inputs)
    raise HfTransferError(f"Unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}.")


class PooledFeatures(nn.Module):
    """A TransferModel seen through one pooling: `features(**inputs)` pools the chosen way.

    Shaped for `features.extract_features`, which calls `eval()` and `features()`.
    """

    def __init__(self, model: TransferModel, pooling: str):
        super().__init__()
        if pooling not in POOLINGS:
            raise HfTransferError(f"Unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}.")
        self.source, self.pooling = model, pooling

    def features(self, **inputs: torch.Tensor) -> torch.Tensor:
        return pooled_features(self.source, self.pooling, **inputs)
