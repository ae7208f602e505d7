"""How many training examples `hf-transfer rank`'s scores need (issue 12).

For each data set (rank_sources.py's), each candidate's frozen features of the whole training split
and the validation split come through the feature cache, exactly as `rank` computes them; then every
score is computed again on seeded random samples of N training examples (the validation split whole)
and compared with the same score on the whole split: how often the sample names the same winner, and
Kendall's tau between the candidates' sample scores and their whole-split scores. A frozen pass costs
the same per example, so a sample of N costs N / (train + validation) of the rank's feature time.

    python benchmarks/rank_sample_size.py [--data-root ../shared/data] [--only SET ...] [--sizes 250 500 1000]
        [--draws 5] [--cache DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

import torch
from scipy.stats import kendalltau

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rank_sources import SETS  # noqa: E402  (the data sets and candidates of the rank benchmark)

from hf_transfer.recipe import load_recipe  # noqa: E402
from hf_transfer.selection.candidates import candidate_recipe  # noqa: E402
from hf_transfer.selection.rank import SCORES, SplitFeatures, rank_accelerator, scored_features  # noqa: E402
from hf_transfer.tasks import task_builder  # noqa: E402


def whole_features(recipe, names: list[str], cache: Path) -> dict[str, SplitFeatures]:
    """Each candidate's features, as `rank` computes them (its precision, its cache keys)."""
    accelerator = rank_accelerator(recipe)
    out = {}
    for name in names:
        candidate = candidate_recipe(recipe, name, cache)
        task = task_builder(candidate)(candidate)
        out[name], _ = scored_features(candidate, task, accelerator)
        del task
    return out


def sampled(features: SplitFeatures, rows: torch.Tensor) -> SplitFeatures:
    return dataclasses.replace(features, train=features.train[rows], train_labels=features.train_labels[rows])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data-root", default=os.environ.get("HF_TRANSFER_SHARED_DATA", "../shared/data"))
    parser.add_argument("--only", nargs="*", default=list(SETS))
    parser.add_argument("--sizes", nargs="+", type=int, default=[250, 500, 1000])
    parser.add_argument("--draws", type=int, default=5)
    parser.add_argument("--cache", default="runs/rank_sample_size", help="the feature cache folder (reruns read it)")
    args = parser.parse_args()
    root = Path(args.data_root).resolve()
    print("| data | train | N | " + " | ".join(f"{SCORES[s].title}: same winner, tau" for s in SCORES) + " |")
    print("|---|---|---|" + "---|" * len(SCORES))
    for set_name in args.only:
        recipe_name, names, data = SETS[set_name]
        recipe = load_recipe(recipe_name, [value.format(root=root) for value in data]
                             + [f"training.feature_cache_dir={Path(args.cache).resolve()}",
                                "rank.max_train_examples=null"])  # the whole split, sampled here
        features = whole_features(recipe, names, Path(args.cache))
        whole = {score: [SCORES[score].compute(features[name]) for name in names] for score in SCORES}
        total = len(next(iter(features.values())).train_labels)
        for size in [s for s in args.sizes if s < total]:
            agree = {score: 0 for score in SCORES}
            taus = {score: [] for score in SCORES}
            for draw in range(args.draws):
                rows = torch.randperm(total, generator=torch.Generator().manual_seed(draw))[:size]
                for score in SCORES:
                    values = [SCORES[score].compute(sampled(features[name], rows)) for name in names]
                    agree[score] += max(range(len(names)), key=values.__getitem__) == max(
                        range(len(names)), key=whole[score].__getitem__)
                    taus[score].append(kendalltau(values, whole[score]).statistic)
            cells = [f"{agree[s]}/{args.draws}, {sum(taus[s]) / len(taus[s]):+.2f}" for s in SCORES]
            print(f"| {set_name} | {total} | {size} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
