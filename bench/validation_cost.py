"""What a validation pass during training (train.eval_steps) costs, as a share of the training time.

The real CLI (``launch/train.py``, one process, the shipped zero2.json) on a shipped run preset (default: the demo,
SmolLM2-135M ComLoRA K=2 on SST-2 with its 60 validation rows and micro-batch 8) with ``train.eval_steps``. Both
numbers come from the run's own metrics.jsonl: ``step_time`` of every optimizer step (the trainer restarts that clock
after a validation, so it is training only) and ``validation.seconds`` of every validation pass (the collective
scoring of all K components and the selector). The share is one pass over ``eval_steps`` training steps (the first step, with its warm-up, left out), from the
medians and from the minima (on a shared machine the minima are the least disturbed by other processes):

    share = pass seconds / (eval_steps x step seconds)

    python bench/validation_cost.py                               # demo preset, 20 steps, a pass every 5
    python bench/validation_cost.py --config defaults --max-steps 8 --eval-steps 4 --doc     # library defaults
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from environment import REPO  # noqa: E402
from launching import run_training  # noqa: E402
from reports import provenance, publish, table  # noqa: E402

SECTION = "Validation during training"
INTRO = """\
Script: `bench/validation_cost.py`. The real CLI (`launch/train.py`, one process, shipped `zero2.json`) on a
shipped run preset with `train.eval_steps`; step time and validation-pass time both from the run's own
`metrics.jsonl` (`step_time` excludes the validation passes; `validation.seconds` is one pass: every validation row
through all K components and the selector, all ranks, gathered). Share = pass / (eval_steps x step), from the
medians and from the minima, the first step (warm-up) left out."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="demo",
                   help="a shipped run preset, a YAML path, or 'defaults' (no preset: every field at its default)")
    p.add_argument("--eval-steps", type=int, default=5)
    p.add_argument("--max-steps", type=int, default=20)
    p.add_argument("--extra", nargs="*", default=[], help="more run-config overrides, key=value")
    p.add_argument("--doc", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(tempfile.mkdtemp(prefix="validation_cost_")) / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO),
           "WANDB_MODE": "disabled", "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    overrides = [f"train.output_dir={out}", f"train.max_steps={args.max_steps}", f"train.eval_steps={args.eval_steps}",
                 f"train.save_steps={args.max_steps}", "logging.report_to=[none]", *args.extra]
    config = args.config
    if config == "defaults":
        config = out.parent / "defaults.yaml"
        config.write_text("train: {}\n")
    cmd = [sys.executable, str(REPO / "launch" / "train.py"), "--config", str(config), *overrides]
    records, wall = run_training(cmd, env, out, timeout=7200)
    steps = [r["step_time"] for r in records if "step_time" in r and r["step"] > 1]
    passes = [r["validation"]["seconds"] for r in records if "validation" in r]
    rows_per_pass = next(r["validation"]["num_samples"] for r in records if "validation" in r)
    rows = []
    for name, pick in (("median", statistics.median), ("min", min)):   # min: the least disturbed by other load
        step, one_pass = pick(steps), pick(passes)
        rows.append([name, step, one_pass, one_pass / step,
                     *[f"{100 * one_pass / (every * step):.1f}%" for every in (args.eval_steps, 50, 200)]])
    body = "\n".join([
        provenance(), f"Run config `{args.config}`, {args.max_steps} steps, a pass every {args.eval_steps} "
        f"({len(passes)} passes of {rows_per_pass} rows; {len(steps)} steps timed); the whole run took {wall:.0f} s "
        f"(start-up, model load and the checkpoint included). Step times ranged {min(steps):.2f}-{max(steps):.2f} s, "
        f"passes {min(passes):.1f}-{max(passes):.1f} s.", "",
        table(["statistic", "step (s)", "pass (s)", "pass / step", f"share at eval_steps={args.eval_steps}",
               "share at eval_steps=50", "share at eval_steps=200"], rows)])
    publish(SECTION, INTRO, f"{args.config}, eval_steps {args.eval_steps}", body, args.doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
