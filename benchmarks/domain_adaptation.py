"""Cross-domain benchmark (issue 6): target accuracy of source-only and each adaptation method.

For each recipe, each method (none = source only, dann, mmd, coral, tca) and each seed, one ordinary
`hf-transfer train --recipe NAME --set adaptation.method=M training.seed=S` run; the backbone's
features are computed once per example and shared by every run through one store. The upper
bound trains the same head on the target's own labels (data.path = the target, 20% held out per
seed) and reports that held-out accuracy.

    python benchmarks/domain_adaptation.py [--recipes ...] [--methods ...] [--seeds 0 1 2] [--output DIR]

Writes DIR/results.json and prints a markdown table (mean ± standard deviation over the seeds).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import statistics
import time
from pathlib import Path

RECIPES = ["pacs_photo_to_cartoon", "pacs_photo_to_art", "amazon_books_to_electronics", "amazon_dvd_to_books"]
METHODS = ["none", "dann", "mmd", "coral", "tca"]


def run_quietly(name: str, overrides: list[str], log: Path) -> dict:
    """One training run; its console output goes to `log` instead of the screen."""
    from hf_transfer.recipe import load_recipe
    from hf_transfer.run import run_training

    with log.open("a") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        return run_training(load_recipe(name, overrides))


def measure(name: str, methods: list[str], seeds: list[int], output: Path) -> dict:
    common = [f"training.feature_cache_dir={output / 'feature_store'}", "output.overwrite=true"]
    results: dict = {"methods": {}, "upper_bound": []}
    for method in methods:
        for seed in seeds:
            started = time.perf_counter()
            run_dir = output / name / method / f"seed{seed}"
            summary = run_quietly(
                name, [*common, f"adaptation.method={method}", f"training.seed={seed}", f"output.dir={run_dir}"],
                output / "runs.log",
            )
            accuracy = summary["eval"]["accuracy"]
            results["methods"].setdefault(method, []).append(accuracy)
            print(f"{name} {method} seed {seed}: target accuracy {accuracy:.4f} "
                  f"(source validation {summary['adaptation']['source_validation_accuracy']:.4f}; "
                  f"{time.perf_counter() - started:.0f} s)", flush=True)
    from hf_transfer.recipe import load_recipe

    target = load_recipe(name).adaptation.target_path
    for seed in seeds:
        # the same features, head and budget, trained on 80% of the target and tested on the rest
        run_dir = output / name / "target_labels" / f"seed{seed}"
        summary = run_quietly(name, [
            *common, f"data.path={target}", "data.validation_fraction=0.2", "adaptation.method=none",
            f"training.seed={seed}", f"output.dir={run_dir}",
        ], output / "runs.log")
        accuracy = summary["adaptation"]["source_validation_accuracy"]
        results["upper_bound"].append(accuracy)
        print(f"{name} target labels seed {seed}: held-out target accuracy {accuracy:.4f}", flush=True)
    return results


def mean_std(values: list[float]) -> str:
    spread = statistics.pstdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.1f} ± {100 * spread:.1f}"


def table(results: dict[str, dict], methods: list[str]) -> str:
    header = "| recipe | " + " | ".join("source only" if m == "none" else m.upper() for m in methods) + " | target labels (upper bound) |"
    lines = [header, "|" + "---|" * (len(methods) + 2)]
    for name, result in results.items():
        cells = [mean_std(result["methods"][m]) for m in methods]
        best = max(methods, key=lambda m: statistics.mean(result["methods"][m]))
        cells[methods.index(best)] = f"**{cells[methods.index(best)]}**"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {mean_std(result['upper_bound'])} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", default=RECIPES)
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--output", type=Path, default=Path("runs/domain_adaptation_benchmark"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.disable(logging.WARNING)
    args.output.mkdir(parents=True, exist_ok=True)
    results_file = args.output / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    for name in args.recipes:
        results[name] = measure(name, args.methods, args.seeds, args.output)
        results_file.write_text(json.dumps(results, indent=2) + "\n")  # after each recipe: a crash keeps the rest
    print(table({n: results[n] for n in args.recipes}, args.methods))


if __name__ == "__main__":
    main()
