"""The results page of bench/reproduce_commonsense.py: paper Table 3 and Table 10 shaped, plus curves."""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def _base_params(merged: Path) -> int:
    return sum(_file_params(shard) for shard in merged.glob("*.safetensors"))


def _file_params(path: Path) -> int:
    with safe_open(str(path), framework="pt") as f:
        return sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())


def _fmt(values: list[float], digits: int = 1) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _accuracies(results: dict, tasks, trained: list[str], key: str = "accuracy") -> dict[str, float]:
    """Per task, the average over all tasks, and the average over the tasks that had training rows."""
    per = results["metrics"]["per_task"]
    out = {t: per[t][key] for t in tasks if t in per}
    out["average"] = statistics.mean(out.values())
    out["trained_average"] = statistics.mean(out[t] for t in trained if t in out)
    return out


def _component_eval(folder: Path, k: int, winner: int) -> dict | None:
    return _load(folder / "eval" / ("winner" if k == winner else f"component_{k}") / "results.json")


def _plot_curves(args, variants, run_dir, path: Path) -> bool:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    drawn = False
    for variant in variants:
        for seed in args.seeds:
            metrics = run_dir(args, variant, seed) / "metrics.jsonl"
            if not metrics.exists():
                continue
            records = {}
            for line in metrics.read_text().splitlines():
                r = json.loads(line)
                if "component_loss" in r:
                    records[r["step"]] = r
            steps = sorted(records)
            k = len(records[steps[0]]["component_loss"]) if steps else 0
            for c in range(k):
                ys = [records[s]["component_loss"][c] for s in steps]
                smooth = [sum(ys[max(0, i - 19):i + 1]) / len(ys[max(0, i - 19):i + 1]) for i in range(len(ys))]
                label = f"{variant} s{seed}" + (f" comp {c}" if k > 1 else "")
                axes[0].plot(steps, smooth, label=label, linewidth=1)
                drawn = True
            windows = [(s, records[s]["winner_counts"]) for s in steps if "winner_counts" in records[s]]
            if k > 1 and windows:
                for c in range(k):
                    axes[1].plot([s for s, _ in windows], [w[c] / sum(w) for _, w in windows], marker="o",
                                 label=f"{variant} s{seed} comp {c}")
    axes[0].set(title="training LM loss per component (20-step mean)", xlabel="optimizer step", ylabel="loss",
                yscale="log")
    axes[1].set(title="share of samples whose selector argmax is the component", xlabel="optimizer step",
                ylabel="share per window", ylim=(0, 1))
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return drawn


