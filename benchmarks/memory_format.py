"""CNNs on the CPU in the default (NCHW) and channels-last memory formats, one after the other in one process.

A training step (forward, backward, fused AdamW step) and an inference forward at batch 32, 224 x 224,
for the CNN families the shipped image recipes use; the median of a few repetitions after a warm-up.
The logits of both formats are compared too (the same weights before any step, the same input).

    python benchmarks/memory_format.py [--models tf_efficientnet_lite0 resnet50 vgg16] [--repeats 3]
"""

from __future__ import annotations

import argparse

import timm
import torch
from text_step_profile import median_seconds  # warm-up once, then the median


def measure(name: str, channels_last: bool, batch: int, repeats: int) -> tuple[float, float, torch.Tensor]:
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=2)
    pixels, labels = torch.randn(batch, 3, 224, 224), torch.randint(0, 2, (batch,))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.eval()
    with torch.inference_mode():  # before any step: both formats hold the same weights here
        logits = model(torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(1)))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)

    def train_step():
        torch.nn.functional.cross_entropy(model(pixels), labels).backward()
        optimizer.step()
        optimizer.zero_grad()

    train = median_seconds(train_step, repeats)
    model.eval()
    with torch.inference_mode():
        infer = median_seconds(lambda: model(pixels), repeats)
    return train, infer, logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=["tf_efficientnet_lite0", "resnet50", "vgg16"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, timm {timm.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}")
    print("| model | train step NCHW (s) | channels-last (s) | speed-up | inference NCHW (s) | channels-last (s) | "
          "speed-up | largest logit difference |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models:
        train_nchw, infer_nchw, logits_nchw = measure(name, False, args.batch_size, args.repeats)
        train_last, infer_last, logits_last = measure(name, True, args.batch_size, args.repeats)
        difference = (logits_nchw - logits_last).abs().max().item()
        print(f"| {name} | {train_nchw:.2f} | {train_last:.2f} | {train_nchw / train_last:.2f}x | {infer_nchw:.2f} | "
              f"{infer_last:.2f} | {infer_nchw / infer_last:.2f}x | {difference:.1e} |", flush=True)


if __name__ == "__main__":
    main()
