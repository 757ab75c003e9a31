#!/usr/bin/env bash
# The main job on embedded data, end to end: train ComLoRA K=2 on SmolLM2-135M under DeepSpeed -> consolidate the
# ZeRO checkpoint into the validation winner -> evaluate the merged winner and the untouched base on held-out rows,
# with the majority label as a third baseline, and say whether the winner learned (launch/demo_report.py).
#   bash launch/demo.sh [OUTPUT_DIR] [extra train overrides ...]
#   DEMO_TASK=commonsense bash launch/demo.sh outputs/demo_commonsense    # the six commonsense tasks instead of SST-2
set -euo pipefail
cd "$(dirname "$0")/.."
TASK=${DEMO_TASK:-sst2}
case "$TASK" in
    sst2) CONFIG=launch/configs/demo.yaml; EVAL=(--tasks sst2 --max-new-tokens 8) ;;
    commonsense) CONFIG=launch/configs/demo_commonsense.yaml; EVAL=(--limit "${DEMO_EVAL_LIMIT:-20}") ;;
    *) echo "error: DEMO_TASK=$TASK: choose sst2 or commonsense" >&2; exit 2 ;;
esac
OUT=${1:-outputs/demo}
shift || true
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if python -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then unset DS_ACCELERATOR; fi

echo "== 1/3 train (deepspeed, ZeRO-2, $TASK) -> $OUT"
deepspeed launch/train.py --deepspeed ds_configs/zero2.json --config "$CONFIG" train.output_dir="$OUT" "$@"

echo "== 2/3 consolidate -> $OUT/export"
python launch/consolidate.py "$OUT/checkpoints" --out "$OUT/export" --overwrite

echo "== 3/3 evaluate the winner and the base on the held-out built-in rows"
for MODEL in winner base; do
    SOURCE=$OUT/export/merged
    [ "$MODEL" = base ] && SOURCE=smollm2-135m
    python launch/evaluate.py "$SOURCE" --task commonsense "${EVAL[@]}" --out "$OUT/eval/$MODEL" --choice \
        --predictions --overwrite --no-progress | tail -n +3
done

python launch/demo_report.py "$OUT"
echo -e "\ncheckpoints: $OUT/checkpoints\nmerged winner (transformers): $OUT/export/merged\nPEFT adapter:" \
    "$OUT/export/adapter\nreport: $OUT/export/report.md\nevaluation: $OUT/eval/"
