"""Which source models `hf-transfer rank` compares, checked before anything is loaded or computed.

A candidate's modality is told from its name alone where the name says it (a timm name or prefix,
a packaged offline copy, a local folder's or the Hub cache's config.json); a name that says nothing
(a Hub id never downloaded) is taken to be of the recipe's modality, and if it is not, it fails to
load and is reported in the ranking like any other candidate that cannot load.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

from hf_transfer.errors import HfTransferError
from hf_transfer.recipe import DataConfig, Recipe, TrainingConfig, validate
from hf_transfer.sources.offline import OFFLINE_TEXT_MODELS, OFFLINE_VISION_MODELS

# the tasks rank serves: one source model each, whose modality is the task's name
RANKED_TASKS = ("text", "image")
TIMM_PREFIXES = ("hf-hub:", "hf_hub:", "local-dir:", "timm/")
DESCRIBED = {"text": "a transformers text model", "image": "a timm image model"}


def _config_modality(config_file: Path) -> str | None:
    """timm's exports write `architecture`; transformers' configs `model_type` (and `architectures`)."""
    try:
        config = json.loads(Path(config_file).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None  # unreadable: loading it will say what is wrong
    if not isinstance(config, dict):
        return None
    if "architecture" in config:  # transformers' own timm wrapper configs carry it too: still timm
        return "image"
    return "text" if "model_type" in config else None


def _local_folder(name: str) -> str | None:
    folder = Path(name.removeprefix("local-dir:"))
    return _config_modality(folder / "config.json") if folder.is_dir() else None


def _timm_prefix(name: str) -> str | None:
    return "image" if name.startswith(TIMM_PREFIXES) else None


def _packaged(name: str) -> str | None:
    return "text" if name in OFFLINE_TEXT_MODELS else "image" if name in OFFLINE_VISION_MODELS else None


def _timm_architecture(name: str) -> str | None:
    from timm.models import is_model  # knows pretrained tags: resnet50.tv_in1k

    return "image" if "/" not in name and is_model(name) else None


def _hub_cache(name: str) -> str | None:
    """The config.json of a Hub id downloaded before (no network)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        path = try_to_load_from_cache(name, "config.json")
    except Exception:  # not a valid repository id: nothing cached under it
        return None
    return _config_modality(Path(path)) if isinstance(path, str) else None


# tried in order; the first that knows answers
MODALITY_RULES: tuple[Callable[[str], str | None], ...] = (
    _local_folder, _timm_prefix, _packaged, _timm_architecture, _hub_cache,
)


def model_modality(name: str) -> str | None:
    """"text", "image", or None when the name alone does not tell."""
    return next((modality for rule in MODALITY_RULES if (modality := rule(name)) is not None), None)


def candidate_names(recipe: Recipe, requested: list[str] | None = None) -> list[str]:
    """The candidates to rank (`requested`, else the recipe's rank.candidates), each once, in order.

    Refuses a task rank does not serve, an adaptation recipe, an empty list, and candidates of another
    modality than the recipe's task: all before anything is loaded.
    """
    if recipe.task not in RANKED_TASKS:
        raise HfTransferError(
            f"rank compares single source models of task {' or '.join(RANKED_TASKS)}; this recipe's task is "
            f"{recipe.task}. Rank each tower with a text or image recipe on the same data."
        )
    if recipe.adaptation.target_path:
        raise HfTransferError(
            "rank scores source models on the labelled data; this recipe adapts to a target. Rank on the source "
            "data with --set adaptation.target_path=null adaptation.method=none."
        )
    names = list(dict.fromkeys(requested or recipe.rank.candidates))
    if not names:
        raise HfTransferError(
            "No candidates to rank: name them with --candidates A B ... or the recipe key rank.candidates."
        )
    if any(not name.strip() for name in names):
        raise HfTransferError("A candidate name is empty; give Hub ids, local folders or timm names.")
    wrong = [(name, modality) for name in names if (modality := model_modality(name)) not in (None, recipe.task)]
    if wrong:
        listed = "; ".join(f"{name} is {DESCRIBED[modality]}" for name, modality in wrong)
        raise HfTransferError(
            f"The recipe's task is {recipe.task}, so every candidate must be {DESCRIBED[recipe.task]}: {listed}. "
            f"Remove {'it' if len(wrong) == 1 else 'them'}, or rank {'it' if len(wrong) == 1 else 'them'} "
            "with a recipe of that task."
        )
    return names


def scored_data(recipe: Recipe) -> DataConfig:
    """The data rank scores: the training split sampled down to rank.max_train_examples (data.max_train_samples's
    seeded sample), unless the recipe already samples fewer."""
    data, limit = recipe.data, recipe.rank.max_train_examples
    if limit is None or (data.max_train_samples is not None and data.max_train_samples <= limit):
        return data
    return dataclasses.replace(data, max_train_samples=limit)


def candidate_recipe(recipe: Recipe, name: str, output_dir: Path) -> Recipe:
    """The recipe with `name` as its source model, a frozen backbone, and the rank folder as output
    (so the feature cache lands in it, unless training.feature_cache_dir says otherwise)."""
    model = recipe.model
    if name != model.name:  # a revision or weights file belongs to the recipe's own model, not another one
        model = dataclasses.replace(model, name=name, revision=None, weights_file=None)
    # rank never trains: a batch_size auto needs only a number for the training loader nobody reads, and
    # the settings of a fine-tuning run (its head fitted first, the search's budget) do not apply to a frozen one
    training = dataclasses.replace(recipe.training, time_budget=None)
    if training.batch_size == "auto":
        training = dataclasses.replace(training, batch_size=TrainingConfig.batch_size)
    candidate = dataclasses.replace(
        recipe, model=model, strategy=dataclasses.replace(recipe.strategy, name="freeze_backbone", head_first=False),
        output=dataclasses.replace(recipe.output, dir=str(output_dir)), training=training, data=scored_data(recipe),
    )
    validate(candidate)
    return candidate
