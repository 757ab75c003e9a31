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

from comlora_ds.evaluation.stats import cohen_kappa


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def _base_params(merged: Path) -> int:
    return sum(_file_params(shard) for shard in merged.glob("*.safetensors"))


def _file_params(path: Path) -> int:
    with safe_open(str(path), framework="pt") as f:
        return sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())


def mean_sd(values: list[float], digits: int = 1) -> str:
    """'mean ± sd' over seeds (one value as is, none as a dash)."""
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


def _trained_kappa(eval_dir: Path, trained: list[str]) -> float | None:
    """Mean over the trained tasks of Cohen's kappa, from the evaluation's per-example predictions."""
    path = eval_dir / "predictions.jsonl"
    if not path.exists():
        return None
    labels: dict[str, tuple[list, list]] = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        predicted, gold = labels.setdefault(row["task"], ([], []))
        predicted.append(row["pred"])
        gold.append(row["answer"])
    return statistics.mean(cohen_kappa(*labels[t]) for t in trained if t in labels)


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


def _intro(args, model: str) -> list[str]:
    """Heading, machine, command and training setup of this grid's section."""
    from reports import cpu_model

    device = (torch.cuda.get_device_name() + f" x {torch.cuda.device_count()}" if torch.cuda.is_available()
              else f"{cpu_model()}, {len(os.sched_getaffinity(0))} CPU cores, no GPU")
    title = f"ComLoRA vs LoRA on {model} (commonsense, paper Table 3 at small scale)"
    return [f"## {'Sweep ' + args.tag + ': ' if args.tag else ''}{title}", "",
            f"Machine: {device}, torch {torch.__version__}. Written {time.strftime('%Y-%m-%d')} by:", "", "```bash",
            "python " + " ".join(sys.argv), "```", "",
            f"Training: {args.max_steps or args.epochs} {'steps' if args.max_steps else 'epochs'}, micro-batch "
            f"{args.micro_batch} x accumulation {args.grad_accum}, lr {args.lr} (linear decay, 3% warm-up), "
            f"max length {args.max_length}, on the LLM-Adapters training rows of "
            f"{', '.join(Path(f).stem for f in args.train_files)} ({args.model}); 120 rows held out for "
            f"validation (seed 42){'; every run also ' + ' '.join(args.extra) if args.extra else ''}. "
            f"Seeds {args.seeds}. Test: the first "
            f"{args.eval_limit or 'all'} rows of each LLM-Adapters test set, greedy generation, first answer "
            "keyword (no keyword = wrong). Tasks without training rows here measure transfer; PIQA's answer keywords "
            "(solution1/solution2) never occur in these training rows, so its score mostly says whether a model "
            "happens to write them. \"Average of trained tasks\" leaves such tasks out.", ""]


def _selector_settings(args, variants: dict, run_dir) -> list[str]:
    """The selector's training signal as a run of this grid saved it (issue 14 changed the defaults)."""
    import yaml

    for variant in variants:
        for seed in args.seeds:
            saved = sorted((run_dir(args, variant, seed) / "checkpoints").glob("step_*/run_config.yaml"))
            if saved and yaml.safe_load(saved[-1].read_text())["adapter"]["num_components"] > 1:
                cfg = yaml.safe_load(saved[-1].read_text())
                reduction = cfg["comlora"].get("loss_reduction")
                clock = "t = 1..T" if reduction else "t = 0..T-1 (before issue 14)"
                return [f"Selector signal of the ComLoRA runs: pairwise target "
                        f"`comlora.loss_reduction = {reduction or 'mean (per-token; before issue 14)'}`, "
                        f"`train.clip_scope = {cfg['train']['clip_scope']}`, annealing clock {clock}.", ""]
    return []


