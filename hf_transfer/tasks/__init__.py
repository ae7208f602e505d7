"""Tasks: the registry from a recipe's `task` to the builder of its Plan.

A builder reads the recipe's data, loads its source model with the new head, applies the recipe's
strategy (a two-tower model applies one per tower) and returns the Plan the loop trains. A new
modality is one builder here and one source in sources/.
"""

from __future__ import annotations

from collections.abc import Callable

from hf_transfer.errors import HfTransferError
from hf_transfer.recipe import Recipe
from hf_transfer.tasks.audio import build_audio_task
from hf_transfer.tasks.image import build_image_task
from hf_transfer.tasks.multimodal import build_multimodal_task
from hf_transfer.tasks.text import build_text_task
from hf_transfer.training.plan import Plan

TASKS: dict[str, Callable[[Recipe], Plan]] = {
    "text": build_text_task,
    "image": build_image_task,
    "multimodal": build_multimodal_task,
    "audio": build_audio_task,
}


def task_builder(recipe: Recipe) -> Callable[[Recipe], Plan]:
    if recipe.task not in TASKS:
        raise HfTransferError(f"task '{recipe.task}' is not available; choose one of {sorted(TASKS)}.")
    return TASKS[recipe.task]
