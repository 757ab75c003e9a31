"""Does the selector learn which component is better, and which knob moves the components apart? The same short
ComLoRA K=2 run over several seeds under named settings, each a few run-config overrides:

    python bench/selector_signal.py --out outputs/selector_signal                      # issue 14: old vs new, 5 seeds
    python bench/selector_signal.py --out outputs/selector_signal --chunk-minutes 30   # resumable chunks
    python bench/selector_signal.py --out outputs/selector_signal --report docs/results.md
    python bench/selector_signal.py --out outputs/knobs --config launch/configs/demo.yaml --tag knobs \\
        --settings paper top1 eta_constant noise0 sel_lr10 init_orthogonal init_shared --seeds 1 2 3 \\
        --archive docs/runs/knobs --report docs/results.md                               # issue 27: the knobs

Each run is ``launch/train.py`` with --config (default the commonsense demo, ``launch/configs/demo_commonsense.yaml``;
``demo.yaml`` is the SST-2 demo): after training the trainer scores the validation split with every component and
the selector (``validation.json``). Per run the page shows how far apart the components ended (relative distance
and cosine of their weight updates), whether they are distinguishable on validation (|mean loss difference| > 2
paired SE), whether the selector's winner is the lowest-validation-loss component, the per-sample agreement rate
(selector's top component = the sample's lowest-loss component), the centred Spearman correlation of sims and -loss,
and the last training window's target-order rate (how often the noisy pairwise target orders the pair as the
noise-free losses do). Several drivers may share one --out (one per core): each run folder is locked. With
--archive each finished run's numbers are kept there (small enough to commit), and the report reads them.
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
from grid import REPO, Budget, archive_run, check_archive_settings, claim, is_archived, run_chunk, stage  # noqa: E402
from reproduce_report import compose_page  # noqa: E402

from comlora_ds.config import load_config  # noqa: E402

SETTINGS = {     # name: (run-config overrides, label)
    "old": (["comlora.loss_reduction=mean", "train.clip_scope=global"], "old: per-token mean target, global clipping"),
    "new": (["comlora.loss_reduction=sum", "train.clip_scope=per_group"],
            "new: summed target (eq. 4/6), per-group clipping"),
    "lm_sum": (["comlora.loss_reduction=sum", "train.clip_scope=per_group", "comlora.lm_reduction=sum"],
               "new, and L_LM / L_align summed too (lm_reduction=sum)"),
    "paper": ([], "defaults: exponential eta, top_n = K, noise 0.1, selector at the run's lr, kaiming init"),
    "top1": (["comlora.top_n=1"], "top_n = 1: L_align trains only the selector's top component per sample"),
    "eta_constant": (["comlora.annealing=constant"], "eta = 1 from the first step (annealing=constant)"),
    "eta_linear": (["comlora.annealing=linear"], "eta = t / T (annealing=linear)"),
    "noise0": (["comlora.noise=0"], "no noise on the pairwise target (noise=0)"),
    "noise1": (["comlora.noise=1.0"], "noise 1.0 on the pairwise target"),
    "sel_lr10": (["comlora.selector_learning_rate=1e-2"], "selector lr 1e-2 (10x the demo's 1e-3)"),
    "init_orthogonal": (["adapter.init=orthogonal"], "components' A orthogonal to each other (adapter.init)"),
    "init_shared": (["adapter.init=shared"], "one A draw shared by both components (adapter.init, a control)"),
}
TAG = "selector-signal"
TITLES = {TAG: "Selector signal: old vs new defaults, up to {seeds} seeds (issue 14)"}
KNOBS_TITLE = "Competition knobs ({tag}): what moves ComLoRA's components apart, up to {seeds} seeds (issue 27)"
DEFAULT_CONFIG = REPO / "launch" / "configs" / "demo_commonsense.yaml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="the run config every setting starts from")
    p.add_argument("--settings", nargs="+", default=["old", "new"], choices=list(SETTINGS))
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3, 4, 5])
    p.add_argument("--max-steps", type=int, default=60, help="0: the config's own train.max_steps")
    p.add_argument("--extra", nargs="*", default=[], help="more run-config overrides for every run")
    p.add_argument("--ds-config", default=str(REPO / "ds_configs" / "zero2.json"))
    p.add_argument("--chunk-minutes", type=float, default=0, help="stop (resumably) after this long; 0 = never")
    p.add_argument("--archive", type=Path, help="keep each finished run's numbers here (validation.json, the "
                                                "validations and diagnostics of metrics.jsonl); an archived run "
                                                "is not run again, and the report reads the archive")
    p.add_argument("--tag", default=TAG, help="the results page section this sweep writes")
    p.add_argument("--report", type=Path, help="write this benchmark's section of the results page here")
    p.add_argument("--report-only", action="store_true")
    return p.parse_args(argv)


def run_dir(args, setting: str, seed: int) -> Path:
    return args.out / f"{setting}-seed{seed}"


def train_command(args, setting: str, seed: int) -> list[str]:
    steps = [f"train.max_steps={args.max_steps}"] if args.max_steps else []
    overrides = [f"train.output_dir={run_dir(args, setting, seed)}", f"train.seed={seed}", *steps,
                 "train.save_steps=20", "train.save_total_limit=1", "train.resume=auto",
                 "logging.wandb_mode=disabled", "logging.winner_window=10", *SETTINGS[setting][0], *args.extra]
    return [sys.executable, str(REPO / "launch" / "train.py"), "--deepspeed", args.ds_config,
            "--config", str(args.config), *overrides]


def run_grid(args, budget: Budget) -> bool:
    if args.archive:
        check_archive_settings(args.archive, {"config": args.config.name, "max_steps": args.max_steps,
                                              "extra": args.extra, "ds_config": Path(args.ds_config).name})
    for seed in args.seeds:
        for setting in args.settings:
            folder = run_dir(args, setting, seed)
            if is_archived(args.archive, folder):
                continue
            with claim(folder) as mine:
                if not mine:
                    continue
                if not stage(train_command(args, setting, seed), folder / "validation.json", budget,
                             args.out / "logs" / f"{folder.name}.log"):
                    return False
                if args.archive:
                    archive_run(folder, args.archive / folder.name)
    return True


def last_window(folder: Path) -> dict | None:
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    windows = [r["selector_diagnostics"] for r in records if "selector_diagnostics" in r]
    return windows[-1] if windows else None


def competition(validation: dict) -> dict:
    """Over the component pairs: mean update distance and cosine, mean |loss difference| and paired SE, and whether
    the lowest-loss component is distinguishable from every other one (None where validation.json predates them)."""
    pairs = validation.get("loss_difference")
    if not pairs:
        return {}
    best = validation["lowest_loss_component"]
    updates = validation.get("update_divergence") or {}
    return {"distance": statistics.mean(d["relative_distance"] for d in updates.values()) if updates else None,
            "cosine": statistics.mean(d["cosine"] for d in updates.values()) if updates else None,
            "gap": statistics.mean(abs(d["mean"]) for d in pairs.values()),
            "se": statistics.mean(d["paired_se"] for d in pairs.values()),
            "distinguishable": all(d["distinguishable"] for pair, d in pairs.items()
                                   if str(best) in pair.split("-"))}


def collect(args, setting: str) -> list[dict]:
    rows = []
    for seed in args.seeds:
        folder = run_dir(args, setting, seed)
        if args.archive and is_archived(args.archive, folder):
            folder = args.archive / folder.name
        path = folder / "validation.json"
        if path.exists():
            validation = json.loads(path.read_text())
            rows.append({"seed": seed, **validation, "window": last_window(folder), **competition(validation)})
    return rows


def _mean_sd(values: list[float | None], scale: float = 1.0, digits: int = 1) -> str:
    values = [v * scale for v in values if v is not None]
    if not values:
        return "-"
    sd = f" +- {statistics.stdev(values):.{digits}f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.{digits}f}{sd}"


def _count(rows: list[dict], hit) -> str:
    return f"{sum(bool(hit(r)) for r in rows)} / {len(rows)}" if rows else "-"


def _number(value: float | None, digits: int, scale: float = 1.0, sign: str = "") -> str:
    return "-" if value is None else f"{value * scale:{sign}.{digits}f}"


def _describe(args) -> str:
    cfg = load_config(args.config)
    data = (f"built-in {', '.join(cfg.data.builtin_tasks)} rows" if cfg.data.builtin_tasks
            else f"{len(cfg.data.train_files)} training file(s)")
    steps = args.max_steps or cfg.train.max_steps
    return (f"`{args.config.name}` ({cfg.model.name_or_path}, {data}, {cfg.data.val_size}-row validation split, "
            f"ComLoRA K={cfg.adapter.num_components} r={cfg.adapter.rank}, lr {cfg.train.learning_rate:g}, "
            f"micro-batch {cfg.train.micro_batch_size}), {steps} optimizer steps, one rank")


def section(args) -> str:
    lines = [TITLES.get(args.tag, KNOBS_TITLE).format(tag=args.tag, seeds=len(args.seeds)), "",
             f"Measured {time.strftime('%Y-%m-%d')} on {machine()} with `{_command(args)}`: {_describe(args)}. "
             "Only the settings below differ. Update distance = ||dW_0 - dW_1||_F / mean ||dW_k||_F over every "
             "adapted layer (0: twins, 1.41: unrelated updates of equal norm), cosine of the two updates; "
             "distinguishable: the lowest-validation-loss component's mean loss differs from the other's by more "
             "than 2 paired SE over the validation rows. `winner = lowest` counts the runs whose selector winner "
             "(argmax of the accumulated validation sims) is the component with the lowest validation loss, overall "
             "and among the distinguishable runs; per-sample agreement is the share of validation rows whose "
             "top-scored component has that row's lowest loss (chance 50%); Spearman is sims vs -loss, each centred "
             "per row; the target-order rate is the last training window's share of rows whose *noisy* pairwise "
             "target orders the two components as their noise-free losses do.", "",
             "| setting | runs | distinguishable | winner = lowest | ... where distinguishable | update distance | "
             "update cosine | val. loss gap | paired SE | per-sample agreement % | Spearman | target-order rate % "
             "(last window) | val. loss of the better component |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    per_run = ["", "Per run:", "", "| setting | seed | val. loss comp 0 / comp 1 | difference (0 - 1) +- SE | "
               "distinguishable | update distance | cosine | selector winner | lowest | agreement % | Spearman | "
               "target-order % |", "|---|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for setting in args.settings:
        rows = collect(args, setting)
        if not rows:
            continue
        known = [r for r in rows if "distinguishable" in r]
        apart = [r for r in known if r["distinguishable"]]
        lines.append(f"| {SETTINGS[setting][1]} | {len(rows)} | {_count(known, lambda r: r['distinguishable'])} | "
                     f"{_count(rows, lambda r: r['selector_winner_is_lowest_loss'])} | "
                     f"{_count(apart, lambda r: r['selector_winner_is_lowest_loss'])} | "
                     f"{_mean_sd([r.get('distance') for r in rows], digits=3)} | "
                     f"{_mean_sd([r.get('cosine') for r in rows], digits=3)} | "
                     f"{_mean_sd([abs(r['mean_loss'][0] - r['mean_loss'][1]) for r in rows], digits=4)} | "
                     f"{_mean_sd([r.get('se') for r in rows], digits=4)} | "
                     f"{_mean_sd([r['selector_agreement_rate'] for r in rows], 100)} | "
                     f"{_mean_sd([r['selector_rank_correlation'] for r in rows], digits=3)} | "
                     f"{_mean_sd([(r['window'] or {}).get('target_order_rate') for r in rows], 100)} | "
                     f"{_mean_sd([min(r['mean_loss']) for r in rows], digits=4)} |")
        for r in rows:
            pair = (r.get("loss_difference") or {}).get("0-1")
            difference = "-" if pair is None else f"{pair['mean']:+.4f} +- {pair['paired_se']:.4f}"
            apart_here = "-" if "distinguishable" not in r else ("yes" if r["distinguishable"] else "no")
            per_run.append(f"| {setting} | {r['seed']} | {r['mean_loss'][0]:.4f} / {r['mean_loss'][1]:.4f} | "
                           f"{difference} | {apart_here} | {_number(r.get('distance'), 3)} | "
                           f"{_number(r.get('cosine'), 3)} | {r['winner']} | {r['lowest_loss_component']} | "
                           f"{100 * r['selector_agreement_rate']:.1f} | "
                           f"{_number(r['selector_rank_correlation'], 3)} | "
                           f"{_number((r['window'] or {}).get('target_order_rate'), 1, 100)} |")
    return "\n".join(["## " + lines[0], *lines[1:], *per_run])


def _command(args) -> str:
    parts = ["python bench/selector_signal.py", f"--out {args.out}"]
    if args.config != DEFAULT_CONFIG:
        parts.append(f"--config {args.config.relative_to(REPO) if args.config.is_relative_to(REPO) else args.config}")
    parts += [f"--settings {' '.join(args.settings)}", f"--seeds {' '.join(map(str, args.seeds))}",
              f"--max-steps {args.max_steps}"]
    parts += [f"--extra {' '.join(args.extra)}"] if args.extra else []
    parts += [f"--tag {args.tag}"] if args.tag != TAG else []
    parts += [f"--archive {args.archive}"] if args.archive else []
    return " ".join([*parts, f"--report {args.report}"])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.config = args.config.absolute()
    if not run_chunk(args, run_grid):
        return
    if args.report:
        old = args.report.read_text() if args.report.exists() else ""
        args.report.write_text(compose_page(old, args.tag, section(args)))
        print(f"wrote {args.report}")


if __name__ == "__main__":
    main()