def write_report(args, variants: dict, tasks: tuple, run_dir, commands: list[str]) -> None:
    lines = ["# Results", ""]
    from common import cpu_model

    device = (torch.cuda.get_device_name() + f" x {torch.cuda.device_count()}" if torch.cuda.is_available()
              else f"{cpu_model()}, {len(os.sched_getaffinity(0))} CPU cores, no GPU")
    lines += [f"Measured accuracy of the models this project trains. Machine: {device}, torch {torch.__version__}. "
              f"Written {time.strftime('%Y-%m-%d')} by:", "", "```bash",
              "python " + " ".join(sys.argv), "```", ""]
    model = Path(args.model).name
    lines += [f"## ComLoRA vs LoRA on {model} (commonsense, paper Table 3 at small scale)", "",
              f"Training: {args.max_steps or args.epochs} {'steps' if args.max_steps else 'epochs'}, micro-batch "
              f"{args.micro_batch} x accumulation {args.grad_accum}, lr {args.lr} (linear decay, 3% warm-up), "
              f"max length {args.max_length}, on the LLM-Adapters training rows of "
              f"{', '.join(Path(f).stem for f in args.train_files)} ({args.model}); 120 rows held out for "
              f"validation (seed 42). Seeds {args.seeds}. Test: the first "
              f"{args.eval_limit or 'all'} rows of each LLM-Adapters test set, greedy generation, first answer "
              "keyword (no keyword = wrong). Tasks without training rows here measure transfer; PIQA's answer keywords "
              "(solution1/solution2) never occur in these training rows, so its score mostly says whether a model "
              "happens to write them. \"Average of trained tasks\" leaves such tasks out.", ""]
    trained = [t for t in tasks if t in {Path(f).stem for f in args.train_files}]
    header = ["method", "Params (%) L/S", *tasks, "average", "average of trained tasks", "validation loss"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    base = _load(args.out / "base" / "eval" / "results.json")
    if base:
        for name, key in [("zero-shot", "accuracy"), ("zero-shot, rank classification", "choice_accuracy")]:
            if key in next(iter(base["metrics"]["per_task"].values())):
                acc = _accuracies(base, tasks, trained, key)
                lines.append(f"| {model} {name} | 0/0 | "
                             + " | ".join(f"{acc[t]:.1f}" for t in [*tasks, "average", "trained_average"]) + " | – |")
    component_rows = []
    for variant in variants:
        scores: dict[str, list[float]] = {}
        share = ""
        for seed in args.seeds:
            folder = run_dir(args, variant, seed)
            report = _load(folder / "export" / "report.json")
            winner_eval = _load(folder / "eval" / "winner" / "results.json")
            if not report or not winner_eval:
                continue
            for key, value in _accuracies(winner_eval, tasks, trained).items():
                scores.setdefault(key, []).append(value)
            scores.setdefault("val_loss", []).append(report["validation"]["mean_loss"][report["winner"]])
            total = _base_params(folder / "export" / "merged")
            component = folder / "export" / "components" / "component_0" / "adapter_model.safetensors"
            adapters = _file_params(component) * report["num_components"]
            selector = report["tensors"]["elements"] - adapters
            share = f"{100 * adapters / total:.2f}/{100 * selector / total:.2f}"
            if report["num_components"] > 1:
                evals = [_component_eval(folder, k, report["winner"]) for k in range(report["num_components"])]
                accs = [_accuracies(e, tasks, trained) if e else None for e in evals]
                averages = [a["average"] if a else None for a in accs]
                known = [a for a in averages if a is not None]
                best = max(range(len(averages)), key=lambda k: averages[k] if averages[k] is not None else -1)
                val = report["validation"]
                component_rows.append(
                    f"| {variant} seed {seed} | "
                    + " / ".join("–" if a is None else f"{a['average']:.1f} ({a['trained_average']:.1f})" for a in accs)
                    + f" | {report['winner']} ({report['winner_by']}) | {val['lowest_loss_component']} | "
                    f"{[round(x, 4) for x in val['mean_loss']]} | {val['selector_argmax_counts']} | "
                    + (f"{best} | {'yes' if best == report['winner'] else 'no'} |" if len(known) == len(averages)
                       else "– | – |"))
        if scores:
            lines.append(f"| {variant} (n={len(scores['average'])}) | {share} | "
                         + " | ".join(_fmt(scores.get(t, [])) for t in [*tasks, "average", "trained_average"])
                         + f" | {_fmt(scores['val_loss'], digits=4)} |")
    lines += ["", "Mean ± standard deviation over seeds. Validation loss: response-token LM loss of the deployed "
              "component (the winner) on the 120 held-out training-distribution rows, from the consolidation report. "
              "L = trainable adapter parameters (all K components during "
              "training), S = selector, in % of the base model's parameters. At inference every row costs the "
              "same as its rank: ComLoRA K=2 r=8 deploys one r=8 component.", ""]
    if component_rows:
        lines += ["## ComLoRA's components (paper Table 10)", "",
                  "| run | test average per component (trained tasks) | selector winner | lowest validation loss | "
                  "validation loss per component | selector argmax counts (validation) | best on test | "
                  "winner = best? |", "|---|---|---|---|---|---|---|---|", *component_rows, ""]
    if commands:
        lines += ["## Commands", "", "What the driver runs (the first seed; the others differ only in "
                  "`train.seed` and the folders; `<k>` = each component other than the winner):", "",
                  "```bash", *commands, "```", ""]
    if _plot_curves(args, variants, run_dir, args.report.parent / "img" / "reproduce_curves.png"):
        lines += ["## Training curves", "", "![per-component losses and winner shares](img/reproduce_curves.png)", ""]
    notes = _kept_notes(args.report)
    args.report.write_text("\n".join(lines) + "\n" + (f"\n{notes}" if notes else ""))


NOTES_HEADING = "## Notes"


def _kept_notes(report: Path) -> str:
    """The hand-written ``## Notes`` section (to the end of the page) of an existing report: kept on rewrite."""
    if not report.exists():
        return ""
    text = report.read_text()
    start = text.find(f"\n{NOTES_HEADING}\n")
    return text[start + 1:] if start >= 0 else ""
