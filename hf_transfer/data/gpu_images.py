"""Image batches decoded and augmented on the GPU: past the CPU decoding wall.

A GPU trains ResNet-50 on ~4,000 images/s, but a CPU DataLoader decoding JPEGs with PIL delivers
~1,000/s with 8-15 workers: the GPU waits 80% of the time. Two ways past it, both here:

- `decode="every_step"`: the JPEG bytes stay in memory and every batch is decoded by nvJPEG on the
  GPU (`torchvision.io.decode_jpeg(device="cuda")`), then cropped and resized image by image.
- `decode="once"`: every image is decoded once, resized so its shorter side is `stored_size`
  pixels, and kept on the GPU as uint8 (a small data set fits easily: 800 images take ~300 MB).
  Each step then gathers a batch and crops, resizes, flips and normalises it in a handful of
  batched kernels (`torchvision.ops.roi_align` crops and resizes the whole batch at once).

Augmentation follows torchvision's RandomResizedCrop (area `scale`, aspect `ratio`, ten tries
then a centre crop) and a horizontal flip, drawn from a seeded generator: every epoch sees new
crops. Colour jitter, RandAugment and friends stay on the CPU path (data/images.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Literal

import torch
import torch.nn.functional as F


def random_resized_boxes(
    sizes: torch.Tensor, scale: tuple[float, float], ratio: tuple[float, float], generator: torch.Generator
) -> torch.Tensor:
    """Crop boxes (x0, y0, x1, y1) per image of (height, width) `sizes`, as RandomResizedCrop draws them."""
    count = len(sizes)
    heights, widths = sizes[:, 0].double(), sizes[:, 1].double()
    area = heights * widths
    log_ratio = torch.log(torch.tensor(ratio, dtype=torch.float64))
    boxes = torch.empty(count, 4, dtype=torch.float64)
    done = torch.zeros(count, dtype=torch.bool)
    for _ in range(10):  # vectorised over the batch; each image keeps its first crop that fits
        target = area * torch.empty(count, dtype=torch.float64).uniform_(*scale, generator=generator)
        aspect = torch.exp(torch.empty(count, dtype=torch.float64).uniform_(*log_ratio.tolist(), generator=generator))
        w, h = torch.sqrt(target * aspect).round(), torch.sqrt(target / aspect).round()
        fits = (w > 0) & (h > 0) & (w <= widths) & (h <= heights) & ~done
        x0 = (torch.rand(count, generator=generator, dtype=torch.float64) * (widths - w + 1)).floor()
        y0 = (torch.rand(count, generator=generator, dtype=torch.float64) * (heights - h + 1)).floor()
        boxes[fits] = torch.stack([x0, y0, x0 + w, y0 + h], 1)[fits]
        done |= fits
    if not done.all():  # torchvision's fallback: a centre crop clamped to the ratio range
        in_ratio = widths / heights
        w = torch.where(in_ratio < ratio[0], widths, torch.where(in_ratio > ratio[1], (heights * ratio[1]).round(), widths))
        h = torch.where(in_ratio < ratio[0], (widths / ratio[0]).round(), heights)
        x0, y0 = ((widths - w) / 2).floor(), ((heights - h) / 2).floor()
        boxes[~done] = torch.stack([x0, y0, x0 + w, y0 + h], 1)[~done]
    return boxes.float()


class GpuImageBatches:
    """Shuffled, augmented, normalised batches {"pixel_values", "labels"} made on the GPU, epoch after epoch."""

    def __init__(
        self,
        files: Sequence[str],
        labels: Sequence[int],
        batch_size: int,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        device: torch.device,
        decode: Literal["every_step", "once"] = "once",
        stored_size: int | None = None,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        seed: int = 0,
        channels_last: bool = True,
    ):
        from torchvision.io import read_file

        self.batch_size, self.image_size, self.device, self.decode = batch_size, image_size, device, decode
        self.scale, self.ratio, self.hflip = scale, ratio, hflip
        self.labels = torch.as_tensor(list(labels), dtype=torch.long)
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255
        self.generator = torch.Generator().manual_seed(seed)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.encoded = [read_file(str(f)) for f in files]  # file reads are cheap; decoding is the wall
        if decode == "once":
            self._store_decoded(stored_size or math.ceil(image_size * 1.15))

    def __len__(self) -> int:
        return math.ceil(len(self.labels) / self.batch_size)

    def _decode(self, encoded: list[torch.Tensor]) -> list[torch.Tensor]:
        from torchvision.io import ImageReadMode, decode_jpeg

        return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=self.device)

    def _store_decoded(self, shorter_side: int) -> None:
        """Every image once: decoded, shorter side resized to `shorter_side`, padded into one uint8 tensor."""
        resized = []
        for start in range(0, len(self.encoded), 256):
            for image in self._decode(self.encoded[start:start + 256]):
                height, width = image.shape[1:]
                factor = shorter_side / min(height, width)
                size = (max(1, round(height * factor)), max(1, round(width * factor)))
                resized.append(F.interpolate(image[None].float(), size=size, mode="bilinear", antialias=True)
                               .round().clamp(0, 255).to(torch.uint8)[0])
        longest = (max(r.shape[1] for r in resized), max(r.shape[2] for r in resized))
        self.stored = torch.zeros(len(resized), 3, *longest, dtype=torch.uint8, device=self.device)
        for index, image in enumerate(resized):
            self.stored[index, :, : image.shape[1], : image.shape[2]] = image
        self.stored_sizes = torch.tensor([r.shape[1:] for r in resized])
        self.encoded = []  # the decoded copy replaces the bytes

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        order = torch.randperm(len(self.labels), generator=self.generator)
        for indices in order.split(self.batch_size):
            pixels = self._crops_from_store(indices) if self.decode == "once" else self._crops_decoded_now(indices)
            flip = torch.rand(len(indices), generator=self.generator) < self.hflip
            flip = flip.to(self.device, non_blocking=True).view(-1, 1, 1, 1)
            pixels = torch.where(flip, pixels.flip(-1), pixels)
            pixels = ((pixels - self.mean) / self.std).contiguous(memory_format=self.memory_format)
            yield {"pixel_values": pixels, "labels": self.labels[indices].to(self.device, non_blocking=True)}

    def _crops_from_store(self, indices: torch.Tensor) -> torch.Tensor:
        from torchvision.ops import roi_align

        boxes = random_resized_boxes(self.stored_sizes[indices], self.scale, self.ratio, self.generator)
        rois = torch.cat([torch.arange(len(indices), dtype=torch.float32)[:, None], boxes], 1).to(self.device)
        batch = self.stored[indices.to(self.device)].float()
        size = (self.image_size, self.image_size)
        return roi_align(batch, rois, output_size=size, spatial_scale=1.0, sampling_ratio=2, aligned=True)

    def _crops_decoded_now(self, indices: torch.Tensor) -> torch.Tensor:
        images = self._decode([self.encoded[i] for i in indices.tolist()])
        sizes = torch.tensor([image.shape[1:] for image in images])
        boxes = random_resized_boxes(sizes, self.scale, self.ratio, self.generator).round().long().tolist()
        size = (self.image_size, self.image_size)
        crops = [
            F.interpolate(image[None, :, y0:y1, x0:x1].float(), size=size, mode="bilinear", antialias=True)
            for image, (x0, y0, x1, y1) in zip(images, boxes)
        ]
        return torch.cat(crops)
