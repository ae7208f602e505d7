"""Task audio: a transformers speech encoder, mean-pooled over the real audio, with a new head.

With head.text_run, the head is a text run's head behind an adaptation layer fitted on the training
clips' transcripts (speech->text transfer, cache/projection.py): the same folder, another fit.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from datasets import Dataset

from hf_transfer.cache.head import FeatureSource
from hf_transfer.cache.projection import text_projection_fitter
from hf_transfer.cache.solver import HeadFitter
from hf_transfer.cache.store import dataset_fingerprint
from hf_transfer.data.audio import (
    audio_loader,
    extractor_window,
    load_audio_splits,
    with_features,
)
from hf_transfer.data.splits import column_values
from hf_transfer.export.layout import AUDIO_HEAD_FILE, HEAD_INFO_FILE
from hf_transfer.recipe import Recipe
from hf_transfer.sources.speech import (
    SpeechClassifier,
    load_feature_extractor,
    load_speech_model,
)
from hf_transfer.strategies import apply_strategy, merged_copy
from hf_transfer.tasks.text import require_mean_pooled_run, text_run_targets
from hf_transfer.training.plan import Plan


def save_speech_model(trained: SpeechClassifier, extractor: Any, folder: Path, recipe: Recipe) -> None:
    """The encoder as transformers saves it (LoRA folded in; config.json carries the label names), the
    feature extractor, the head's weights (head.safetensors) and hf_transfer.json (head, source, pooling).

    `AutoModel.from_pretrained(folder)` loads the encoder with the stock library; `hf-transfer predict`
    rebuilds the whole classifier (inference/loader.py).
    """
    from safetensors.torch import save_file

    model = merged_copy(trained.model)
    encoder = model.encoder
    encoder.config.id2label = dict(enumerate(trained.label_names))
    encoder.config.label2id = {name: i for i, name in enumerate(trained.label_names)}
    encoder.save_pretrained(folder)
    extractor.save_pretrained(folder)
    save_file({k: v.contiguous() for k, v in model.head.state_dict().items()}, str(folder / AUDIO_HEAD_FILE))
    info = {
        "format": 1, "task": "audio", "head": dataclasses.asdict(recipe.head), "pooling": "masked_mean",
        "source_model": dataclasses.asdict(recipe.model), "strategy": recipe.strategy.name,
        "label_names": list(trained.label_names), "input_name": trained.input_names[0],
        "text_run": recipe.head.text_run,  # the text model whose head, behind the adaptation layer, this head is
        # the encoder's own transformers class (WhisperEncoder has no Auto class): the loader imports it from here
        "encoder_module": type(encoder).__module__, "encoder_class": type(encoder).__name__,
    }
    (folder / HEAD_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")


def text_run_fitter(recipe: Recipe, train: Dataset, label_names: list[str]) -> HeadFitter | None:
    """With head.text_run: the adaptation layer's fit, to the text run's features of the training
    clips' transcripts (in the order the cache stores the clips' features)."""
    if recipe.head.text_run is None:
        return None
    transcripts = [str(text) for text in column_values(train, recipe.data.transcript_column)]
    return text_projection_fitter(text_run_targets(Path(recipe.head.text_run), transcripts, label_names))


def build_audio_task(recipe: Recipe) -> Plan:
    seed, training, data = recipe.training.seed, recipe.training, recipe.data
    extractor = load_feature_extractor(recipe.model)
    if recipe.head.text_run:  # before every audio file is decoded
        require_mean_pooled_run(Path(recipe.head.text_run))
    transcripts = [data.transcript_column] if recipe.head.text_run else []
    splits = load_audio_splits(data, seed, extractor.sampling_rate, extractor_window(extractor), transcripts)
    head_fit = text_run_fitter(recipe, splits.train, splits.label_names)
    model = load_speech_model(recipe.model, recipe.head, splits.label_names)
    callbacks = apply_strategy(model, recipe.strategy)
    # decoding and featurising run in the loader; workers pay off only with many files
    workers = training.num_workers if training.num_workers is not None else 0
    train_set = with_features(splits.train, extractor, data.audio_column)
    eval_set = with_features(splits.validation, extractor, data.audio_column)

    def feature_loader(split: str, _view: int | None):
        return audio_loader(train_set if split == "train" else eval_set, training.eval_batch_size, False, workers, seed)

    def train_loader(batch_size: int):
        return audio_loader(train_set, batch_size, True, workers, seed)

    return Plan(
        model=model,
        train_loader=train_loader(training.batch_size),
        train_loader_for=train_loader,
        eval_loader=audio_loader(eval_set, training.eval_batch_size, False, workers, seed),
        label_names=splits.label_names,
        train_labels=column_values(splits.train, "label"),
        save=lambda folder: save_speech_model(model, extractor, folder, recipe),
        callbacks=callbacks,
        summary=lambda _accelerator: {"audio_pooling": "masked_mean"},
        feature_source=FeatureSource(
            loader=feature_loader,
            fingerprint=lambda split: dataset_fingerprint(
                splits.train if split == "train" else splits.validation, file_column=data.audio_column
            ),
            preprocessing=f"feature extractor: {extractor.to_json_string()}",
            head_fit=head_fit,
        ),
    )