def _base_rows(base: dict | None, model: str, tasks, trained: list[str]) -> list[str]:
    """The zero-shot base model (generation, and rank classification when it was evaluated)."""
    if not base:
        return []
    rows = []
    for name, key in [("zero-shot", "accuracy"), ("zero-shot, rank classification", "choice_accuracy")]:
        if key in next(iter(base["metrics"]["per_task"].values())):
            acc = _accuracies(base, tasks, trained, key)
            rows.append(f"| {model} {name} | 0/0 | "
                        + " | ".join(f"{acc[t]:.1f}" for t in [*tasks, "average", "trained_average"]) + " | – | – |")
    return rows


def _param_share(folder: Path, report: dict) -> str:
    """Trainable adapter (all K components) / selector parameters in % of the base model's."""
    total = _base_params(folder / "export" / "merged")
    component = folder / "export" / "components" / "component_0" / "adapter_model.safetensors"
    adapters = _file_params(component) * report["num_components"]
    selector = report["tensors"]["elements"] - adapters
    return f"{100 * adapters / total:.2f}/{100 * selector / total:.2f}"


def _component_row(name: str, folder: Path, report: dict, tasks, trained: list[str]) -> str:
    """One ComLoRA run in paper Table 10's shape: each component's test average, the selector's winner, the
    lowest-validation-loss component, and whether the winner is the best component on test."""
    evals = [_component_eval(folder, k, report["winner"]) for k in range(report["num_components"])]
    accs = [_accuracies(e, tasks, trained) if e else None for e in evals]
    averages = [a["average"] if a else None for a in accs]
    val = report["validation"]
    row = (f"| {name} | "
           + " / ".join("–" if a is None else f"{a['average']:.1f} ({a['trained_average']:.1f})" for a in accs)
           + f" | {report['winner']} ({report['winner_by']}) | {val['lowest_loss_component']} | "
           f"{[round(x, 4) for x in val['mean_loss']]} | {val['selector_argmax_counts']} | ")
    if None in averages:
        return row + "– | – |"
    best = [k for k, a in enumerate(averages) if a == max(averages)]
    if len(best) > 1:      # the same number of right answers: no component is better
        return row + f"tie ({', '.join(map(str, best))}) | {'tie' if report['winner'] in best else 'no'} |"
    return row + f"{best[0]} | {'yes' if best[0] == report['winner'] else 'no'} |"


def _variant_rows(args, variant: str, run_dir, tasks, trained: list[str]) -> tuple[str | None, list[str]]:
    """The variant's Table 3 row (mean ± std over the finished seeds; None before any finished) and, for
    ComLoRA, one Table 10 row per finished seed."""
    scores: dict[str, list[float]] = {}
    share, component_rows = "", []
    for seed in args.seeds:
        folder = run_dir(args, variant, seed)
        report = _load(folder / "export" / "report.json")
        winner_eval = _load(folder / "eval" / "winner" / "results.json")
        if not report or not winner_eval:
            continue
        for key, value in _accuracies(winner_eval, tasks, trained).items():
            scores.setdefault(key, []).append(value)
        scores.setdefault("val_loss", []).append(report["validation"]["mean_loss"][report["winner"]])
        kappa = _trained_kappa(folder / "eval" / "winner", trained)
        if kappa is not None:
            scores.setdefault("kappa", []).append(kappa)
        share = share or _param_share(folder, report)     # the same architecture in every seed
        if report["num_components"] > 1:
            component_rows.append(_component_row(f"{variant} seed {seed}", folder, report, tasks, trained))
    if not scores:
        return None, component_rows
    row = (f"| {variant} (n={len(scores['average'])}) | {share} | "
           + " | ".join(mean_sd(scores.get(t, [])) for t in [*tasks, "average", "trained_average"])
           + f" | {mean_sd(scores.get('kappa', []), digits=2)} | {mean_sd(scores['val_loss'], digits=4)} |")
    return row, component_rows


