"""Image fine-tuning against the frozen head and the probe, with and without the fine-tuning options (issue 11).

For each data set: the frozen default (`freeze_backbone`, the solver's head) and its probe
(scikit-learn's LogisticRegression with its defaults on the same cached features, as
frozen_heads.py), then each fine-tuning configuration below, each one `hf-transfer train` run in
its own process. Every run appends one JSON line to OUT/results.jsonl as it ends, so a long
measurement keeps what it finished; `--table` prints the markdown table from that file.

    python benchmarks/finetune_images.py [--data-root ../shared/data] [--out runs/finetune_images]
        [--only SET ...] [--configs NAME ...] [--table]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from frozen_heads import SETS, probe_accuracy

REPO = Path(__file__).resolve().parents[1]
IMAGE_SETS = [name for name, (recipe, _, _) in SETS.items() if recipe == "effnet_ants_bees"]
# every fine-tuning configuration: effnet_ants_bees's settings (AdamW, head lr 1e-3, backbone 1e-4, cosine,
# warmup 10%, batch 32), 5 epochs (10 overfit hymenoptera: BENCHMARKS.md, issue 3), the last epoch reported
FINE_TUNE = ["strategy.name=full", "training.epochs=5"]
CONFIGS = {
    "frozen": ["strategy.name=freeze_backbone"],
    "full": [*FINE_TUNE, "strategy.head_first=false"],
    "full_head_first": [*FINE_TUNE, "strategy.head_first=true"],
    # the pretrained weights move less: the head is already fitted, so fine-tuning only has to adjust
    "full_head_first_slow": [*FINE_TUNE, "strategy.head_first=true", "training.lr=1e-4", "training.backbone_lr=2e-5"],
    "full_head_first_slow_ema": [*FINE_TUNE, "strategy.head_first=true", "training.lr=1e-4", "training.backbone_lr=2e-5",
                                 "training.ema_decay=0.99"],
    "full_head_first_ema_ld": [*FINE_TUNE, "strategy.head_first=true", "training.ema_decay=0.99", "training.layer_decay=0.75"],
    "full_head_first_mix": [*FINE_TUNE, "strategy.head_first=true", "data.augment.mixup=0.2", "data.augment.cutmix=1.0"],
}


def run(name: str, config: str, data: list[str], out: Path, cache: Path) -> dict:
    command = [sys.executable, str(REPO / "scripts" / "train.py"), "--quiet", "--recipe", "effnet_ants_bees",
               "--overwrite", "--output-dir", str(out / config), "--set", *data,
               f"training.feature_cache_dir={cache}", *CONFIGS[config]]
    started = time.perf_counter()
    subprocess.run(command, check=True)
    metrics = json.loads((out / config / "metrics.json").read_text())
    return {
        "set": name, "config": config, "wall_seconds": round(time.perf_counter() - started, 1),
        "train_seconds": metrics["train_seconds"], "best": metrics["eval"]["accuracy"], "best_epoch": metrics["best_epoch"],
        "last": metrics["history"][-1]["accuracy"], "history": [r["accuracy"] for r in metrics["history"]],
        "head_first": (metrics.get("head_first") or {}).get("accuracy"),
    }


def table(results: Path) -> str:
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    by_set: dict[str, dict[str, dict]] = {}
    for row in rows:
        by_set.setdefault(row["set"], {})[row["config"]] = row
    configs = [c for c in CONFIGS if c not in ("frozen", "probe") and any(c in s for s in by_set.values())]
    lines = ["| data | probe | freeze_backbone (solver) | " + " | ".join(f"{c}: last (best, epoch)" for c in configs) + " |",
             "|---|---|---|" + "---|" * len(configs)]
    for name, found in by_set.items():
        cells = [name, f"{100 * found['probe']['best']:.1f}%" if "probe" in found else "",
                 f"{100 * found['frozen']['last']:.1f}%" if "frozen" in found else ""]
        for config in configs:
            row = found.get(config)
            cells.append(f"**{100 * row['last']:.1f}%** ({100 * row['best']:.1f}%, {row['best_epoch']}); "
                         f"{row['train_seconds']:.0f} s" if row else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data-root", default=os.environ.get("HF_TRANSFER_SHARED_DATA", "../shared/data"))
    parser.add_argument("--out", default="runs/finetune_images")
    parser.add_argument("--only", nargs="*", default=IMAGE_SETS)
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS))
    parser.add_argument("--table", action="store_true", help="print the table of what OUT/results.jsonl holds, and stop")
    args = parser.parse_args()
    out_root, root = Path(args.out), Path(args.data_root).resolve()
    results = out_root / "results.jsonl"
    if args.table:
        print(table(results))
        return
    out_root.mkdir(parents=True, exist_ok=True)
    for name in args.only:
        data = [value.format(root=root) for value in SETS[name][1]]
        out, cache = out_root / name, out_root / name / "cache"
        for config in args.configs:
            row = run(name, config, data, out, cache)
            if config == "frozen":  # the probe reads the features the frozen run cached
                probe = probe_accuracy("effnet_ants_bees", [*data, f"training.feature_cache_dir={cache}"], cache)
                with results.open("a") as file:
                    file.write(json.dumps({"set": name, "config": "probe", "best": probe, "last": probe}) + "\n")
            with results.open("a") as file:
                file.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    print(table(results))


if __name__ == "__main__":
    sys.exit(main())
