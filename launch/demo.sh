#!/usr/bin/env bash
# The main job on the embedded demo, end to end: train ComLoRA K=2 on SmolLM2-135M with the built-in
# commonsense data -> consolidate the ZeRO checkpoint into the validation winner -> evaluate the
# merged winner and the untouched base on held-out built-in test rows.
#   bash launch/demo.sh [OUTPUT_DIR] [extra train overrides ...]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-outputs/demo}
shift || true
LIMIT=${DEMO_EVAL_LIMIT:-20}
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if python -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then unset DS_ACCELERATOR; fi

echo "== 1/3 train (deepspeed, ZeRO-2) -> $OUT"
deepspeed launch/train.py --deepspeed ds_configs/zero2.json --config launch/configs/demo.yaml \
    train.output_dir="$OUT" "$@"

echo "== 2/3 consolidate -> $OUT/export"
python launch/consolidate.py "$OUT/checkpoints" --out "$OUT/export" --overwrite

echo "== 3/3 evaluate ($LIMIT held-out rows per task)"
python launch/evaluate.py "$OUT/export/merged" --task commonsense --limit "$LIMIT" --out "$OUT/eval/winner" \
    --choice --overwrite --no-progress
python launch/evaluate.py smollm2-135m --task commonsense --limit "$LIMIT" --out "$OUT/eval/base" \
    --choice --overwrite --no-progress

python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
base = json.loads((out / "eval/base/results.json").read_text())
win = json.loads((out / "eval/winner/results.json").read_text())
report = json.loads((out / "export/report.json").read_text())
tasks = list(win["metrics"]["per_task"])
rows = (("SmolLM2-135M base (zero-shot)", base), (f"ComLoRA K=2 winner (component {report['winner']})", win))
for title, key, average in (("generation + first answer keyword", "accuracy", "average"),
                            ("rank classification: the option with the highest likelihood", "choice_accuracy",
                             "choice_average")):
    print(f"\naccuracy (%) on {len(tasks)} x {win['setting']['limit']} held-out built-in test rows, {title}:")
    print("\n| model | " + " | ".join(tasks) + " | average |")
    print("|---|" + "---|" * (len(tasks) + 1))
    for name, res in rows:
        m = res["metrics"]
        print(f"| {name} | " + " | ".join(f"{m['per_task'][t][key]:.1f}" for t in tasks) + f" | {m[average]:.1f} |")
print("\n(the base model was never taught the answer format, so it rarely writes an answer keyword: its"
      " generation score is near 0; rank classification compares the two on the same footing)")
print(f"\ncheckpoints: {out}/checkpoints\nmerged winner (transformers): {out}/export/merged"
      f"\nPEFT adapter: {out}/export/adapter\nreport: {out}/export/report.md\nevaluation: {out}/eval/")
PY
