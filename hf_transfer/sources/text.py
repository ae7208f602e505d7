"""Text source models: any transformers encoder with a sequence-classification head.

With `head.pooling` head_input the model stays the library's own `AutoModelForSequenceClassification`,
so the exported folder loads with `transformers.pipeline` and peft's SEQ_CLS handling saves its head
with the adapter. With mean pooling (what sentence encoders such as all-MiniLM-L6-v2 were trained to
give; their [CLS] pooler never trained) the model is the library's `AutoModel` encoder, the mean of
its token states and a linear layer, exported as a sentence-transformers folder (tasks/text.py).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.modeling_outputs import SequenceClassifierOutput

from hf_transfer.errors import HfTransferError
from hf_transfer.recipe import ModelConfig
from hf_transfer.sources.base import TransferModel, blocks_from_layers
from hf_transfer.sources.offline import (
    hub_is_offline,
    load_pretrained,
    offline_text_model_dir,
    packaged_source,
)
from hf_transfer.sources.pooling import masked_mean

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


class MeanPooledClassifier(nn.Module):
    """encoder -> mean of its last hidden states over the real tokens -> dropout -> linear: the logits.

    Shaped like a transformers classifier where the loops and peft look: `config` (peft reads the
    model type for its default LoRA targets), `base_model` (the encoder), an output with `.logits`.
    """

    base_model_prefix = "encoder"

    def __init__(self, encoder: PreTrainedModel, num_labels: int, dropout: float):
        super().__init__()
        # BERT's [CLS] pooler is unused here, and unused trainable weights break DDP: it is taken out
        # of the model (not registered) and put back only to save, so the stock library loads it cleanly
        self.__dict__["unused_pooler"] = getattr(encoder, "pooler", None)
        if self.unused_pooler is not None:
            encoder.pooler = None
        self.encoder = encoder
        self.config = encoder.config
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(encoder.config.hidden_size, num_labels)

    @property
    def base_model(self) -> PreTrainedModel:
        return self.encoder

    def save_encoder(self, folder: Path) -> None:
        """`save_pretrained` of the encoder, with its pooler's (untrained) weights as it had them."""
        if self.unused_pooler is not None:
            self.encoder.pooler = self.unused_pooler
        try:
            self.encoder.save_pretrained(folder)
        finally:
            if self.unused_pooler is not None:
                self.encoder.pooler = None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **inputs: torch.Tensor):
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **inputs).last_hidden_state
        return SequenceClassifierOutput(logits=self.classifier(self.dropout(masked_mean(states, attention_mask))))


class TextClassifier(TransferModel):
    input_names = ("input_ids", "attention_mask", "token_type_ids")

    def __init__(self, model: nn.Module, new_parameter_names: list[str], label_names: list[str]):
        super().__init__()
        self.model = model
        self.label_names = label_names
        # SEQ_CLS: peft keeps the library's classifier trainable and saves it with the adapter; the mean-pooled
        # model is not a transformers class, so its head goes into modules_to_save like a timm head
        self.peft_task_type = None if isinstance(model, MeanPooledClassifier) else "SEQ_CLS"
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

    @property
    def has_default_lora_targets(self) -> bool:
        from peft.utils import (
            TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS,
        )

        # lora_targets stays None here: peft picks the targets by model type, where it knows the type
        return self.model.config.model_type in PEFT_DEFAULTS

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
    if hub_is_offline():  # only then: online, a copy need not be installed, nor built
        offline_dir = offline_text_model_dir(name)
        if offline_dir is not None:
            return str(offline_dir)
    return name


def _from_pretrained(loader, name: str, config: ModelConfig, **kwargs):
    # no network or no such repository: falls back to a packaged copy if there is one
    return load_pretrained(loader, name, config, resolve_text_source, offline_text_model_dir, "text", **kwargs)


def load_tokenizer(config: ModelConfig) -> PreTrainedTokenizerBase:
    return _from_pretrained(AutoTokenizer.from_pretrained, config.name, config)


_POOLING_MODE_KEYS = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max"}


def sentence_transformers_pooling(config: ModelConfig) -> str | None:
    """How a sentence-transformers source pools its token states ("mean", "cls", ...), from its
    modules.json and pooling config; None for a source that is not a sentence-transformers model."""
    from transformers.utils import cached_file

    source = resolve_text_source(config.name)

    def read(filename: str) -> object:
        path = cached_file(
            source, filename, revision=config.revision, _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False, _raise_exceptions_for_gated_repo=False,
        )
        try:
            return json.loads(Path(path).read_text()) if path else None
        except (OSError, json.JSONDecodeError):
            return None

    modules = read("modules.json")
    pooling = next((m for m in modules or [] if isinstance(m, dict) and str(m.get("type", "")).endswith("Pooling")), None)
    settings = read(f"{pooling.get('path', '')}/config.json") if pooling else None
    return pooling_mode(settings) if isinstance(settings, dict) else None


def pooling_mode(settings: dict) -> str | None:
    """The mode a sentence-transformers pooling config names ("mean", "cls", ...), in either of its formats."""
    if isinstance(settings.get("pooling_mode"), str):  # sentence-transformers 6 writes one name
        return settings["pooling_mode"]
    return next((mode for key, mode in _POOLING_MODE_KEYS.items() if settings.get(key) is True), None)


def resolve_pooling(requested: str, config: ModelConfig) -> str:
    """head.pooling auto -> mean for a sentence-transformers source trained with mean pooling, else head_input."""
    if requested != "auto":
        return requested
    return "mean" if sentence_transformers_pooling(config) == "mean" else "head_input"


def _load_mean_pooled(config: ModelConfig, labels: dict, dropout: float) -> tuple[MeanPooledClassifier, list[str]]:
    if config.pretrained:
        encoder, info = _from_pretrained(AutoModel.from_pretrained, config.name, config, output_loading_info=True, **labels)
        new = sorted(info["missing_keys"])  # a checkpoint without some encoder weights: those count as new
    else:
        encoder = AutoModel.from_config(_from_pretrained(AutoConfig.from_pretrained, config.name, config, **labels))
        new = []
    # the encoder's own dropout rate, as transformers' classifiers put before their linear layer
    dropout = dropout or float(getattr(encoder.config, "hidden_dropout_prob", 0.0) or 0.0)
    model = MeanPooledClassifier(encoder, labels["num_labels"], dropout)
    return model, ["encoder." + name for name in new]


def load_text_model(config: ModelConfig, label_names: list[str], pooling: str = "head_input",
                    dropout: float = 0.0) -> TextClassifier:
    """The source encoder with a freshly initialised classifier for `label_names`, reading the
    features `pooling` names (head_input or mean; resolve auto with `resolve_pooling` first)."""
    labels = dict(
        num_labels=len(label_names),
        id2label=dict(enumerate(label_names)),
        label2id={name: i for i, name in enumerate(label_names)},
    )
    if pooling == "mean":
        model, new = _load_mean_pooled(config, labels, dropout)
        classifier = TextClassifier(model, new, label_names)
        classifier.weights_package = packaged_source(getattr(model.encoder, "name_or_path", None)) if config.pretrained else None
        return classifier
    if not config.pretrained:
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
