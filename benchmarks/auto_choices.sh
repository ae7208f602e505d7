#!/usr/bin/env bash
# Issue 12 measurement: strategy auto and training.lr auto against fixed settings, on the SST-2
# 4,000-sentence sample (issue 2's settings: 3 epochs, batch 32) and on hymenoptera (effnet_ants_bees;
# fine-tuning 5 epochs as in benchmarks/finetune.py).
# Usage: bash benchmarks/auto_choices.sh [OUT] [strategy | lr | all]   (SHARED_DATA defaults to ../shared/data)
#   strategy: strategy auto, then each fixed strategy of its ladder run alone one after the other, as a user
#             choosing by hand would (no early stopping; lora at the ladder's 5x rate), on both data sets
#   lr:       training.lr auto with `full` on both data sets
set -euo pipefail
DATA=${SHARED_DATA:-../shared/data}
OUT=${1:-runs/auto_choices}
PART=${2:-all}
sst2=(--recipe minilm_sentiment --overwrite --set data.path="$DATA/sst2" data.text_column=sentence
      "data.label_names=[negative, positive]" data.max_train_samples=4000 training.epochs=3 training.batch_size=32)
ants=(--recipe effnet_ants_bees --overwrite --set data.path="$DATA/hymenoptera" training.epochs=5)
run() {  # NAME ARGS...: one `hf-transfer train`, its wall time and peak memory on stderr and in OUT/NAME.wall
  local name=$1; shift
  local started; started=$(date +%s.%N)
  /usr/bin/time -f "$name wall %e s, peak RSS %M KB" hf-transfer train --quiet "$@" --output-dir "$OUT/$name"
  python -c "import sys, time; print(round(time.time() - float(sys.argv[1]), 1))" "$started" > "$OUT/$name.wall"
}
mkdir -p "$OUT"
if [[ $PART == strategy || $PART == all ]]; then
  for set in sst2 ants; do
    declare -n args=$set
    run "${set}_auto" "${args[@]}" strategy.name=auto
    run "${set}_fixed_freeze_backbone" "${args[@]}" strategy.name=freeze_backbone
    lr=$([[ $set == sst2 ]] && echo 5e-4 || echo 5e-3)  # the ladder's lora rate: 5x the recipe's (1e-4; 1e-3)
    [[ $set == sst2 ]] && run "${set}_fixed_lora" "${args[@]}" strategy.name=lora training.lr=$lr  # a CNN has no LoRA targets
    run "${set}_fixed_partial" "${args[@]}" strategy.name=partial
    run "${set}_fixed_full" "${args[@]}" strategy.name=full
  done
fi
if [[ $PART == lr || $PART == all ]]; then
  run sst2_full_lr_auto "${sst2[@]}" strategy.name=full training.lr=auto
  run ants_full_lr_auto "${ants[@]}" strategy.name=full training.lr=auto
fi
python - "$OUT" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
walls = {}
for run in sorted(p for p in out.iterdir() if (p / "metrics.json").is_file()):
    m = json.loads((run / "metrics.json").read_text())
    history = [f"{r['accuracy']:.4f}" for r in m["history"]]
    search = m.get("strategy_search") or {}
    found = (m.get("lr_finder") or {}).get("lr")
    walls[run.name] = float((out / f"{run.name}.wall").read_text())
    print(f"{run.name:28s} best {m['eval']['accuracy']:.4f} (epoch {m['best_epoch']}) last {history[-1]} "
          f"wall {walls[run.name]:.0f} s strategy {m['strategy']} lr found {found}")
    for r in search.get("rungs", []):
        print(f"    {r['strategy']:16s} {r['status']:8s} accuracy {r.get('accuracy')} epochs {r.get('epochs')} "
              f"seconds {r.get('seconds')} {r.get('halted') or r.get('reason') or ''}")
for prefix in ("sst2", "ants"):
    fixed = {k: v for k, v in walls.items() if k.startswith(f"{prefix}_fixed_")}
    if fixed and f"{prefix}_auto" in walls:
        total = sum(fixed.values())
        print(f"{prefix}: strategy auto {walls[prefix + '_auto']:.0f} s against the fixed strategies one after the other "
              f"{total:.0f} s ({' + '.join(f'{v:.0f}' for v in fixed.values())}): {walls[prefix + '_auto'] / total:.2f}x")
PY
