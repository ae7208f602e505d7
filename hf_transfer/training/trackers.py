"""Experiment trackers (training.report_to): Accelerate's, fed by a callback with what log.jsonl gets."""

from __future__ import annotations

from typing import Any

from hf_transfer.errors import HfTransferError
from hf_transfer.recipe import TrainingConfig
from hf_transfer.training.plan import Callback
from hf_transfer.training.state import Loop


def checked_trackers(config: TrainingConfig) -> list[str] | None:
    """training.report_to, each name installed here (Accelerate would skip a missing one with a log line)."""
    from accelerate.tracking import get_available_trackers

    if not config.report_to:
        return None
    available = {getattr(tracker, "value", str(tracker)) for tracker in get_available_trackers()}
    missing = [name for name in config.report_to if name != "all" and name not in available]
    if missing:
        raise HfTransferError(
            f"training.report_to names {', '.join(missing)}, not installed here: pip install {' '.join(missing)}"
            " (or remove it from training.report_to)."
        )
    return list(config.report_to)


def flat_scalars(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as dotted keys and scalars, which every tracker stores (TensorBoard's hparams
    take no lists or None)."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flat_scalars(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


class TrackerLogging(Callback):
    """What log.jsonl records, sent to Accelerate's trackers (training.report_to): a step's loss and
    rate as train/loss and train/lr, an epoch's metrics as eval/<metric> and train/epoch_loss."""

    def on_log(self, loop: Loop, record: dict[str, Any]) -> None:
        if "step" in record:
            values = {"train/loss": record["loss"], "train/lr": record["lr"], "epoch": record["epoch"]}
        else:
            values = {("train/epoch_loss" if key == "train_loss" else f"eval/{key}"): value
                      for key, value in record.items() if key != "epoch"}
        loop.accelerator.log(values, step=loop.state.update)
