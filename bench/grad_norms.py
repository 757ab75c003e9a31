"""Where the gradient norm of a training step goes: each LoRA component and the selector, before clipping.

    python bench/grad_norms.py --out outputs/gradnorms --steps 60 -- <the run's config overrides>

Runs the real trainer (launch/train.py's Trainer, the DeepSpeed config of --deepspeed) for the first --steps
optimizer steps of a run and, before each optimizer step, reads every trainable tensor's full gradient with
DeepSpeed's ``safe_get_full_grad`` (any ZeRO stage). One JSON line per step: the global norm, the norm of each
component's A/B slices, the selector's, and each component's norm after the run's clipping
(``train.clip_scope``): global clipping scales every gradient by min(1, max_grad_norm / global norm), so a
large selector gradient shrinks the components' too; per_group clips each by its own norm. The run's schedule
is that of its full length (train.max_steps), so the first steps are those of the real run; it stops through
the trainer's SIGTERM path (checkpoint written in --out).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from environment import REPO  # first: the CPU accelerator, the offline hub, the repository on sys.path

from comlora_ds.training.clipping import clip_factor, full_grads, group_norms  # noqa: E402
from comlora_ds.config import load_config  # noqa: E402
from comlora_ds.training.engine import Trainer, TrainerCallback, exit_process  # noqa: E402


class GradNormRecorder(TrainerCallback):
    """Before clipping, every step: the norms of step_record, kept and appended to <out>/grad_norms.jsonl; asks the
    trainer to stop (checkpoint first) after ``steps`` steps."""

    def __init__(self, out: Path, steps: int):
        self.out, self.steps, self.records = out, steps, []

    def on_gradients(self, trainer, step: int) -> None:
        cfg = trainer.cfg
        r = {"step": step, **step_record(trainer.engine.module, cfg.adapter.num_components, cfg.train.max_grad_norm,
                                         cfg.clip_scope)}
        self.records.append(r)
        if trainer.rank == 0:
            with open(self.out / "grad_norms.jsonl", "a") as f:
                f.write(json.dumps(r) + "\n")
        if step >= self.steps - 1:
            trainer.request_stop()


def step_record(model, num_components: int, max_norm: float, clip_scope: str) -> dict:
    """This step's norms before clipping, and each component's norm after the clipping of ``clip_scope``."""
    norms = group_norms(full_grads(model), num_components)
    components, total = norms[:num_components], sum(n * n for n in norms) ** 0.5
    clipped = [n * clip_factor(n if clip_scope == "per_group" else total, max_norm) for n in components]
    return {"norm": total, "component_norm": components, "selector_norm": norms[num_components],
            "component_norm_clipped": clipped}


def summarize(records: list[dict], windows: list[tuple[int, int]]) -> list[str]:
    """Window means; "after clipping" is what the optimizer receives, as mean and min-max over the window:
    Adam undoes a constant scale of the gradient, not one that jumps from step to step."""
    mean = statistics.mean
    lines = ["| steps | global norm | per component | selector | selector share of norm² | "
             "per component after clipping, mean (min-max) |", "|---|---|---|---|---|---|"]
    for lo, hi in windows:
        rs = [r for r in records if lo <= r["step"] <= hi]
        if not rs:
            continue
        k = len(rs[0]["component_norm"])
        before = "/".join(f"{mean(r['component_norm'][c] for r in rs):.3g}" for c in range(k))
        clipped = [[r["component_norm_clipped"][c] for r in rs] for c in range(k)]
        after = " / ".join(f"{mean(v):.3g} ({min(v):.3g}-{max(v):.3g})" for v in clipped)
        lines.append(f"| {lo}-{hi} | {mean(r['norm'] for r in rs):.3g} | {before} | "
                     f"{mean(r['selector_norm'] for r in rs):.3g} | "
                     f"{mean(r['selector_norm'] ** 2 / r['norm'] ** 2 for r in rs):.3f} | {after} |")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="run folder (checkpoint, metrics.jsonl, grad_norms.jsonl)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--deepspeed", default=str(REPO / "ds_configs" / "zero2.json"))
    p.add_argument("--summary-only", action="store_true", help="print the table of an existing --out, no training")
    p.add_argument("overrides", nargs="*", help="run-config overrides, as for launch/train.py")
    args = p.parse_args()
    if args.summary_only:
        records = [json.loads(line) for line in (args.out / "grad_norms.jsonl").read_text().splitlines()]
        print("\n".join(summarize(records, _windows(max(r["step"] for r in records)))))
        return 0
    cfg = load_config(REPO / "launch" / "configs" / "demo_commonsense.yaml",
                      [*args.overrides, f"train.output_dir={args.out}", "train.save_steps=0", "train.resume=null"])
    trainer = Trainer(cfg, args.deepspeed, callbacks=[GradNormRecorder(args.out, args.steps)])
    trainer.train()
    trainer.close()
    if trainer.rank == 0:
        print("\n".join(summarize(trainer.callbacks[0].records, _windows(args.steps))))
    return 0


def _windows(steps: int) -> list[tuple[int, int]]:
    edges = [1, 11, 21, 41, 61, 101, 201, 501, 1001]
    return [(lo, hi - 1) for lo, hi in zip(edges, edges[1:]) if lo <= steps]


if __name__ == "__main__":
    exit_process(main())
