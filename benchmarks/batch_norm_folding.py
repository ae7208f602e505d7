"""A frozen CNN's forward pass with and without its BatchNorm folded into the convolutions (sources/folding.py),
one after the other in one process: what every frozen feature pass (`rank`, `freeze_backbone`, the head fitted
first, domain adaptation's frozen path) and `predict` / `evaluate` of an image run now compute.

Channels-last, as hf_transfer runs CNNs on a CPU; batch 32 at 224 x 224; the median of a few repetitions
after a warm-up; random weights with BatchNorm statistics drawn far from the identity, so that the largest
difference of the pooled features (relative to the largest feature) shows what folding changes.

    python benchmarks/batch_norm_folding.py [--models tf_efficientnet_lite0 ...] [--repeats 5]
"""

from __future__ import annotations

import argparse

import timm
import torch
from text_step_profile import median_seconds  # warm-up once, then the median
from torch import nn

from hf_transfer.sources.folding import fold_batch_norms


def with_random_statistics(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, nn.BatchNorm2d):
                layer.running_mean.uniform_(-1, 1)
                layer.running_var.uniform_(0.5, 2)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=["tf_efficientnet_lite0", "tf_efficientnet_lite1",
                                                        "tf_efficientnet_lite2", "resnet50"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, timm {timm.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}")
    print("| model | BatchNorm layers | forward (s) | folded (s) | speed-up | largest feature difference (relative) |")
    print("|---|---|---|---|---|---|")
    pixels = torch.randn(args.batch_size, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    for name in args.models:
        model = with_random_statistics(timm.create_model(name, num_classes=0)).to(memory_format=torch.channels_last)
        folded = fold_batch_norms(model)
        norms = sum(isinstance(layer, nn.BatchNorm2d) for layer in model.modules())
        with torch.inference_mode():
            plain_seconds = median_seconds(lambda: model(pixels), args.repeats)
            folded_seconds = median_seconds(lambda: folded(pixels), args.repeats)
            expected, got = model(pixels[:4]), folded(pixels[:4])
        difference = float((got - expected).abs().max() / expected.abs().max())
        print(f"| {name} | {norms} | {plain_seconds:.2f} | {folded_seconds:.2f} | {plain_seconds / folded_seconds:.2f}x | "
              f"{difference:.1e} |", flush=True)


if __name__ == "__main__":
    main()
