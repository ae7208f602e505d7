"""Building a recipe from nested dicts: every value checked against its field's type, unknown keys
named with the closest valid one, then each section's checks and the checks across sections."""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from typing import Any, Literal

from hf_transfer.errors import HfTransferError
from hf_transfer.recipe.schema import Recipe


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _type_error(key: str, value: Any, expected: Any) -> HfTransferError:
    return HfTransferError(f"Recipe key '{key}' got {value!r}, which is not {_describe(expected)}. Fix the value.")


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        return repr(choices[0]) if len(choices) == 1 else "one of " + ", ".join(repr(a) for a in choices)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp`, converting where YAML is loose (1 -> 1.0)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(key, value, option)
            except HfTransferError as error:
                if dataclasses.is_dataclass(option) and isinstance(value, dict):
                    raise error  # a section was meant: its own error says what is wrong inside it
                continue
        raise _type_error(key, value, tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool):  # YAML reads the words no/off and yes/on as booleans: `mixed_precision: no`
            value = next((word for word in (("no", "off") if not value else ("yes", "on")) if word in choices), value)
        if value in choices:
            return value
        raise _type_error(key, value, tp)
    if origin is list:
        if not isinstance(value, list):
            raise _type_error(key, value, tp)
        (item_type,) = typing.get_args(tp)
        return [_coerce(f"{key}[{i}]", item, item_type) for i, item in enumerate(value)]
    if tp is type(None):
        if value is None:
            return None
        raise _type_error(key, value, tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _type_error(key, value, tp)
        return _build(tp, value, prefix=f"{key}.")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # PyYAML reads 5e-5 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            raise _type_error(key, value, tp) from None
    if tp in (int, str, bool) and isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    if tp is float and isinstance(value, float):
        return value
    raise _type_error(key, value, tp)


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for name in _fields(cls):
        keys.append(prefix + name)
        if dataclasses.is_dataclass(hints[name]):
            keys.extend(_all_keys(hints[name], f"{prefix}{name}."))
    return keys


# names users bring from transformers' TrainingArguments and the example scripts, where spelling
# alone would suggest something else (learning_rate is closer to logging_steps than to lr)
KNOWN_ALIASES = {
    "learning_rate": "lr", "num_train_epochs": "epochs", "num_epochs": "epochs",
    "per_device_train_batch_size": "batch_size", "train_batch_size": "batch_size",
    "per_device_eval_batch_size": "eval_batch_size", "lr_scheduler_type": "scheduler",
    "lr_scheduler": "scheduler", "max_seq_length": "max_length", "model_name_or_path": "name",
    "gradient_accumulation": "gradient_accumulation_steps", "fp16": "mixed_precision", "bf16": "mixed_precision",
}


def unknown_key_error(key: str) -> HfTransferError:
    keys = _all_keys(Recipe)
    section, _, last = key.rpartition(".")
    alias = KNOWN_ALIASES.get(last)
    candidates = [k for k in keys if k.rsplit(".", 1)[-1] == alias] if alias else []
    close = sorted(candidates, key=lambda k: k.rpartition(".")[0] != section)[:1]  # same section first
    close = close or difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
    hint = f" Did you mean '{close[0]}'?" if close else " See the recipe reference in README.md."
    return HfTransferError(f"Unknown recipe key '{key}'.{hint}")


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    known = _fields(cls)
    kwargs = {}
    for name, value in values.items():
        if name not in known:
            raise unknown_key_error(prefix + str(name))
        kwargs[name] = _coerce(prefix + name, value, hints[name])
        bounds = known[name].metadata.get("range")
        if bounds is not None:
            bounds.check(prefix + name, kwargs[name])
    return cls(**kwargs)


def recipe_from_dict(values: dict[str, Any]) -> Recipe:
    recipe = _build(Recipe, values)
    validate(recipe)
    return recipe


def validate(recipe: Recipe) -> None:
    """Each section's own checks, then the checks that span sections."""
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*", recipe.name) or ".." in recipe.name:
        # the name becomes the output folder runs/<name>: it must stay a plain folder name
        raise HfTransferError(
            f"Recipe name {recipe.name!r} is not a plain name; use letters, digits, '-', '_' and '.' (no '/' or '..')."
        )
    for section in (recipe.data, recipe.training, recipe.output):
        section.check()
    validate_head(recipe)
    validate_text_run(recipe)
    validate_mixing(recipe)
    validate_head_first(recipe)
    validate_word_embeddings(recipe)
    validate_evaluated_weights(recipe)
    validate_adaptation(recipe)
    validate_auto_strategy(recipe)
    validate_auto_lr(recipe)


def validate_mixing(recipe: Recipe) -> None:
    augment = recipe.data.augment
    if (augment.mixup or augment.cutmix) and recipe.task != "image":
        raise HfTransferError(
            f"data.augment.mixup / cutmix blend images; task {recipe.task} has none: set them to 0."
        )
    if (augment.mixup or augment.cutmix) and recipe.adaptation.target_path:
        raise HfTransferError("Domain adaptation does not blend its batches (frozen features cannot be blended, and "
                              "blended labels would blur the predictions cdan and mcc read); set "
                              "data.augment.mixup and cutmix to 0.")
    if (augment.mixup or augment.cutmix) and recipe.training.cache_features is True:
        raise HfTransferError("data.augment.mixup / cutmix blend the images, so cached features cannot stand in for "
                              "them; set training.cache_features auto (or false), or mixup and cutmix to 0.")


def validate_head_first(recipe: Recipe) -> None:
    """strategy.head_first true where it cannot apply: refused before anything is written."""
    if recipe.strategy.head_first is not True:
        return
    reasons = {
        f"strategy {recipe.strategy.name} trains only the head": recipe.strategy.name == "freeze_backbone",
        "strategy lora wraps the head in an adapter": recipe.strategy.name == "lora",
        "strategy auto also runs freeze_backbone and lora, where it cannot apply (auto fits it first in the "
        "partial and full rungs)": recipe.strategy.name == "auto",
        f"head.type {recipe.head.type} is not one linear layer": recipe.head.type != "linear",
        "training.cache_features is false": recipe.training.cache_features is False,
        "domain adaptation builds its own plan (a head on frozen features, or the backbone in the loop)":
            bool(recipe.adaptation.target_path),
        "a two-tower model has no single head": recipe.task == "multimodal",
    }
    reason = next((reason for reason, applies in reasons.items() if applies), None)
    if reason:
        raise HfTransferError(f"strategy.head_first is true, but {reason}; set strategy.head_first auto or false.")


def validate_word_embeddings(recipe: Recipe) -> None:
    """strategy.freeze_word_embeddings where it cannot apply: refused before anything is written."""
    if not recipe.strategy.freeze_word_embeddings:
        return
    if recipe.task != "text":
        raise HfTransferError(f"strategy.freeze_word_embeddings keeps a text backbone's token embeddings frozen; task "
                              f"{recipe.task} has none: set it to false.")
    if recipe.strategy.name == "gradual_unfreeze":
        raise HfTransferError("strategy.freeze_word_embeddings does not combine with gradual_unfreeze, which unfreezes "
                              "the embedding block last; use full or partial, or set it to false.")


def validate_evaluated_weights(recipe: Recipe) -> None:
    """The weights each epoch is evaluated with: one rule at a time, and an interpolation only where the backbone moves."""
    training = recipe.training
    if training.weight_interpolation in (None, "auto"):  # auto steps aside for ema_decay and a frozen backbone
        return
    if training.ema_decay:
        raise HfTransferError("training.ema_decay and training.weight_interpolation each choose the weights every epoch "
                              "is evaluated and saved with; set training.weight_interpolation auto or null, or "
                              "training.ema_decay null.")
    if recipe.strategy.name == "freeze_backbone":
        raise HfTransferError("training.weight_interpolation mixes the fine-tuned backbone with the one training started "
                              "from, and strategy freeze_backbone never moves it; set it to auto or null, or a "
                              "strategy that trains the backbone (partial, full, lora, auto).")


def validate_head(recipe: Recipe) -> None:
    head = recipe.head
    if head.pooling == "mean" and recipe.task != "text":
        raise HfTransferError(
            f"head.pooling mean applies to text models; task {recipe.task} reads its source's pooled features: "
            "set head.pooling auto."
        )
    if head.pooling == "mean" and recipe.adaptation.target_path:
        raise HfTransferError("Domain adaptation pools as adaptation.features says; set head.pooling auto.")
    if recipe.task == "text" and head.type != "linear":
        raise HfTransferError(
            f"head.type {head.type} is for image models; a text model's head is linear (its library's own "
            "classifier, or the linear layer on mean-pooled states): set head.type linear."
        )
    if head.solver == "logistic" and head.type != "linear":
        raise HfTransferError(
            f"head.solver logistic fits a linear head; head.type is {head.type}: set head.solver loop or auto."
        )
    if head.solver == "logistic" and (recipe.strategy.name != "freeze_backbone" or recipe.training.cache_features is False
                                      or recipe.adaptation.target_path or recipe.task == "multimodal"):
        raise HfTransferError(
            "head.solver logistic fits a head on cached frozen features: it needs strategy freeze_backbone, "
            "training.cache_features auto or true, and no adaptation target or second tower; set head.solver auto."
        )
    if head.solver == "logistic" and recipe.training.ema_decay:
        raise HfTransferError(
            "training.ema_decay averages the weights of the training loop, which head.solver logistic does not run; "
            "set head.solver loop (or auto) or training.ema_decay null."
        )
    if head.solver == "logistic" and recipe.training.label_smoothing:
        raise HfTransferError(
            "head.solver logistic fits the plain cross-entropy; set training.label_smoothing 0 or head.solver loop."
        )


def validate_text_run(recipe: Recipe) -> None:
    """head.text_run (a text head reading projected speech) where it cannot apply: refused before anything runs."""
    if recipe.head.text_run is None:
        if recipe.data.transcript_column is not None and recipe.task == "audio":
            raise HfTransferError("data.transcript_column is read only with head.text_run (the text run whose head "
                                  "classifies the speech); set head.text_run, or remove data.transcript_column.")
        return
    reasons = {
        f"task {recipe.task} is not audio (set task: audio)": recipe.task != "audio",
        "data.transcript_column is not set (name the column holding what each clip says)":
            recipe.data.transcript_column is None,
        f"strategy {recipe.strategy.name} trains the speech encoder (set strategy.name freeze_backbone)":
            recipe.strategy.name != "freeze_backbone",
        f"head.type {recipe.head.type} is not linear (set head.type linear)": recipe.head.type != "linear",
        "head.solver is loop (set head.solver auto)": recipe.head.solver == "loop",
        "training.cache_features is false (set it to auto)": recipe.training.cache_features is False,
        "training.label_smoothing is set (set it to 0)": bool(recipe.training.label_smoothing),
        "training.ema_decay is set (set it to null)": bool(recipe.training.ema_decay),
    }
    reason = next((reason for reason, applies in reasons.items() if applies), None)
    if reason:
        raise HfTransferError(f"head.text_run fits an adaptation layer on cached frozen speech features, but {reason}.")


def validate_adaptation(recipe: Recipe) -> None:
    adaptation = recipe.adaptation
    if adaptation.method == "none" and not adaptation.target_path:
        return  # no adaptation; with a target, method none is the source-only baseline on it
    if not adaptation.target_path:
        raise HfTransferError(f"adaptation.method {adaptation.method} needs adaptation.target_path (the target data).")
    if recipe.task in ("multimodal", "audio"):
        raise HfTransferError(f"Domain adaptation serves task text or image, not {recipe.task}; set adaptation.method none.")
    if recipe.strategy.name == "auto":
        raise HfTransferError("Domain adaptation needs one strategy (strategy auto would choose it on the source alone); "
                              "set strategy.name freeze_backbone, or partial, full or lora to adapt the backbone too.")
    if recipe.training.lr == "auto" and recipe.strategy.name != "freeze_backbone" and adaptation.method != "none":
        raise HfTransferError(
            "training.lr auto runs its range test on source batches alone, without the target batches the domain loss "
            f"of adaptation.method {adaptation.method} reads when the backbone trains; set training.lr (and "
            "training.backbone_lr) to numbers."
        )
    if adaptation.method == "tca" and recipe.strategy.name != "freeze_backbone":
        raise HfTransferError(
            f"adaptation.method tca maps frozen features once, before training, but strategy {recipe.strategy.name} "
            "trains the backbone, which would change them; set strategy.name freeze_backbone, or use dann, cdan, mmd, "
            "coral or mcc."
        )
    if adaptation.norm_statistics == "per_domain" and recipe.strategy.norm_statistics == "frozen":
        raise HfTransferError(
            "adaptation.norm_statistics per_domain normalises each domain by its own BatchNorm statistics, but "
            "strategy.norm_statistics frozen keeps the pretrained ones; set one of them differently."
        )
    if adaptation.features == "mean" and recipe.task != "text":
        raise HfTransferError("adaptation.features mean applies to text models; use head_input for images.")
    if adaptation.tca_max_samples < 2 * adaptation.tca_components:
        raise HfTransferError("adaptation.tca_max_samples must be at least twice tca_components.")


def validate_auto_strategy(recipe: Recipe) -> None:
    """strategy auto (the ladder of strategies) and its time budget, where they cannot apply."""
    multimodal = recipe.multimodal
    towers = (multimodal.image_strategy, multimodal.text_strategy) if recipe.task == "multimodal" else ()
    if recipe.task == "multimodal" and "auto" in [recipe.strategy.name] + [t.name for t in towers if t is not None]:
        raise HfTransferError("strategy auto searches the strategies of one text or image model; for a two-tower "
                              "model set strategy.name (or multimodal.image_strategy / text_strategy) to one "
                              "strategy: freeze_backbone, lora, partial, full, ...")
    if recipe.strategy.name != "auto":
        if recipe.training.time_budget is not None:
            raise HfTransferError(f"training.time_budget bounds the search of strategy auto; strategy "
                                  f"{recipe.strategy.name} runs training.epochs. Set strategy.name auto or "
                                  "training.time_budget null.")
        return
    if recipe.training.cache_features is True:
        raise HfTransferError("training.cache_features true is an error wherever the cache cannot serve a run, and "
                              "strategy auto's lora, partial and full rungs train the backbone; set it auto (the "
                              "frozen rung uses the cache wherever it can) or false.")
    if "auto" in (recipe.training.lr, recipe.training.batch_size):
        raise HfTransferError("strategy auto does not combine with training.lr or training.batch_size auto yet (each "
                              "rung would need its own range test); give them numbers, or name one strategy.")
    if recipe.training.report_to:
        raise HfTransferError("strategy auto trains several rungs, whose steps a tracker would mix up; set "
                              "training.report_to null (each rung's log is OUTPUT/ladder/<strategy>/log.jsonl), "
                              "or train the winner by name with report_to.")


def validate_auto_lr(recipe: Recipe) -> None:
    """training.lr auto finds the rate of the parameters without one of their own: there must be some."""
    training = recipe.training
    if training.lr == "auto" and training.head_lr is not None and training.backbone_lr is not None:
        raise HfTransferError(
            "training.lr is auto, but head_lr and backbone_lr are both set, so no parameter trains at training.lr "
            "and the range test has nothing to find. Set head_lr or backbone_lr null (that part then trains at the "
            "lr found), or give training.lr a number."
        )