TABLE_LEGEND = (
    "Mean ± standard deviation over seeds. κ: Cohen's kappa between the answers and the gold labels, averaged over "
    "the trained tasks: 0 for a model that gives one answer to every question (its accuracy is then that label's "
    "share of the test set), 1 for all correct. Validation loss: response-token LM loss of the deployed component "
    "(the winner) on the 120 held-out training-distribution rows, from the consolidation report. L = trainable "
    "adapter parameters (all K components during training), S = selector, in % of the base model's parameters. "
    "At inference every row costs the same as its rank: ComLoRA K=2 r=8 deploys one r=8 component.")


def write_report(args, variants: dict, tasks: tuple, run_dir, commands: list[str]) -> None:
    """Write this grid's section of the results page (one section per --tag), keeping the other grids' sections
    and the hand-written notes."""
    model = Path(args.model).name
    trained = [t for t in tasks if t in {Path(f).stem for f in args.train_files}]
    header = ["method", "Params (%) L/S", *tasks, "average", "average of trained tasks", "κ, trained tasks",
              "validation loss"]
    lines = [*_intro(args, model), *_selector_settings(args, variants, run_dir),
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
             *_base_rows(_load(args.out / "base" / "eval" / "results.json"), model, tasks, trained)]
    component_rows = []
    for variant in variants:
        row, rows = _variant_rows(args, variant, run_dir, tasks, trained)
        lines += [row] if row else []
        component_rows += rows
    lines += ["", TABLE_LEGEND, ""]
    if component_rows:
        lines += ["### ComLoRA's components (paper Table 10)", "",
                  "| run | test average per component (trained tasks) | selector winner | lowest validation loss | "
                  "validation loss per component | selector argmax counts (validation) | best on test | "
                  "winner = best? |", "|---|---|---|---|---|---|---|---|", *component_rows, ""]
    if commands:
        lines += ["### Commands", "", "What the driver runs (the first seed; the others differ only in "
                  "`train.seed` and the folders; `<k>` = each component other than the winner):", "",
                  "```bash", *commands, "```", ""]
    image = f"img/reproduce_curves{'-' + args.tag if args.tag else ''}.png"
    if _plot_curves(args, variants, run_dir, args.report.parent / image):
        lines += ["### Training curves", "", f"![per-component losses and winner shares]({image})", ""]
    old = args.report.read_text() if args.report.exists() else ""
    args.report.write_text(compose_page(old, args.tag or MAIN_GRID, "\n".join(lines).rstrip("\n")))


PAGE_INTRO = ("# Results\n\nMeasured accuracy of the models this project trains. Each section is written by "
              "bench/reproduce_commonsense.py, bench/reproduce_convai2.py or bench/selector_signal.py with the "
              "command and the machine it names; the notes at the end are written by hand.\n")
NOTES_HEADING = "## Notes"
MAIN_GRID = "main"
MARKER = "<!-- reproduce: "


def _markers(tag: str) -> tuple[str, str]:
    return f"{MARKER}{tag} -->", f"<!-- /reproduce: {tag} -->"


def compose_page(old: str, tag: str, section: str) -> str:
    """The results page with ``section`` as grid ``tag``'s section: the other grids' sections (each between
    its markers) and the hand-written ``## Notes`` (to the end of the page) are kept; anything else of the old
    page is dropped. The main grid comes first, the others in the order they were first written."""
    notes_at = old.find(f"\n{NOTES_HEADING}\n")
    notes = old[notes_at + 1:] if notes_at >= 0 else ""
    body = old[:notes_at] if notes_at >= 0 else old
    sections: dict[str, str] = {}
    for chunk in body.split(MARKER)[1:]:
        name = chunk.split(" -->", 1)[0]
        end = _markers(name)[1]
        if end in chunk:
            sections[name] = MARKER + chunk.split(end, 1)[0] + end
    begin, end = _markers(tag)
    sections[tag] = f"{begin}\n{section}\n{end}"
    order = [MAIN_GRID] * (MAIN_GRID in sections) + [name for name in sections if name != MAIN_GRID]
    return "\n\n".join([PAGE_INTRO.rstrip("\n"), *(sections[name] for name in order)]) + "\n" + (
        f"\n{notes}" if notes else "")
