"""Text source models: any transformers encoder with a sequence-classification head.

The model stays the library's own `AutoModelForSequenceClassification`, so the exported folder
loads with `transformers.pipeline` and peft's SEQ_CLS handling saves its head with the adapter.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedTokenizerBase,
)

from hf_transfer.errors import HfTransferError
from hf_transfer.recipe import ModelConfig
from hf_transfer.sources.base import TransferModel, blocks_from_layers
from hf_transfer.sources.offline import (
    hub_is_offline,
    offline_model_names,
    offline_text_model_dir,
    packaged_source,
)

logger = logging.getLogger(__name__)

def _layer_stack(model: nn.Module, num_layers: int) -> tuple[str, nn.ModuleList]:
    """The encoder's stack of transformer layers: the ModuleList as long as the config's layer count."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_layers:
            return name, module
    raise HfTransferError(
        f"Could not find the {num_layers} encoder layers of {type(model).__name__}; "
        "use strategy full, freeze_backbone or lora with this model."
    )


class TextClassifier(TransferModel):
    input_names = ("input_ids", "attention_mask", "token_type_ids")
    peft_task_type = "SEQ_CLS"  # peft then keeps the classifier trainable and saves it with the adapter

    def __init__(self, model: nn.Module, new_parameter_names: list[str], label_names: list[str]):
        super().__init__()
        self.model = model
        self.label_names = label_names
        # the new head: every module outside the encoder, plus encoder weights the checkpoint lacked
        self.head_modules = [
            name for name, child in model.named_children()
            if name != model.base_model_prefix and any(True for _ in child.parameters())
        ]
        self.head_prefixes = [f"model.{name}." for name in self.head_modules]
        self.head_prefixes += ["model." + n for n in new_parameter_names]
        stack_name, stack = _layer_stack(model, model.config.num_hidden_layers)
        backbone_names = [n for n, _ in self.named_parameters() if not self.is_head_parameter(n)]
        self.block_prefixes = blocks_from_layers(
            backbone_names, [f"model.{stack_name}.{i}." for i in range(len(stack))], input_side="embed"
        )
        self._classifier_input: torch.Tensor | None = None

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        inputs = {k: v for k, v in inputs.items() if k in self.input_names}
        return self.model(**inputs).logits

    def features(self, **inputs: torch.Tensor) -> torch.Tensor:
        """The classifier's input, caught with a hook so that it is right for any architecture."""
        classifier = self.model.get_submodule(_classifier_name(self.model))
        captured: list[torch.Tensor] = []
        handle = classifier.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
        try:
            self.forward(**inputs)
        finally:
            handle.remove()
        pooled = captured[0]
        return pooled[:, 0] if pooled.dim() == 3 else pooled


def _classifier_name(model: nn.Module) -> str:
    for name in ("classifier", "score", "classification_head"):
        if hasattr(model, name):
            return name
    raise HfTransferError(f"{type(model).__name__} has no classifier module named classifier/score.")


def resolve_text_source(name: str) -> str:
    """A local folder as it is; a Hub id, or its packaged offline copy when the Hub is out of reach."""
    if Path(name).is_dir():
        return name
    offline_dir = offline_text_model_dir(name)
    if offline_dir is not None and hub_is_offline():
        return str(offline_dir)
    return name


def _from_pretrained(loader, name: str, config: ModelConfig, **kwargs):
    source = resolve_text_source(name)
    common = dict(revision=config.revision, trust_remote_code=config.trust_remote_code)
    try:
        return loader(source, **common, **kwargs)
    except OSError as error:
        # no network or no such repository: fall back to a packaged copy if there is one
        offline_dir = offline_text_model_dir(name)
        if offline_dir is not None and source != str(offline_dir):
            return loader(str(offline_dir), **common, **kwargs)
        raise HfTransferError(
            f"Cannot load text model '{name}': {error.__class__.__name__}: {str(error).splitlines()[0]}. "
            f"Give a Hub id, a local model folder, or one of the offline copies: {', '.join(offline_model_names())}."
        ) from None


def load_tokenizer(config: ModelConfig) -> PreTrainedTokenizerBase:
    return _from_pretrained(AutoTokenizer.from_pretrained, config.name, config)


def load_text_model(config: ModelConfig, label_names: list[str]) -> TextClassifier:
    """The source encoder with a freshly initialised classifier for `label_names`."""
    labels = dict(
        num_labels=len(label_names),
        id2label=dict(enumerate(label_names)),
        label2id={name: i for i, name in enumerate(label_names)},
    )
    if not config.pretrained:
        from transformers import AutoConfig

        model_config = _from_pretrained(AutoConfig.from_pretrained, config.name, config, **labels)
        model = AutoModelForSequenceClassification.from_config(model_config)
        new: list[str] = []  # a random backbone still counts as the backbone
    else:
        model, info = _from_pretrained(
            AutoModelForSequenceClassification.from_pretrained,
            config.name,
            config,
            output_loading_info=True,
            ignore_mismatched_sizes=True,
            **labels,
        )
        new = sorted(set(info["missing_keys"]) | {k for k, *_ in info.get("mismatched_keys", [])})
    classifier = TextClassifier(model, new, label_names)
    classifier.weights_package = packaged_source(getattr(model, "name_or_path", None)) if config.pretrained else None
    return classifier


def usable_max_length(requested: int, model: TextClassifier, tokenizer: PreTrainedTokenizerBase) -> int:
    """`requested` (data.max_length), or the longest input the model has positions for, if shorter.

    Longer inputs would index past the position embeddings and fail in the middle of an epoch.
    """
    limits = [getattr(model.model.config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
    usable = min((int(n) for n in limits if isinstance(n, int) and 0 < n < 100_000), default=requested)
    if requested > usable:
        logger.warning("data.max_length %d is more than the model takes: texts are cut at %d tokens", requested, usable)
    return min(requested, usable)
