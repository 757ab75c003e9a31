#!/usr/bin/env bash
# The GPU check on one GPU (bench/gpu_check.py): flash-attention 2 vs sdpa, step times, peak memory, ZeRO-2/3 runs,
# packed rows with flash-attention 2 (per-row losses vs padded), under 10 minutes; writes the "GPU check" section of
# docs/benchmarks.md. Exit code 1 when a correctness check fails.
#   bash bench/gpu_check.sh [more bench/gpu_check.py options]
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# The script's own budget (--budget-s, 540 s) skips parts that would start too late; this is the hard stop.
exec timeout --kill-after=20 600 python bench/gpu_check.py --doc "$@"
