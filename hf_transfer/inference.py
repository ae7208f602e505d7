"""A finished run's model, loaded back for inference: text models here, image models via predict.py.

What a run wrote is enough to rebuild its model: the recipe (recipe.yaml), the label names
(metrics.json, or the model's own config), and the weights the library saved. Weights are read
from safetensors only; custom modelling code runs only when the run's recipe allowed it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from hf_transfer.errors import HfTransferError
from hf_transfer.recipe import Recipe, recipe_from_dict

TABLE_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".parquet")


def run_recipe(folder: Path) -> Recipe:
    """The recipe a run saved in its output folder."""
    path = folder / "recipe.yaml"
    if not path.is_file():
        raise HfTransferError(
            f"{folder} has no recipe.yaml: give the output folder of an hf-transfer run "
            "(image folders exported by timm also work with `predict`)."
        )
    values = yaml.safe_load(path.read_text())
    if not isinstance(values, dict):
        raise HfTransferError(f"{path} is not a recipe (a YAML mapping of sections).")
    return recipe_from_dict(values)


def run_label_names(folder: Path) -> list[str]:
    """Label names in id order: from metrics.json, else from the model's config.json."""
    metrics = folder / "metrics.json"
    if metrics.is_file():
        names = json.loads(metrics.read_text()).get("eval", {}).get("confusion_matrix", {}).get("labels")
        if names:
            return list(names)
    config = folder / "config.json"
    if config.is_file():
        id2label = json.loads(config.read_text()).get("id2label")
        if id2label:
            return [id2label[str(i)] for i in range(len(id2label))]
    raise HfTransferError(f"{folder} records no label names (no metrics.json or config.json with id2label).")


def check_command_can_load(folder: Path) -> None:
    """`evaluate` and `predict` serve text (transformers / peft) and image (timm) folders; two-tower and
    domain-adapted models are not one library's classifier and load in Python instead."""
    from hf_transfer.adapted_model import ADAPTATION_FILE
    from hf_transfer.multimodal import MULTIMODAL_FILE

    python_only = {
        MULTIMODAL_FILE: "a two-tower model; load it with hf_transfer.multimodal.load_two_tower(folder)",
        ADAPTATION_FILE: "a domain-adapted model; load it with hf_transfer.adapted_model.load_adapted_model(folder)",
    }
    for marker, what in python_only.items():
        if (folder / marker).is_file():
            raise HfTransferError(f"{folder} holds {what}; evaluate and predict do not serve it yet.")


def is_text_model(folder: Path) -> bool:
    """A run of task text, or a transformers classifier folder (timm folders have 'architecture')."""
    if (folder / "recipe.yaml").is_file():
        return run_recipe(folder).task == "text"
    config = folder / "config.json"
    return config.is_file() and "model_type" in json.loads(config.read_text())


class LogitsOf(nn.Module):
    """The logits of a transformers classifier, so it fits loops that expect `model(**batch) -> logits`."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        return self.model(**inputs).logits


@dataclass
class TextClassifierBundle:
    model: nn.Module  # in eval mode; model(**tokenized) -> logits
    tokenizer: Any
    label_names: list[str]
    recipe: Recipe


def load_text_classifier(folder: str | Path) -> TextClassifierBundle:
    """A text run's classifier: the saved transformers model, or the source model plus the LoRA adapter."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = Path(folder)
    recipe = run_recipe(folder)
    label_names = run_label_names(folder)
    trust = recipe.model.trust_remote_code
    if (folder / "adapter_config.json").is_file():
        from peft import PeftModel

        from hf_transfer.sources.text import load_text_model

        # the source model rebuilt as in training (offline copies included), then the adapter and head
        base = load_text_model(recipe.model, label_names).model
        model = PeftModel.from_pretrained(base, str(folder))
    elif (folder / "config.json").is_file():
        model = AutoModelForSequenceClassification.from_pretrained(
            folder, use_safetensors=True, trust_remote_code=trust
        )
    else:
        raise HfTransferError(
            f"{folder} holds no saved model (no config.json or adapter_config.json); did the run finish?"
        )
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust)
    return TextClassifierBundle(LogitsOf(model).eval(), tokenizer, label_names, recipe)


def read_texts(inputs: list[str], text_column: str) -> list[str]:
    """Each input is a file of texts (.txt: one per line; a table: its text column) or a text itself."""
    texts: list[str] = []
    for item in inputs:
        path = Path(item)
        if path.suffix == ".txt" and path.is_file():
            texts.extend(line for line in path.read_text().splitlines() if line.strip())
        elif path.suffix in TABLE_SUFFIXES and path.is_file():
            from datasets import load_dataset

            from hf_transfer.data.splits import FILE_BUILDERS, check_columns

            builder, kwargs = FILE_BUILDERS[path.suffix]
            table = load_dataset(builder, data_files=str(path), split="train", **kwargs)
            check_columns(table, [text_column], path.name)
            texts.extend(str(t) for t in table[text_column])
        elif path.suffix in (".txt", *TABLE_SUFFIXES) and not path.exists():
            raise HfTransferError(f"{item} does not exist.")
        else:
            texts.append(item)
    if not texts:
        raise HfTransferError("No texts to label: give texts, or .txt / csv / jsonl / parquet files of texts.")
    return texts


@torch.no_grad()
def predict_texts(
    folder: str | Path, inputs: list[str], top_k: int = 1, batch_size: int = 32, text_column: str | None = None
) -> Iterator[Any]:
    """Top-k labels and probabilities of each text (predict.Prediction, the text in place of a path)."""
    from hf_transfer.predict import Prediction

    bundle = load_text_classifier(folder)
    texts = read_texts(inputs, text_column or bundle.recipe.data.text_column)
    k = max(1, min(top_k, len(bundle.label_names)))
    max_length = bundle.recipe.data.max_length
    for start in range(0, len(texts), batch_size):
        chunk = texts[start:start + batch_size]
        encoded = bundle.tokenizer(chunk, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        probabilities = bundle.model(**encoded).float().softmax(dim=-1)
        top = probabilities.topk(k, dim=-1)
        for text, values, indices in zip(chunk, top.values.tolist(), top.indices.tolist()):
            # one line per text on output: tabs and newlines inside it would break the columns
            shown = " ".join(text.split())
            yield Prediction(shown, [bundle.label_names[i] for i in indices], values)
