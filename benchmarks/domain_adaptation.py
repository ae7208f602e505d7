"""Cross-domain benchmark (issues 6 and 13): target accuracy of source-only and each adaptation method.

For each recipe (a shipped name or a path to a recipe file), each method (none = source only, dann,
cdan, mmd, coral, mcc, tca) and each seed, one ordinary `hf-transfer train --recipe R --set
adaptation.method=M training.seed=S strategy.name=STRATEGY ...` run. A method written METHOD:per_domain
or METHOD:shared also sets adaptation.norm_statistics (per_domain: each domain normalised by its own
BatchNorm statistics), so `none:per_domain` is AdaBN alone; a bare method keeps the recipe's setting,
except the source-only rows (`none`, the logistic regression) and the upper bound, which use no target
images and run as plain runs (shared). With the default strategy,
freeze_backbone, the backbone's features are computed once per example and shared by every run
through one store, and a logistic regression fitted to convergence on the same stored source
features (`head.solver`'s fit: L2 strength by cross-validation on the source) is the honest
source-only row beside the trained head's. The upper bound trains the same strategy, head and budget
on the target's own labels (data.path = the target, 20% held out per seed) and reports that held-out
accuracy at the last epoch.

    python benchmarks/domain_adaptation.py [--recipes NAME_OR_PATH ...] [--methods ...] [--seeds 0 1 2]
        [--strategy NAME] [--set KEY=VALUE ...] [--output DIR]

Prints one line per run as it ends (progress), writes DIR/results.json after each recipe, and prints a
markdown table: mean ± standard deviation over the seeds, and each cell's mean wall time per run.
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
METHODS = ["none", "dann", "cdan", "mmd", "coral", "mcc", "tca"]
NORM_SUFFIXES = (":per_domain", ":shared")  # a method's suffix: its adaptation.norm_statistics
PER_DOMAIN = NORM_SUFFIXES[0]
PLAIN = ["adaptation.method=none", "adaptation.norm_statistics=shared"]  # no target image touches the model
LOGISTIC = "logistic"  # the frozen source-only logistic regression, not a recipe method
UPPER_BOUND = "target_labels"


def recipe_label(name: str) -> str:
    """A recipe's name in tables and folders: a shipped name as it is, a path by its file name."""
    return Path(name).stem if name.endswith((".yaml", ".yml")) else name


def run_quietly(name: str, overrides: list[str], log: Path) -> dict:
    """One training run; its console output goes to `log` instead of the screen."""
    from hf_transfer.recipe import load_recipe
    from hf_transfer.run import run_training

    with log.open("a") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        return run_training(load_recipe(name, overrides))


def logistic_source_only(name: str, overrides: list[str], seed: int, log: Path) -> float:
    """Target accuracy of a logistic regression fitted on the run's stored frozen source features."""
    from torch import nn

    from hf_transfer.adaptation.features import domain_features, load_target_task
    from hf_transfer.cache.solver import fit_logistic_head
    from hf_transfer.recipe import load_recipe
    from hf_transfer.run import build_task, make_accelerator

    recipe = load_recipe(name, [*overrides, *PLAIN, f"training.seed={seed}"])
    with log.open("a") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        accelerator = make_accelerator(recipe)
        source, _ = build_task(recipe, accelerator)
        features = domain_features(recipe, source, load_target_task(recipe, source.label_names), accelerator)
    train_features, train_labels = features.source_train
    head = nn.Linear(train_features.shape[1], len(source.label_names))
    fit_logistic_head(head, [train_features], train_labels, None, seed)
    target_features, target_labels = features.target
    return float((head(target_features).argmax(1) == target_labels).float().mean())


def method_overrides(method: str) -> list[str]:
    if method == "none":
        return PLAIN
    base, _, norms = method.partition(":")
    return [f"adaptation.method={base}"] + ([f"adaptation.norm_statistics={norms}"] if norms else [])


def method_choice(text: str) -> str:
    base, colon, norms = text.partition(":")
    if base not in METHODS or (colon and f":{norms}" not in NORM_SUFFIXES):
        raise argparse.ArgumentTypeError(f"{text!r}: one of {', '.join(METHODS)}, optionally with "
                                         f"{' or '.join(NORM_SUFFIXES)}")
    return text


