"""The recipe's data.augment section: image training augmentation (kept apart from schema.py to keep
that module short; schema.py's DataConfig holds it)."""

from __future__ import annotations

from dataclasses import dataclass

from hf_transfer.errors import HfTransferError
from hf_transfer.recipe.fields import _f


@dataclass
class AugmentConfig:
    """Training-time augmentation of images (timm's train transform); validation is never augmented."""

    scale: list[float] = _f([0.08, 1.0], "Random resized crop: range of the crop's area, as a share of the image.")
    ratio: list[float] = _f([0.75, 1.3333], "Random resized crop: range of the crop's aspect ratio.")
    hflip: float = _f(0.5, "Probability of a horizontal flip.", at_least=0, at_most=1)
    vflip: float = _f(0.0, "Probability of a vertical flip.", at_least=0, at_most=1)
    rotation: float = _f(0.0, "Random rotation by up to this many degrees either way; 0 disables it.", at_least=0, at_most=180)
    color_jitter: float | None = _f(
        0.4, "Brightness/contrast/saturation jitter strength; 0 or null disables it. timm drops it when auto_augment is set.", at_least=0
    )
    auto_augment: str | None = _f(
        None,
        "Policy: timm RandAugment ('rand-m9-mstd0.5'), AugMix ('augmix-m5-w4-d2'), AutoAugment ('original'), "
        "or 'trivialaugment' (torchvision's TrivialAugmentWide); null for none.",
    )
    re_prob: float = _f(0.0, "Probability of random erasing (a random box replaced by noise).", at_least=0, at_most=1)
    mixup: float = _f(
        0.0, "Mixup alpha: each training batch is blended with itself reversed, images and labels by one Beta(alpha, "
        "alpha) weight (timm's Mixup); 0 turns it off. It turns the frozen-feature cache off (cached features cannot "
        "be mixed).", at_least=0,
    )
    cutmix: float = _f(
        0.0, "CutMix alpha: a box of the reversed batch is pasted in, labels mixed by its area; 0 turns it off. With "
        "mixup too, each mixed batch uses one of the two, at random.", at_least=0,
    )
    mix_prob: float = _f(1.0, "Probability that a training batch is mixed when mixup or cutmix is on.", at_least=0, at_most=1)

    def check(self) -> None:
        for key, values, upper in (("scale", self.scale, 1.0), ("ratio", self.ratio, None)):
            if len(values) != 2 or not 0 < values[0] <= values[1] or (upper is not None and values[1] > upper):
                limit = f" and at most {upper}" if upper is not None else ""
                raise HfTransferError(f"data.augment.{key} must be two numbers [low, high], 0 < low <= high{limit}.")
