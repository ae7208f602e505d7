"""Fine-tuning against the frozen head and the probe, with and without the fine-tuning options (issue 11).

For each data set: the frozen default (`freeze_backbone`, the solver's head) and its probe
(scikit-learn's LogisticRegression with its defaults on the same cached features, as
frozen_heads.py), then each fine-tuning configuration of the set's modality below, each one
`hf-transfer train` run in its own process, once per seed. Every run appends one JSON line to
OUT/results.jsonl as it ends, so a long measurement keeps what it finished; `--table` prints the
markdown table from that file (the mean over seeds where there are several).

    python benchmarks/finetune.py [--data-root ../shared/data] [--out runs/finetune]
        [--only SET ...] [--configs NAME ...] [--seeds N ...] [--table]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from frozen_heads import SETS as FROZEN_SETS
from frozen_heads import probe_accuracy

REPO = Path(__file__).resolve().parents[1]
# name -> (recipe, data overrides); the image sets are frozen_heads.py's
SETS = {name: (recipe, data) for name, (recipe, data, _) in FROZEN_SETS.items()} | {
    "amazon_electronics": ("minilm_sentiment", ["data.path={root}/amazon_multidomain/electronics.jsonl", "data.text_column=text",
                                                "data.label_names=[negative, positive]", "data.validation_fraction=0.2"]),
}
# every image configuration: effnet_ants_bees's settings (AdamW, head lr 1e-3, backbone 1e-4, cosine,
# warmup 10%, batch 32), 5 epochs (10 overfit hymenoptera: BENCHMARKS.md, issue 3), the last epoch reported
FINE_TUNE_IMAGES = ["strategy.name=full", "training.epochs=5"]
# the head-first rows (images and text) were recorded before training.weight_interpolation auto mixed them halfway
# back (issue 11, sixth stop): named off, they run as they did then
UNMIXED = "training.weight_interpolation=null"
# every text configuration: minilm_sentiment's settings (AdamW lr 1e-4, linear, warmup 10%, batch 16), 3 epochs
FINE_TUNE_TEXT = ["training.epochs=3"]
CONFIGS = {
    "image": {
        "frozen": ["strategy.name=freeze_backbone"],
        "full": [*FINE_TUNE_IMAGES, "strategy.head_first=false"],
        "full_head_first": [*FINE_TUNE_IMAGES, "strategy.head_first=true", UNMIXED],
        # the pretrained weights move less: the head is already fitted, so fine-tuning only has to adjust
        "full_head_first_bn_frozen": [*FINE_TUNE_IMAGES, "strategy.head_first=true", UNMIXED,
                                      "strategy.norm_statistics=frozen"],
        "full_head_first_slow": [*FINE_TUNE_IMAGES, "strategy.head_first=true", UNMIXED, "training.lr=1e-4",
                                 "training.backbone_lr=2e-5"],
        "full_head_first_ema_ld": [*FINE_TUNE_IMAGES, "strategy.head_first=true", "training.ema_decay=0.99",
                                   "training.layer_decay=0.75"],
        "full_head_first_mix": [*FINE_TUNE_IMAGES, "strategy.head_first=true", UNMIXED, "data.augment.mixup=0.2",
                                "data.augment.cutmix=1.0"],
        # WiSE-FT at the paper's middle point: halfway between the fitted probe and the fine-tuned weights
        "full_head_first_wise": [*FINE_TUNE_IMAGES, "strategy.head_first=true", "training.weight_interpolation=0.5"],
        # issue 14: each precision named explicitly (auto picks bf16 on a CPU with AMX)
        **{f"{strategy}_{precision}": [*settings, f"training.mixed_precision={precision}"]
           for strategy, settings in (("frozen", ["strategy.name=freeze_backbone"]), ("full", [*FINE_TUNE_IMAGES, UNMIXED]))
           for precision in ("no", "bf16")},
    },
    "text": {
        "frozen": ["strategy.name=freeze_backbone"],
        "full": [*FINE_TUNE_TEXT, "strategy.name=full", "strategy.head_first=false"],
        "full_head_first": [*FINE_TUNE_TEXT, "strategy.name=full", "strategy.head_first=true", UNMIXED],
        # issue 14: how long a length-sorted window may be before accuracy suffers, and bf16 on the CPU
        **{f"full_window{w}": [*FINE_TUNE_TEXT, "strategy.name=full", f"data.length_window={w}"] for w in (1, 4, 16, 50)},
        "full_window50_bf16": [*FINE_TUNE_TEXT, "strategy.name=full", "data.length_window=50", "training.mixed_precision=bf16"],
        # the default window (16) in each precision, named explicitly so the rows do not depend on what auto picks
        **{f"{strategy}_{precision}": [*FINE_TUNE_TEXT, f"strategy.name={name}", f"training.mixed_precision={precision}"]
           for strategy, name in (("frozen", "freeze_backbone"), ("full", "full")) for precision in ("no", "bf16")},
        # issue 11: an average of the weights and layer-wise rate decay (89.2% after one epoch of full SST-2)
        "full_ema_ld": [*FINE_TUNE_TEXT, "strategy.name=full", "training.ema_decay=0.999", "training.layer_decay=0.9"],
        "full_wise": [*FINE_TUNE_TEXT, "strategy.name=full", "training.weight_interpolation=0.5"],
        # issue 14: the token embeddings kept frozen (an eighth of a CPU step), against full in the same precision
        "full_frozen_embeddings_bf16": [*FINE_TUNE_TEXT, "strategy.name=full", "strategy.freeze_word_embeddings=true",
                                        "training.mixed_precision=bf16"],
        "lora": [*FINE_TUNE_TEXT, "strategy.name=lora", "training.lr=5e-4", "strategy.head_first=false"],
        "lora_recipe_lr": [*FINE_TUNE_TEXT, "strategy.name=lora", "strategy.head_first=false"],  # 1e-4, as full
        "lora_head_first": [*FINE_TUNE_TEXT, "strategy.name=lora", "training.lr=5e-4", "strategy.head_first=true"],
    },
}


def modality(name: str) -> str:
    return "image" if SETS[name][0] == "effnet_ants_bees" else "text"


def run(name: str, config: str, seed: int, data: list[str], out: Path, cache: Path) -> dict:
    recipe = SETS[name][0]
    command = [sys.executable, str(REPO / "scripts" / "train.py"), "--quiet", "--recipe", recipe,
               "--overwrite", "--output-dir", str(out / f"{config}_seed{seed}"), "--set", *data,
               f"training.feature_cache_dir={cache}", f"training.seed={seed}", *CONFIGS[modality(name)][config]]
    started = time.perf_counter()
    subprocess.run(command, check=True)
    metrics = json.loads((out / f"{config}_seed{seed}" / "metrics.json").read_text())
    return {
        "set": name, "config": config, "seed": seed, "wall_seconds": round(time.perf_counter() - started, 1),
        "train_seconds": metrics["train_seconds"], "best": metrics["eval"]["accuracy"], "best_epoch": metrics["best_epoch"],
        "last": metrics["history"][-1]["accuracy"], "history": [r["accuracy"] for r in metrics["history"]],
        "head_first": (metrics.get("head_first") or {}).get("accuracy"),
    }


def _cell(rows: list[dict]) -> str:
    """last (best, epoch); seconds -- or, over several seeds, the mean and spread of both."""
    if len(rows) == 1:
        row = rows[0]
        return f"**{100 * row['last']:.1f}%** ({100 * row['best']:.1f}%, {row['best_epoch']}); {row['train_seconds']:.0f} s"
    last, best = [100 * r["last"] for r in rows], [100 * r["best"] for r in rows]
    return (f"**{statistics.mean(last):.1f} ± {statistics.stdev(last):.1f}%** ({statistics.mean(best):.1f} ± "
            f"{statistics.stdev(best):.1f}%); {len(rows)} seeds; {statistics.mean(r['train_seconds'] for r in rows):.0f} s")


def table(results: Path) -> str:
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    by_set: dict[str, dict[str, list[dict]]] = {}
    for row in rows:
        by_set.setdefault(row["set"], {}).setdefault(row["config"], []).append(row)
    configs = [c for kind in CONFIGS.values() for c in kind if c != "frozen" and any(c in s for s in by_set.values())]
    configs = list(dict.fromkeys(configs))
    lines = ["| data | probe | freeze_backbone (solver) | " + " | ".join(f"{c}: last (best, epoch)" for c in configs) + " |",
             "|---|---|---|" + "---|" * len(configs)]
    for name, found in by_set.items():
        cells = [name, f"{100 * found['probe'][0]['best']:.1f}%" if "probe" in found else "",
                 f"{100 * found['frozen'][0]['last']:.1f}%" if "frozen" in found else ""]
        cells += [_cell(found[config]) if config in found else "" for config in configs]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data-root", default=os.environ.get("HF_TRANSFER_SHARED_DATA", "../shared/data"))
    parser.add_argument("--out", default="runs/finetune")
    parser.add_argument("--only", nargs="*", default=[name for name in SETS if modality(name) == "image"])
    parser.add_argument("--configs", nargs="*", default=None, help="default: every configuration of the set's modality")
    parser.add_argument("--seeds", nargs="*", type=int, default=[42])
    parser.add_argument("--table", action="store_true", help="print the table of what OUT/results.jsonl holds, and stop")
    args = parser.parse_args()
    out_root, root = Path(args.out), Path(args.data_root).resolve()
    results = out_root / "results.jsonl"
    if args.table:
        print(table(results))
        return
    out_root.mkdir(parents=True, exist_ok=True)
    for name in args.only:
        recipe, data = SETS[name][0], [value.format(root=root) for value in SETS[name][1]]
        out, cache = out_root / name, out_root / name / "cache"
        for config in args.configs or list(CONFIGS[modality(name)]):
            for seed in [args.seeds[0]] if config == "frozen" else args.seeds:
                row = run(name, config, seed, data, out, cache)
                if config == "frozen":  # the probe reads the features the frozen run cached
                    probe = probe_accuracy(recipe, [*data, f"training.feature_cache_dir={cache}"], cache)
                    with results.open("a") as file:
                        file.write(json.dumps({"set": name, "config": "probe", "best": probe, "last": probe}) + "\n")
                with results.open("a") as file:
                    file.write(json.dumps(row) + "\n")
                print(json.dumps(row), flush=True)
    print(table(results))


if __name__ == "__main__":
    sys.exit(main())
