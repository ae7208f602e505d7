"""Which share of the fine-tuned weights to keep: the whole WiSE-FT curve from one run per set and seed (issue 11).

`training.weight_interpolation` evaluates and saves (1 - share) x the weights fine-tuning started from
(the pretrained backbone, the head fitted first) + share x the fine-tuned ones, and training itself goes
on from the fine-tuned weights whatever the share. So one fine-tuning run, with the interpolation off,
holds the answer for every share: after its last epoch this script evaluates the mix at each share on
the validation split, exactly as the callback would have (every floating-point tensor of the state
mixed, BatchNorm's statistics included). Share 0 is the start itself (the frozen probe: the backbone
has not moved), share 1 the fine-tuned model.

Each run is effnet_ants_bees' `full` (head fitted first, 5 epochs), as the issue 11 tables; it appends
one JSON line to OUT/results.jsonl; `--table` prints the mean over seeds for each set and share.

    python benchmarks/wise_share.py [--data-root ../shared/data] [--out runs/wise_share]
        [--only SET ...] [--seeds N ...] [--shares S ...] [--set KEY=VALUE ...] [--table]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from frozen_heads import SETS

from hf_transfer.recipe import load_recipe
from hf_transfer.run import build_task, make_accelerator, start_output_folder, training_plan
from hf_transfer.training.callbacks import recipe_callbacks
from hf_transfer.training.loop import train
from hf_transfer.training.metrics import evaluate
from hf_transfer.training.plan import Callback

IMAGE_SETS = [name for name, (recipe, _, _) in SETS.items() if recipe == "effnet_ants_bees"]
FINE_TUNE = ["strategy.name=full", "training.epochs=5", "strategy.head_first=true", "training.weight_interpolation=null"]
SHARES = [round(0.1 * step, 1) for step in range(11)]


class ShareSweep(Callback):
    """After the last epoch, the validation accuracy of the start mixed with the live weights at each share."""

    def __init__(self, shares: list[float], epochs: int, loader, label_names: list[str]):
        self.shares, self.epochs, self.loader, self.label_names = shares, epochs, loader, label_names
        self.start: dict[str, torch.Tensor] | None = None
        self.accuracy: dict[float, float] = {}

    def on_train_begin(self, loop) -> None:
        self.start = {k: v.detach().clone() for k, v in loop.accelerator.unwrap_model(loop.model).state_dict().items()}

    def on_epoch_end(self, loop, metrics: dict[str, Any]) -> None:
        if len(loop.state.history) < self.epochs:
            return
        model = loop.accelerator.unwrap_model(loop.model)
        live = {k: v.detach().clone() for k, v in model.state_dict().items()}
        for share in self.shares:
            model.load_state_dict({k: torch.lerp(self.start[k], v, share) if v.is_floating_point() else v
                                   for k, v in live.items()})
            self.accuracy[share] = float(evaluate(model, self.loader, loop.accelerator, self.label_names)["accuracy"])
        model.load_state_dict(live)


def sweep(name: str, seed: int, shares: list[float], root: Path, out: Path, extra: list[str]) -> dict[str, Any]:
    recipe_name, data, _ = SETS[name]
    run_dir = out / f"{name}_seed{seed}"
    recipe = load_recipe(recipe_name, [*(value.format(root=root) for value in data), *FINE_TUNE,
                                       f"training.seed={seed}", f"output.dir={run_dir}", "output.overwrite=true", *extra])
    started = time.perf_counter()
    accelerator = make_accelerator(recipe)
    task, _ = build_task(recipe, accelerator)
    plan = training_plan(recipe, task, accelerator)
    start_output_folder(recipe, accelerator, None)
    shares_sweep = ShareSweep(shares, recipe.training.epochs, accelerator.prepare(plan.eval_loader), plan.label_names)
    result = train(plan, recipe.training, accelerator, run_dir, [*recipe_callbacks(recipe.training, plan), shares_sweep])
    return {"set": name, "seed": seed, "epochs": [round(e["accuracy"], 4) for e in result.history],
            "shares": {str(k): round(v, 4) for k, v in shares_sweep.accuracy.items()},
            "seconds": round(time.perf_counter() - started, 1)}


def table(results: list[dict[str, Any]], shares: list[str]) -> None:
    print("| data | seeds | " + " | ".join(f"share {s}" for s in shares) + " |")
    print("|---|---|" + "---|" * len(shares))
    means: dict[str, list[float]] = {s: [] for s in shares}
    for name in dict.fromkeys(r["set"] for r in results):
        rows = [r for r in results if r["set"] == name]
        cells = []
        for s in shares:
            mean = 100 * statistics.mean(r["shares"][s] for r in rows)
            means[s].append(mean)
            cells.append(f"{mean:.1f}")
        print(f"| {name} | {', '.join(str(r['seed']) for r in rows)} | " + " | ".join(cells) + " |")
    print("| mean over the sets | | " + " | ".join(f"{statistics.mean(means[s]):.1f}" for s in shares) + " |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data-root", default=os.environ.get("HF_TRANSFER_SHARED_DATA", "../shared/data"))
    parser.add_argument("--out", default="runs/wise_share")
    parser.add_argument("--only", nargs="*", default=IMAGE_SETS, choices=IMAGE_SETS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[42, 43])
    parser.add_argument("--shares", nargs="+", type=float, default=SHARES)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more recipe overrides")
    parser.add_argument("--table", action="store_true", help="print the table of OUT/results.jsonl and stop")
    args = parser.parse_args()
    out = Path(args.out)
    results_file = out / "results.jsonl"
    if args.table:
        results = [json.loads(line) for line in results_file.read_text().splitlines()]
        table(results, [str(s) for s in args.shares])
        return
    out.mkdir(parents=True, exist_ok=True)
    for name in args.only:
        for seed in args.seeds:
            row = sweep(name, seed, args.shares, Path(args.data_root).resolve(), out, args.set)
            with results_file.open("a") as file:
                file.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
