#!/usr/bin/env bash
# Issue 2 measurement: offline MiniLM-L6 on a fixed, seeded 4,000-sentence sample of SST-2 train,
# evaluated on all 872 dev sentences, one run per strategy. Usage: bash benchmarks/sst2_strategies.sh [OUT]
set -euo pipefail
SST2=${SST2:-../shared/data/sst2}
OUT=${1:-runs/sst2_strategies}
common=(--recipe minilm_sentiment --overwrite --set data.path="$SST2" data.text_column=sentence
        "data.label_names=[negative, positive]" data.max_train_samples=4000 training.epochs=3 training.batch_size=32)
for setting in "freeze_backbone 5e-3" "lora 5e-4" "full 5e-5"; do
  set -- $setting
  /usr/bin/time -f "$1 wall %e s, peak RSS %M KB" \
    hf-transfer train "${common[@]}" strategy.name="$1" training.lr="$2" --output-dir "$OUT/$1"
done
python - "$OUT" <<'PY'
import json, sys, pathlib
for run in sorted(pathlib.Path(sys.argv[1]).iterdir()):
    m = json.loads((run / "metrics.json").read_text())
    print(f"{run.name:16s} dev acc {m['eval']['accuracy']:.4f}  macro F1 {m['eval']['f1_macro']:.4f}  "
          f"trainable {m['trainable_parameters']:,}/{m['total_parameters']:,}  train {m['train_seconds']} s")
PY
