"""Accuracy against speed for `hf-transfer optimize` on one finished run (issue 16).

Each setting is one `hf-transfer optimize RUN ... --output-dir OUT/<setting>` process, which measures the
original model and the optimised one in that same process (accuracy on the run's validation split, the
median latency at batch 1 and 32), so every speed-up is a ratio of two sides run one after the other.
The settings: torch int8, ONNX Runtime float, ONNX Runtime int8, then for each pruning ratio the pruned and
recovered model in PyTorch float and through ONNX Runtime int8. Every finished setting appends one JSON
line to OUT/results.jsonl (a long measurement keeps what it finished); at the end the script prints the
markdown table and draws OUT/curve.png (validation accuracy against batch-32 samples/s speed-up).

    python benchmarks/optimize_curve.py RUN --out runs/optimize_curve [--ratios 0.2 0.4 ...]
        [--recovery-epochs N] [--title TITLE] [--only SETTING ...] [--table]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SERVING = {  # name -> optimize flags besides pruning
    "pytorch": [],
    "torch_int8": ["--quantize", "int8"],
    "onnx": ["--onnx"],
    "onnx_int8": ["--onnx", "--quantize", "int8"],
}
PRUNED_SERVING = ("pytorch", "onnx_int8")


def settings(ratios: list[float], recovery_epochs: int) -> dict[str, list[str]]:
    """Setting name -> optimize flags: each serving without pruning, then each ratio pruned and recovered."""
    chosen = {name: flags for name, flags in SERVING.items() if flags}
    for ratio in ratios:
        pruning = ["--prune", f"{ratio:g}", "--recovery-epochs", str(recovery_epochs)]
        for serving in PRUNED_SERVING:
            chosen[f"prune{ratio:g}_{serving}"] = [*pruning, *SERVING[serving]]
    return chosen


def measure(run: Path, name: str, flags: list[str], out: Path) -> dict | None:
    """One setting's row; None when hf-transfer refuses it for this run (torch int8 on an image run)."""
    folder = out / name
    command = [sys.executable, "-m", "hf_transfer.cli", "optimize", str(run), *flags, "--output-dir", str(folder),
               "--overwrite", "--quiet"]
    started = time.perf_counter()
    finished = subprocess.run(command, cwd=REPO)
    if finished.returncode == 2:  # hf-transfer refused the setting for this run (its message is above)
        return None
    finished.check_returncode()
    manifest = json.loads((folder / "optimized.json").read_text())
    latency = manifest["latency_ms"]
    return {
        "setting": name, "flags": " ".join(flags), "wall_seconds": round(time.perf_counter() - started, 1),
        "accuracy_before": manifest["accuracy"]["before"], "accuracy_after": manifest["accuracy"]["after"],
        "same_label_share": manifest["accuracy"]["same_label_share"],
        "size_mb_before": manifest["size_bytes"]["before"] / 1e6, "size_mb_after": manifest["size_bytes"]["after"] / 1e6,
        **{f"batch{size}_ms_{side}": latency[f"batch_{size}"][side] for size in (1, 32) for side in ("before", "after")},
        "recovery_last_epoch": (manifest.get("recovery") or {}).get("last_epoch"),
    }


def speed_up(row: dict, size: int) -> float:
    return row[f"batch{size}_ms_before"] / row[f"batch{size}_ms_after"]


def table(rows: list[dict]) -> str:
    lines = ["| setting | validation accuracy before -> after | labels kept | size MB before -> after "
             "| batch 1 ms before -> after (speed-up) | batch 32 ms before -> after (speed-up) |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        cells = [f"`{row['flags']}`",
                 f"{100 * row['accuracy_before']:.1f}% -> {100 * row['accuracy_after']:.1f}%",
                 f"{100 * row['same_label_share']:.1f}%",
                 f"{row['size_mb_before']:.1f} -> {row['size_mb_after']:.1f}",
                 *(f"{row[f'batch{size}_ms_before']:,.0f} -> {row[f'batch{size}_ms_after']:,.0f} "
                   f"({speed_up(row, size):.2f}x)" for size in (1, 32))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ratio_of(row: dict) -> float:
    flags = row["flags"].split()
    return float(flags[flags.index("--prune") + 1]) if "--prune" in flags else 0.0


def serving_of(row: dict) -> str:
    return row["setting"].split("_", 1)[1] if row["setting"].startswith("prune") else row["setting"]


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Accuracy against batch-32 speed-up: one line per serving through its pruning ratios, the original at 1x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 4.4))
    original = sum(row["accuracy_before"] for row in rows) / len(rows)
    for serving in SERVING:
        points = sorted((ratio_of(row), speed_up(row, 32), 100 * row["accuracy_after"])
                        for row in rows if serving_of(row) == serving)
        if serving == "pytorch":
            points = [(0.0, 1.0, 100 * original), *points]
        if not points:
            continue
        axes.plot([p[1] for p in points], [p[2] for p in points], marker="o", label=serving.replace("_", " "))
        for ratio, x, y in points:
            if ratio:
                axes.annotate(f"prune {ratio:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    axes.axhline(100 * original - 1, color="grey", linestyle=":", linewidth=1, label="original - 1 point")
    axes.axvline(2.0, color="grey", linestyle="--", linewidth=1, label="2x")
    axes.set_xlabel("samples/s at batch 32, relative to the original PyTorch model")
    axes.set_ylabel("validation accuracy (%)")
    axes.set_title(title, fontsize=9)
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a finished run's output folder")
    parser.add_argument("--out", type=Path, default=Path("runs/optimize_curve"))
    parser.add_argument("--ratios", nargs="*", type=float, default=[0.2, 0.4, 0.6])
    parser.add_argument("--recovery-epochs", type=int, default=0)
    parser.add_argument("--title", default=None, help="the curve's title (default: the run folder's name)")
    parser.add_argument("--only", nargs="*", default=None, help="setting names (default: all)")
    parser.add_argument("--table", action="store_true", help="print the table and curve of OUT/results.jsonl, and stop")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.jsonl"
    if not args.table:
        for name, flags in settings(args.ratios, args.recovery_epochs).items():
            if args.only is None or name in args.only:
                row = measure(args.run.resolve(), name, flags, args.out)
                if row is None:
                    continue
                with results.open("a") as handle:
                    handle.write(json.dumps(row) + "\n")
                print(json.dumps(row), flush=True)
    if not results.is_file():
        raise SystemExit(f"Nothing measured in {results.parent}.")
    by_setting = {row["setting"]: row for row in map(json.loads, results.read_text().splitlines())}  # the last wins
    rows = list(by_setting.values())
    print(table(rows))
    plot(rows, args.out / "curve.png", args.title or f"hf-transfer optimize on {args.run.name}")
    print(f"curve: {args.out / 'curve.png'}")


if __name__ == "__main__":
    main()