def measure(name: str, methods: list[str], seeds: list[int], common: list[str], output: Path,
            frozen: bool) -> dict:
    label = recipe_label(name)
    results: dict = {"accuracy": {}, "seconds": {}}

    def record(column: str, seed: int, accuracy: float, started: float, note: str = "") -> None:
        seconds = time.perf_counter() - started
        results["accuracy"].setdefault(column, []).append(accuracy)
        results["seconds"].setdefault(column, []).append(round(seconds, 1))
        print(f"{label} {column} seed {seed}: target accuracy {accuracy:.4f}{note} ({seconds:.0f} s)", flush=True)

    for method in methods:
        for seed in seeds:
            started = time.perf_counter()
            run_dir = output / label / method.replace(":", "_") / f"seed{seed}"
            summary = run_quietly(name, [*common, *method_overrides(method), f"training.seed={seed}",
                                         f"output.dir={run_dir}"], output / "runs.log")
            source_accuracy = summary["adaptation"]["source_validation_accuracy"]
            record(method, seed, summary["eval"]["accuracy"], started, f" (source validation {source_accuracy:.4f})")
    if frozen:
        for seed in seeds:
            started = time.perf_counter()
            record(LOGISTIC, seed, logistic_source_only(name, common, seed, output / "runs.log"), started)
    from hf_transfer.recipe import load_recipe

    target = load_recipe(name).adaptation.target_path
    for seed in seeds:
        # the same strategy, head and budget, trained on 80% of the target and tested on the rest
        started = time.perf_counter()
        run_dir = output / label / UPPER_BOUND / f"seed{seed}"
        summary = run_quietly(name, [
            *common, f"data.path={target}", "data.validation_fraction=0.2", *PLAIN,
            f"training.seed={seed}", f"output.dir={run_dir}",
        ], output / "runs.log")
        record(UPPER_BOUND, seed, summary["adaptation"]["source_validation_accuracy"], started, " (held-out target)")
    return results


def mean_std(values: list[float]) -> str:
    spread = statistics.pstdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.1f} ± {100 * spread:.1f}"


COLUMN_TITLES = {LOGISTIC: "source only, logistic regression", "none": "source only",
                 "none" + PER_DOMAIN: "per-domain norms alone (AdaBN)", UPPER_BOUND: "target labels (upper bound)"}


def column_title(column: str) -> str:
    return COLUMN_TITLES.get(column) or column.replace(PER_DOMAIN, " + per-domain norms").replace(":shared", "").upper()


def table(results: dict[str, dict]) -> str:
    columns = list(dict.fromkeys(c for result in results.values() for c in result["accuracy"]))
    methods = [c for c in columns if c not in (LOGISTIC, "none", UPPER_BOUND)]
    columns = [c for c in (LOGISTIC, "none") if c in columns] + methods + [UPPER_BOUND]
    lines = ["| recipe | " + " | ".join(column_title(c) for c in columns) + " |",
             "|" + "---|" * (len(columns) + 1)]
    for name, result in results.items():
        accuracy, seconds = result["accuracy"], result["seconds"]
        cells = [f"{mean_std(accuracy[c])} ({statistics.mean(seconds[c]):.0f} s)" if c in accuracy else "" for c in columns]
        adapted = [c for c in methods if c in accuracy]
        if adapted:
            best = max(adapted, key=lambda c: statistics.mean(accuracy[c]))
            cells[columns.index(best)] = f"**{cells[columns.index(best)]}**"
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", default=RECIPES, help="shipped recipe names or recipe file paths")
    parser.add_argument("--methods", nargs="+", default=METHODS, type=method_choice,
                        help=f"{', '.join(METHODS)}; METHOD{PER_DOMAIN} or METHOD:shared sets its BatchNorm statistics")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--strategy", default="freeze_backbone",
                        help="strategy.name of every run; one that trains the backbone adapts it in the loop")
    parser.add_argument("--set", nargs="+", default=[], dest="overrides", metavar="KEY=VALUE",
                        help="recipe overrides for every run (the budget: training.epochs=3 data.max_length=128 ...)")
    parser.add_argument("--output", type=Path, default=Path("runs/domain_adaptation_benchmark"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.disable(logging.WARNING)
    args.output.mkdir(parents=True, exist_ok=True)
    frozen = args.strategy == "freeze_backbone"
    common = [f"training.feature_cache_dir={args.output / 'feature_store'}", "output.overwrite=true",
              f"strategy.name={args.strategy}", *args.overrides]
    methods = [m for m in args.methods if frozen or not m.startswith("tca")]  # tca maps frozen features only
    results_file = args.output / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    for name in args.recipes:
        results[recipe_label(name)] = measure(name, methods, args.seeds, common, args.output, frozen)
        results_file.write_text(json.dumps(results, indent=2) + "\n")  # after each recipe: a crash keeps the rest
    print(table({recipe_label(n): results[recipe_label(n)] for n in args.recipes}))


if __name__ == "__main__":
    main()
