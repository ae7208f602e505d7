"""Frozen heads against the logistic-regression probe on the same cached features (issue 11).

For each data set: `hf-transfer train` with strategy freeze_backbone and the default head.solver
(auto: the logistic head fitted to convergence), the same with head.solver loop (the epochs of the
training loop, as before), both reading one feature cache; then the probe, scikit-learn's
LogisticRegression with its defaults on the very features the runs cached. Prints a markdown table.

    python benchmarks/frozen_heads.py [--data-root ../shared/data] [--out runs/frozen_heads] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEXT = ["data.text_column=sentence", "data.label_names=[negative, positive]"]
# name -> (recipe, data overrides, overrides of the loop run: the settings recorded before the solver)
SETS = {
    "sst2_4000": ("minilm_sentiment", ["data.path={root}/sst2", *TEXT, "data.max_train_samples=4000"],
                  ["training.lr=5e-3", "training.epochs=3", "training.batch_size=32"]),
    "hymenoptera": ("effnet_ants_bees", ["data.path={root}/hymenoptera"], []),
    "cats_dogs": ("effnet_ants_bees", ["data.path={root}/cats_dogs"], []),
    **{f"pacs_{domain}": ("effnet_ants_bees", [f"data.path={{root}}/pacs/{domain}", "data.validation_fraction=0.3"], [])
       for domain in ("photo", "art_painting", "cartoon")},
}


def train(recipe: str, overrides: list[str], out: Path) -> tuple[dict, float]:
    started = time.perf_counter()
    # scripts/train.py is `hf-transfer train`, run by this interpreter: no PATH needed
    command = [sys.executable, str(REPO / "scripts" / "train.py"), "--quiet", "--recipe", recipe, "--overwrite", "--output-dir", str(out),
               "--set", "strategy.name=freeze_backbone", *overrides]
    subprocess.run(command, check=True)
    return json.loads((out / "metrics.json").read_text()), time.perf_counter() - started


def probe_accuracy(recipe_name: str, overrides: list[str], cache_dir: Path) -> float:
    """LogisticRegression (scikit-learn defaults) on the features the runs cached, read back by their keys."""
    from accelerate import Accelerator
    from sklearn.linear_model import LogisticRegression

    from hf_transfer.cache.store import FeatureKey, FeatureStore, model_key_fields
    from hf_transfer.recipe import load_recipe
    from hf_transfer.tasks import task_builder

    recipe = load_recipe(recipe_name, ["strategy.name=freeze_backbone", *overrides])
    task = task_builder(recipe)(recipe)
    source, store = task.feature_source, FeatureStore(cache_dir)
    common = model_key_fields(recipe.model.name, task.model, source.preprocessing, Accelerator().mixed_precision)
    (x_train, y_train), (x_val, y_val) = (
        store.load(FeatureKey(data=source.fingerprint(split), **common)) for split in ("train", "validation")
    )
    probe = LogisticRegression(max_iter=5000).fit(x_train.float().numpy(), y_train.numpy())
    return float(probe.score(x_val.float().numpy(), y_val.numpy()))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data-root", default=os.environ.get("HF_TRANSFER_SHARED_DATA", "../shared/data"))
    parser.add_argument("--out", default="runs/frozen_heads")
    parser.add_argument("--only", nargs="*", default=list(SETS))
    args = parser.parse_args()
    root = Path(args.data_root).resolve()
    rows = []
    for name in args.only:
        recipe, data, loop_settings = SETS[name]
        data = [value.format(root=root) for value in data]
        out = Path(args.out) / name
        cache = [f"training.feature_cache_dir={out / 'cache'}"]
        solved, solved_wall = train(recipe, [*data, *cache], out / "solver")
        looped, looped_wall = train(recipe, [*data, *cache, "head.solver=loop", *loop_settings], out / "loop")
        probe = probe_accuracy(recipe, [*data, *cache], out / "cache")
        last = looped["history"][-1]["accuracy"]
        rows.append(f"| {name} | {solved['train_samples']} | {100 * probe:.1f}% | {100 * solved['eval']['accuracy']:.1f}% "
                    f"(C={solved['head_solver']['C']:.3g}, {solved['head_solver']['seconds']} s) | "
                    f"{100 * looped['eval']['accuracy']:.1f}% (epoch {looped['best_epoch']}) / {100 * last:.1f}% | "
                    f"{solved_wall:.0f} s / {looped_wall:.0f} s |")
        print(rows[-1], flush=True)
    print("| data | training examples | probe (LogisticRegression defaults) | head.solver auto (logistic) | "
          "head.solver loop: best (epoch) / last | wall: solver / loop |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    sys.exit(main())
