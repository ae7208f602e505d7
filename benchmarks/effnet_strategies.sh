#!/usr/bin/env bash
# Issue 3 measurement: the offline effnet_ants_bees recipe (EfficientNet-Lite0, packaged ImageNet
# weights) with each strategy, validation accuracy on all 153 hymenoptera val images and wall time.
# Usage: bash benchmarks/effnet_strategies.sh [OUT]
set -euo pipefail
OUT=${1:-runs/effnet_strategies}
for strategy in freeze_backbone partial full; do
  /usr/bin/time -f "$strategy wall %e s, peak RSS %M KB" \
    hf-transfer train --recipe effnet_ants_bees --overwrite --set strategy.name="$strategy" --output-dir "$OUT/$strategy"
done
python - "$OUT" <<'PY'
import json, sys, pathlib
for run in sorted(pathlib.Path(sys.argv[1]).iterdir()):
    m = json.loads((run / "metrics.json").read_text())
    print(f"{run.name:16s} val acc {m['eval']['accuracy']:.4f} ({m['eval']['num_samples']} images)  macro F1 "
          f"{m['eval']['f1_macro']:.4f}  trainable {m['trainable_parameters']:,}/{m['total_parameters']:,}  "
          f"train {m['train_seconds']} s")
PY
