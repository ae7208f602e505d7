#!/usr/bin/env bash
# Issue 12 measurement: strategy auto and training.lr auto against the fixed settings recorded in
# BENCHMARKS.md, on the SST-2 4,000-sentence sample (issue 2's settings: 3 epochs, batch 32) and on
# hymenoptera (effnet_ants_bees; fine-tuning 5 epochs as in benchmarks/finetune.py).
# Usage: bash benchmarks/auto_choices.sh [OUT]   (SHARED_DATA defaults to ../shared/data)
set -euo pipefail
DATA=${SHARED_DATA:-../shared/data}
OUT=${1:-runs/auto_choices}
sst2=(--recipe minilm_sentiment --overwrite --set data.path="$DATA/sst2" data.text_column=sentence
      "data.label_names=[negative, positive]" data.max_train_samples=4000 training.epochs=3 training.batch_size=32)
ants=(--recipe effnet_ants_bees --overwrite --set data.path="$DATA/hymenoptera")
run() {  # NAME ARGS...: one `hf-transfer train`, its wall time and peak memory on stderr
  local name=$1; shift
  /usr/bin/time -f "$name wall %e s, peak RSS %M KB" hf-transfer train --quiet "$@" --output-dir "$OUT/$name"
}
# the fixed settings they are compared with: issue 2's (sst2_strategies.sh) and benchmarks/finetune.py's runs
run sst2_auto "${sst2[@]}" strategy.name=auto
run ants_auto "${ants[@]}" strategy.name=auto training.epochs=5
run sst2_full_lr_auto "${sst2[@]}" strategy.name=full training.lr=auto
run ants_full_lr_auto "${ants[@]}" strategy.name=full training.epochs=5 training.lr=auto
python - "$OUT" <<'PY'
import json, sys, pathlib
for run in sorted(pathlib.Path(sys.argv[1]).iterdir()):
    m = json.loads((run / "metrics.json").read_text())
    history = [f"{r['accuracy']:.4f}" for r in m["history"]]
    search = m.get("strategy_search") or {}
    found = (m.get("lr_finder") or {}).get("lr")
    print(f"{run.name:20s} best {m['eval']['accuracy']:.4f} (epoch {m['best_epoch']}) last {history[-1]} "
          f"history {history} strategy {m['strategy']} lr found {found} "
          f"rungs {[(r['strategy'], r['status'], r.get('accuracy'), r.get('seconds')) for r in search.get('rungs', [])]}")
PY
