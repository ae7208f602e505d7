"""The model card of an output folder, and pushing the folder to the Hub.

The card is huggingface_hub's `ModelCard`, rendered from model_cards/model_card.md: metadata the Hub
reads (base_model, datasets, license, library_name, pipeline_tag, tags, and the evaluation as
model-index results), what was transferred and how, the scores, per-class results, and two
pictures written next to it. A push is one commit made with `HfApi.upload_folder`; the token is
found the usual huggingface_hub way (`hf auth login`, HF_TOKEN) and never printed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from hf_transfer.errors import HfTransferError
from hf_transfer.export import write_text
from hf_transfer.recipe import Recipe, check_repo_id, recipe_from_dict

CARD_TEMPLATE = Path(__file__).resolve().parent.parent / "model_cards" / "model_card.md"
TRAINING_CURVES_PNG = "training_curves.png"
CONFUSION_MATRIX_PNG = "confusion_matrix.png"
# never uploaded: resumable training state, caches, and anything half-written
PUSH_IGNORE = ["checkpoints/**", "feature_cache/**", ".staging/**", "*.tmp", "**/*.tmp"]
DEFAULT_PUSH_TIMEOUT = 60.0  # seconds without progress on one request; large files still upload

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


def _strategy_text(recipe: Recipe) -> str:
    s = recipe.strategy
    if s.name == "full":
        return "full fine-tuning: every backbone parameter trains with the new head"
    if s.name == "freeze_backbone":
        return "feature extraction: the backbone stays frozen, only the new head trains"
    if s.name == "partial":
        return f"partial fine-tuning: the top {s.trainable_blocks} backbone block(s) train with the new head"
    if s.name == "gradual_unfreeze":
        return (
            "gradual unfreezing: the head first, then one more backbone block, top down, "
            f"every {s.unfreeze_every} epoch(s)"
        )
    targets = ", ".join(s.lora.target_modules) if s.lora.target_modules else "the default attention projections"
    merged = "; a merged copy in merged/" if s.merge_lora else ""
    settings = f"r={s.lora.r}, alpha={s.lora.alpha}, dropout={s.lora.dropout}"
    return f"LoRA ({settings}) on {targets}; the new head trains fully{merged}"


def _head_text(recipe: Recipe, classes: int) -> str:
    if recipe.task == "text":
        return f"the model's own sequence-classification head, newly initialised for {classes} classes"
    head = recipe.head
    if head.type == "linear":
        return f"linear classifier on the pooled features, {classes} classes"
    shape = f"width {head.hidden_dim}, dropout {head.dropout}"
    return f"{head.type} head ({shape}) on the pooled features, {classes} classes"


def _usage(recipe: Recipe, reference: str, folder: Path, label_names: list[str]) -> str:
    lora = recipe.strategy.name == "lora"
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
            "from transformers import AutoModelForSequenceClassification, AutoTokenizer\n\n"
            f"labels = {label_names!r}\n"
            "base = AutoModelForSequenceClassification.from_pretrained(\n"
            f'    "{base}", num_labels=len(labels), id2label=dict(enumerate(labels)),\n'
            "    label2id={name: i for i, name in enumerate(labels)})\n"
            f'model = PeftModel.from_pretrained(base, "{reference}").eval()  # the adapter and the trained head\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{reference}")\n'
            'logits = model(**tokenizer(["I really enjoyed this."], return_tensors="pt")).logits\n'
            "print(labels[int(logits.argmax(-1))])"
        )
    head_info = folder / "hf_transfer.json"
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


def recipe_changes(recipe: Recipe) -> dict[str, Any]:
    """The recipe's values that differ from the defaults, nested as in the YAML file."""

    def differences(values: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
        changed = {}
        for key, value in values.items():
            if isinstance(value, dict) and isinstance(defaults.get(key), dict):
                nested = differences(value, defaults[key])
                if nested:
                    changed[key] = nested
            elif value != defaults.get(key):
                changed[key] = value
        return changed

    return differences(recipe.to_dict(), Recipe().to_dict())


def _number(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def card_data(recipe: Recipe, summary: dict[str, Any], repo_id: str | None):
    """The card's YAML metadata, with the evaluation as model-index results."""
    from huggingface_hub import EvalResult, ModelCardData

    pipeline_tag = "text-classification" if recipe.task == "text" else "image-classification"
    dataset = hub_id(recipe.data.path)
    dataset_name = dataset or Path(recipe.data.path or "data").name
    split = recipe.data.validation_split or "validation"
    scores = summary["eval"]
    results = [
        EvalResult(
            task_type=pipeline_tag, dataset_type=dataset or dataset_name, dataset_name=dataset_name,
            dataset_config=recipe.data.name, dataset_split=split, metric_type=metric, metric_name=label,
            metric_value=round(float(scores[key]), 4), metric_config=config,
        )
        for metric, label, key, config in (
            ("accuracy", "Accuracy", "accuracy", None),
            ("f1", "Macro F1", "f1_macro", "macro"),
        )
    ]
    library = "peft" if recipe.strategy.name == "lora" else ("transformers" if recipe.task == "text" else "timm")
    return ModelCardData(
        model_name=repo_id.split("/")[-1] if repo_id else recipe.name,
        base_model=base_model_id(recipe),
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
        + (f" (revision {recipe.model.revision})" if recipe.model.revision else ""),
        "strategy": _strategy_text(recipe),
        "trainable": f"{trainable:,} of {total:,} ({100 * trainable / max(total, 1):.2f}%)",
        "head": _head_text(recipe, len(labels)),
        "training": (
            f"{t.epochs} epochs, batch {t.batch_size} x {processes} process(es) x {t.gradient_accumulation_steps} "
            f"accumulation, {t.optimizer} lr {t.lr:g}, {t.scheduler} schedule (warmup {t.warmup_ratio:g}), "
            f"weight decay {t.weight_decay:g}, label smoothing {t.label_smoothing:g}"
        ),
        "data": (
            f"`{recipe.data.path}`: {summary.get('train_samples', '?')} training, "
            f"{scores['num_samples']} validation examples"
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
        "usage": _usage(recipe, repo_id or str(folder), folder, labels),
        "seed": summary.get("seed", t.seed),
        "num_processes": processes,
        "precision": summary.get("mixed_precision", t.mixed_precision or "no"),
        "recipe_yaml": yaml.safe_dump(recipe_changes(recipe), sort_keys=False),
    }


def write_model_card(output_dir: Path, recipe: Recipe, summary: dict[str, Any], repo_id: str | None = None) -> Path:
    """README.md (the model card) plus its two pictures, written into `output_dir`."""
    from huggingface_hub import ModelCard

    from hf_transfer.plots import (  # matplotlib: only when drawing
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
    path = output_dir / "README.md"
    write_text(path, str(card))
    return path


def has_generic_card(folder: Path, recipe: Recipe) -> bool:
    """Two-tower and domain-adapted runs write their own short cards (see run.py), kept as they are."""
    from hf_transfer.adapted_model import ADAPTATION_FILE

    return recipe.task != "multimodal" and not (folder / ADAPTATION_FILE).is_file()


def load_run(folder: Path) -> tuple[Recipe, dict[str, Any]] | None:
    """The recipe and metrics an hf_transfer run left in `folder`, or None for another kind of folder."""
    recipe_file, metrics_file = folder / "recipe.yaml", folder / "metrics.json"
    if not (recipe_file.is_file() and metrics_file.is_file()):
        return None
    return recipe_from_dict(yaml.safe_load(recipe_file.read_text())), json.loads(metrics_file.read_text())


# ---------------------------------------------------------------------------------------------
# Pushing


@contextmanager
def _request_timeout(seconds: float) -> Iterator[None]:
    """huggingface_hub's shared HTTP client waits forever by default; bound each request."""
    from huggingface_hub import get_session

    session = get_session()
    previous = session.timeout
    session.timeout = seconds
    try:
        yield
    finally:
        session.timeout = previous


def _check_folder(folder: Path) -> None:
    if not folder.is_dir():
        raise HfTransferError(f"{folder} is not a folder; give the output folder of a run.")
    if (folder / "recipe.yaml").is_file() and not (folder / "metrics.json").is_file():
        raise HfTransferError(
            f"{folder} holds no finished model yet (no metrics.json): finish the run "
            "(`hf-transfer train ... --resume` continues a stopped one), then push."
        )
    if not any(p.is_file() for p in folder.iterdir()):
        raise HfTransferError(f"{folder} is empty; nothing to push.")


def push_folder(
    folder: str | Path,
    repo_id: str,
    private: bool = False,
    endpoint: str | None = None,
    timeout: float = DEFAULT_PUSH_TIMEOUT,
) -> str:
    """Create `repo_id` if needed and upload `folder` to it in one commit; returns the commit URL.

    On failure the local folder stays complete, and the error says how to push it again.
    """
    from huggingface_hub import HfApi, constants, get_token

    folder = Path(folder)
    check_repo_id(repo_id)
    _check_folder(folder)
    again = f"The folder {folder} is complete; push it later with: hf-transfer push {folder} --repo-id {repo_id}"
    token = get_token()
    if not token:
        raise HfTransferError(
            f"No Hugging Face token found. Log in with `hf auth login` (or set HF_TOKEN) with a token that can "
            f"write to {repo_id}. {again}"
        )
    if constants.is_offline_mode():
        raise HfTransferError(
            "The Hub is in offline mode (HF_HUB_OFFLINE is set, or the Hub was out of reach when training "
            f"started). {again} once the Hub can be reached."
        )
    run = load_run(folder)
    if run is not None and has_generic_card(folder, run[0]):  # its "how to use" names the repository from now on
        write_model_card(folder, *run, repo_id=repo_id)
    api = HfApi(endpoint=endpoint, token=token)
    try:
        with _request_timeout(timeout):
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            commit = api.upload_folder(
                folder_path=folder, repo_id=repo_id, repo_type="model", ignore_patterns=PUSH_IGNORE,
                commit_message=f"Upload {run[0].name if run else folder.name} with hf_transfer",
            )
    except Exception as error:  # HTTP status, timeout, connection, invalid metadata: all end the same way
        reason = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
        raise HfTransferError(f"Pushing to {repo_id} failed ({reason.replace(token, '***')}). {again}") from None
    return commit.commit_url
