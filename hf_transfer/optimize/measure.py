"""What the optimised model is worth: accuracy on the run's own validation split, size, latency.

The validation split is rebuilt exactly as training built it (data/: the same files, the same
seeded stratified carve when the data had none, the same sample limits), then read with the saved
model's own preprocessing, as `hf-transfer evaluate` reads data. A seeded sample of the training
split, read the same way, scores pruning importance and calibrates static int8.
"""

from __future__ import annotations

import io
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader

from hf_transfer.errors import HfTransferError
from hf_transfer.export.layout import IMAGE, TEXT
from hf_transfer.inference.saved import SavedModel
from hf_transfer.training.metrics import split_batch


def _text_split(saved: SavedModel, split: str, batch_size: int, count: int | None) -> DataLoader:
    from hf_transfer.data.splits import seeded_sample
    from hf_transfer.data.text import load_text_splits, text_loader, tokenize

    recipe = saved.recipe
    splits = load_text_splits(recipe.data, recipe.training.seed)
    _same_labels(splits.label_names, saved.label_names)
    dataset = seeded_sample(getattr(splits, split), count, recipe.training.seed)
    return text_loader(tokenize(dataset, saved.tokenizer, recipe.data), saved.tokenizer, batch_size, False, 0,
                       recipe.training.seed, pad_to_multiple_of=recipe.data.pad_to_multiple_of)


def _image_split(saved: SavedModel, split: str, batch_size: int, count: int | None) -> DataLoader:
    from hf_transfer.data.images import image_loader, load_image_splits, with_transform
    from hf_transfer.data.splits import seeded_sample

    recipe = saved.recipe
    splits, _ = load_image_splits(recipe.data, recipe.training.seed, workers=0)
    _same_labels(splits.label_names, saved.label_names)
    dataset = seeded_sample(getattr(splits, split), count, recipe.training.seed)
    return image_loader(with_transform(dataset, saved.transform, recipe.data.image_column), batch_size, False, 0,
                        recipe.training.seed)


def _same_labels(data_labels: list[str], model_labels: list[str]) -> None:
    if list(data_labels) != list(model_labels):
        raise HfTransferError(
            f"The run's data now has the labels {data_labels}, its model {model_labels}: the data changed "
            "since training, so its validation split cannot be rebuilt; restore the data or train again."
        )


# the saved model's kind -> one of its splits ("train", "validation"; a seeded sample of `count` examples when
# given), as the run's recipe reads its data and preprocessed by the saved model as for evaluation
SPLIT_LOADERS: dict[str, Callable[[SavedModel, str, int, int | None], DataLoader]] = {
    TEXT: _text_split, IMAGE: _image_split,
}


def validation_batches(saved: SavedModel, batch_size: int = 32) -> list[dict[str, torch.Tensor]]:
    """The run's validation split as a list of batches (labels included), held so every model sees the same."""
    return list(SPLIT_LOADERS[saved.kind](saved, "validation", batch_size, None))


def training_sample(saved: SavedModel, count: int, batch_size: int = 16) -> list[dict[str, torch.Tensor]]:
    """`count` training examples (shuffled with the run's seed) as labelled batches, preprocessed as for
    evaluation: the data that scores pruning importance and calibrates static int8. Training data, so the
    accuracy then measured on the validation split is not flattered by having been tuned on it."""
    return list(SPLIT_LOADERS[saved.kind](saved, "train", batch_size, count))


@torch.no_grad()
def predicted_labels(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    return torch.cat([model(**split_batch(batch)[0]).argmax(-1) for batch in batches])


def accuracy(predictions: torch.Tensor, batches: list[dict[str, torch.Tensor]]) -> float:
    labels = torch.cat([batch["labels"] for batch in batches])
    return round(float((predictions == labels).float().mean()), 6)


def state_dict_bytes(model: nn.Module) -> int:
    """Bytes of the model's serialised state dict (int8 packed weights included), written to memory only."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


def repeated(batch: dict[str, torch.Tensor], size: int) -> dict[str, torch.Tensor]:
    """A batch of `size` rows made from the first row of `batch`: latency on a fixed, real input."""
    inputs, _ = split_batch(batch)
    return {name: tensor[:1].expand(size, *tensor.shape[1:]).contiguous() for name, tensor in inputs.items()}


@torch.no_grad()
def latency_ms(model: nn.Module, inputs: dict[str, torch.Tensor], runs: int = 10) -> float:
    """Median wall time of one forward pass in milliseconds, after two warm-up passes."""
    for _ in range(2):
        model(**inputs)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        model(**inputs)
        times.append(time.perf_counter() - start)
    return round(statistics.median(times) * 1000, 3)
