"""The cached head's solver (`fit_logistic_head`) with one BLAS thread against the library's own count.

Reads the training features of a feature cache folder (e.g. the one `hf-transfer rank` fills: its
`feature_cache_dir`), and fits each entry with at least --min-examples rows, as it is and tiled with
a little noise to 4x and 16x the examples; both sides one after the other in this one process.

    python benchmarks/solver_threads.py CACHE_DIR [--min-examples 1000] [--tiles 1 4 16]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from hf_transfer.cache import solver


def timed_fit(features: torch.Tensor, labels: torch.Tensor, threads: int | None) -> tuple[float, float]:
    solver.BLAS_THREADS = threads
    head = torch.nn.Linear(features.shape[1], int(labels.max()) + 1)
    started = time.perf_counter()
    fit = solver.fit_logistic_head(head, [features], labels, None, seed=42)
    return time.perf_counter() - started, fit.C


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("cache_dir", type=Path)
    parser.add_argument("--min-examples", type=int, default=1000)
    parser.add_argument("--tiles", type=int, nargs="+", default=[1, 4, 16])
    args = parser.parse_args()
    print("| features of | examples x dim | library's threads | one BLAS thread | ratio | C (both) |\n|---|---|---|---|---|---|")
    generator = torch.Generator().manual_seed(0)
    for path in sorted(args.cache_dir.glob("*.safetensors")):
        stored = load_file(str(path))
        if len(stored["labels"]) < args.min_examples:
            continue
        features, labels = stored["features"].float(), stored["labels"]
        with safe_open(str(path), framework="pt") as opened:  # the cache key names the model
            model = json.loads(opened.metadata()["key"])["model_name"].split("/")[-1]
        for tiles in args.tiles:  # copies with noise: a larger set of the same kind, not exact duplicates
            noise = [0.05 * torch.randn(features.shape, generator=generator) for _ in range(tiles - 1)]
            tiled = torch.cat([features, *(features + n for n in noise)])
            default, c_default = timed_fit(tiled, labels.repeat(tiles), None)
            single, c_single = timed_fit(tiled, labels.repeat(tiles), 1)
            same = f"{c_single:g}" if c_single == c_default else f"{c_default:g} / {c_single:g}"
            print(f"| {model} | {tiled.shape[0]:,} x {tiled.shape[1]} | {default:.1f} s | {single:.1f} s | "
                  f"{default / single:.2f}x | {same} |", flush=True)


if __name__ == "__main__":
    main()
