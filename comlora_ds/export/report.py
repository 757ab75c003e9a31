"""report.json + report.md + PNG plots of a consolidation.

Training curves come from the run's ``metrics.jsonl`` (``<output_dir>/metrics.jsonl``, the parent of
``checkpoints/``): per-component LM loss per step, the selector's winner counts per window of
``logging.winner_window`` steps (paper fig. 3), and the validations during training (``train.eval_steps``):
per-component validation loss, the winner and the selector's agreement over time. A resumed run appends to the file;
the last record of a step wins.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..checkpointing.run_layout import METRICS

PLOTS = "plots"


def read_training_metrics(run_dir: Path) -> dict | None:
    path = run_dir / METRICS
    if not path.is_file():
        return None
    by_step: dict[int, dict] = {}
    validations: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue                              # a line cut by a killed run
        if "component_loss" in record and "step" in record:
            by_step[int(record["step"])] = record
        elif "validation" in record and "step" in record:
            v = record["validation"]          # (runs before the winner's loss was logged: computed here)
            validations[int(record["step"])] = {"winner_loss": v["mean_loss"][v["winner"]], **v}
    if not by_step:
        return None
    steps = sorted(by_step)
    k = len(by_step[steps[0]]["component_loss"])
    return {
        "steps": steps,
        "loss": [by_step[s].get("loss") for s in steps],
        "eta": [by_step[s].get("eta") for s in steps],
        "component_loss": [[by_step[s]["component_loss"][i] for s in steps] for i in range(k)],
        "winner_windows": [{"step": s, "counts": by_step[s]["winner_counts"]} for s in steps
                           if "winner_counts" in by_step[s]],
        "selector_windows": [{"step": s, **by_step[s]["selector_diagnostics"]} for s in steps
                             if "selector_diagnostics" in by_step[s]],
        "validations": [validations[s] for s in sorted(validations)],
    }


def _bar(ax, values, title, winner, fmt="{:.4g}"):
    """One bar per component in the colours of the other plots (C0, C1, ...); the winner outlined."""
    k = range(len(values))
    bars = ax.bar(k, values, color=[f"C{i % 10}" for i in k], edgecolor=["black" if i == winner else "none" for i in k],
                  linewidth=2)
    ax.bar_label(bars, labels=[fmt.format(v) for v in values], fontsize=8)
    ax.set_xticks(list(k), [f"{i}\n(winner)" if i == winner else str(i) for i in k])
    ax.set_xlabel("component")
    ax.set_title(title, fontsize=10)


def write_plots(out_dir: Path, curves: dict | None, validation: dict | None, winner: int) -> list[str]:
    """PNG files under out_dir/plots; returns their paths relative to out_dir."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (out_dir / PLOTS).mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out_dir / PLOTS / name, dpi=110)
        plt.close(fig)
        written.append(f"{PLOTS}/{name}")

    if curves:
        fig, ax = plt.subplots(figsize=(7, 4))
        for k, losses in enumerate(curves["component_loss"]):
            ax.plot(curves["steps"], losses, label=f"component {k}" + (" (winner)" if k == winner else ""))
        ax.set(xlabel="optimizer step", ylabel="training LM loss", title="Per-component training loss")
        ax.legend()
        save(fig, "training_loss.png")
        if curves["winner_windows"]:
            fig, ax = plt.subplots(figsize=(7, 4))
            ends = [w["step"] for w in curves["winner_windows"]]
            bottom = [0] * len(ends)
            for k in range(len(curves["winner_windows"][0]["counts"])):
                counts = [w["counts"][k] for w in curves["winner_windows"]]
                ax.bar([str(s) for s in ends], counts, bottom=bottom, label=f"component {k}")
                bottom = [b + c for b, c in zip(bottom, counts)]
            ax.set(xlabel="window ending at step", ylabel="samples where the selector ranks it first",
                   title="Selector winner counts per window")
            ax.legend()
            save(fig, "winner_counts.png")
        if curves.get("selector_windows"):
            fig, ax = plt.subplots(figsize=(7, 4))
            ends = [w["step"] for w in curves["selector_windows"]]
            for key, label in (("target_order_rate", "noisy pairwise target orders the pair as the losses do"),
                               ("top_is_lowest_loss_rate", "selector's top component has the lowest loss")):
                ax.plot(ends, [w[key] for w in curves["selector_windows"]], marker="o", label=label)
            ax.set(xlabel="window ending at step", ylabel="rate", ylim=(0, 1), title="Selector diagnostics per window")
            ax.legend()
            save(fig, "selector_diagnostics.png")
        if len(curves["validations"]) > 1:          # validated during training, not only at the end
            save(_validation_curves(plt, curves["validations"], winner), "validation_curves.png")
    if validation:
        panels = [("mean_loss", "validation LM loss (lower is better)", "{:.4g}"),
                  ("sim_sum", "accumulated selector score (winner = argmax)", "{:.4g}"),
                  ("selector_argmax_counts", "per-sample selector argmax counts", "{:d}"),
                  ("loss_argmin_counts", "per-sample lowest-loss counts", "{:d}")]
        panels = [p for p in panels if validation.get(p[0]) is not None]
        fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.6), squeeze=False)
        for ax, (key, title, fmt) in zip(axes[0], panels):
            _bar(ax, validation[key], title, winner, fmt)
        save(fig, "validation.png")
    return written


def _validation_curves(plt, validations: list[dict], exported: int):
    """Per-component validation loss over the run (the winner of each validation circled), the winner over time,
    and the selector's per-sample agreement and rank correlation with the losses."""
    steps = [v["step"] for v in validations]
    fig, (losses, winners, agreement) = plt.subplots(1, 3, figsize=(14, 4))
    for k in range(len(validations[0]["mean_loss"])):
        losses.plot(steps, [v["mean_loss"][k] for v in validations], marker=".", color=f"C{k % 10}",
                    label=f"component {k}" + (" (exported)" if k == exported else ""))
    losses.scatter(steps, [v["winner_loss"] for v in validations], s=80, facecolors="none", edgecolors="black",
                   label="winner at that step")
    losses.set(xlabel="optimizer step", ylabel="validation LM loss", title="Per-component validation loss")
    losses.legend(fontsize=8)
    winners.step(steps, [v["winner"] for v in validations], where="mid", marker="o")
    winners.set(xlabel="optimizer step", ylabel="component", title="Winner over time",
                yticks=range(len(validations[0]["mean_loss"])))
    for key, label in (("selector_agreement_rate", "top component has the lowest loss (per sample)"),
                       ("selector_rank_correlation", "Spearman(sims, -loss), centred per sample")):
        values = [v.get(key) for v in validations]
        if any(x is not None for x in values):
            agreement.plot(steps, [float("nan") if x is None else x for x in values], marker="o", label=label)
    agreement.set(xlabel="optimizer step", title="Selector agreement on the validation split", ylim=(-1, 1))
    if agreement.lines:
        agreement.legend(fontsize=8)
    else:
        agreement.text(0.5, 0.5, "no selector", ha="center", transform=agreement.transAxes)
    return fig


def _validation_table(validations: list[dict]) -> list[str]:
    best = min(validations, key=lambda v: v["winner_loss"])["step"]
    k_all = range(len(validations[0]["mean_loss"]))
    lines = ["", "Validation during training (train.eval_steps; the lowest winner loss in bold):", "",
             "| step | " + " | ".join(f"val. loss {k}" for k in k_all) + " | winner | winner's loss | agreement | "
             "Spearman |", "|---:|" + "---:|" * (len(k_all) + 4)]
    for v in validations:
        agree, rho = v.get("selector_agreement_rate"), v.get("selector_rank_correlation")
        loss = f"{v['winner_loss']:.4f}"
        lines.append(f"| {v['step']} | " + " | ".join(f"{v['mean_loss'][k]:.4f}" for k in k_all)
                     + f" | {v['winner']} | {f'**{loss}**' if v['step'] == best else loss} | "
                     f"{'-' if agree is None else f'{agree:.3f}'} | {'-' if rho is None else f'{rho:.3f}'} |")
    return lines


def _exported(winner: int | str) -> str:
    return "the soup (uniform average) of the components" if winner == "soup" else f"component {winner}"


def markdown(report: dict) -> str:
    v = report.get("validation")
    k_all = range(report["num_components"])
    lines = [f"# Consolidation of {report['checkpoint']['path']}", "",
             f"- exported: **{_exported(report['winner'])}** (chosen by {report['winner_by']})",
             f"- method {report['method']}, K = {report['num_components']}, r = {report['rank']}, "
             f"alpha = {report['alpha']}, targets {', '.join(report['target_modules'])}",
             f"- checkpoint: step {report['checkpoint']['step']}, ZeRO stage {report['checkpoint']['zero_stage']}, "
             f"{report['checkpoint']['world_size']} rank(s); {report['tensors']['count']} tensors, "
             f"{report['tensors']['elements']} elements recovered in fp32",
             f"- base model: {report['base_model']['path']}"]
    if v:
        lines += [f"- selector winner {v['winner'] if v['winner_by'] == 'selector' else '-'}, lowest validation loss: "
                  f"component {v['lowest_loss_component']}; selector's winner is the lowest-loss component: "
                  f"**{'yes' if v['selector_winner_is_lowest_loss'] else 'no'}**"
                  + ("" if v["winner_by"] == "selector" else " (no selector: winner by validation loss)")]
        if v.get("selector_agreement_rate") is not None:
            rho = v.get("selector_rank_correlation")
            lines.append(f"- selector agreement per sample (its top component has the sample's lowest loss): "
                         f"{100 * v['selector_agreement_rate']:.1f}% (chance {100 / report['num_components']:.0f}%); "
                         f"Spearman(sims, -loss), centred per sample: {'-' if rho is None else f'{rho:.3f}'}")
        if v.get("rule_loss"):
            lines.append("- validation loss of what each winner rule (`--winner-rule`) exports: " + ", ".join(
                f"{rule} {'-' if loss is None else f'{loss:.4f}'}" for rule, loss in v["rule_loss"].items()))
        if v.get("distinguishability"):
            lines.append(f"- {v['distinguishability']}")
        for pair, d in (v.get("update_divergence") or {}).items():
            cosine = "-" if d["cosine"] is None else f"{d['cosine']:.3f}"
            distance = "-" if d["relative_distance"] is None else f"{d['relative_distance']:.3f}"
            lines.append(f"- weight updates of components {pair.replace('-', ' and ')}: relative distance {distance}, "
                         f"cosine {cosine} (over all adapted layers; per module type in report.json)")
        lines += ["", f"Validation split: {v['num_samples']} rows.", "",
                  "| component | val. LM loss | selector score sum | selector argmax | lowest loss |",
                  "|---:|---:|---:|---:|---:|"]
        for k in k_all:
            sim = "-" if v["sim_sum"] is None else f"{v['sim_sum'][k]:.4f}"
            mark = " **(winner)**" if k == report["winner"] else ""
            lines.append(f"| {k}{mark} | {v['mean_loss'][k]:.4f} | {sim} | {v['selector_argmax_counts'][k]} | "
                         f"{v['loss_argmin_counts'][k]} |")
    else:
        lines.append("- validation: not scored")
    validations = (report.get("training") or {}).get("validations") or []
    if len(validations) > 1:
        lines += _validation_table(validations)
    windows = (report.get("training") or {}).get("selector_windows")
    if windows:
        lines += ["", "Selector diagnostics during training, per window:", "",
                  "| window ending at step | target orders pairs as the losses | top = lowest loss | sim spread |",
                  "|---:|---:|---:|---:|"]
        lines += [f"| {w['step']} | {w['target_order_rate']:.3f} | {w['top_is_lowest_loss_rate']:.3f} | "
                  f"{w['sim_spread']:.4g} |" for w in windows]
    lines += ["", "## Outputs", ""]
    outputs = report["outputs"]
    if outputs.get("adapter"):
        lines.append(f"- `{outputs['adapter']}/`: PEFT LoRA adapter of the winner (`PeftModel.from_pretrained("
                     f"AutoModelForCausalLM.from_pretrained(base), '{outputs['adapter']}')`)")
    if outputs.get("merged"):
        lines.append(f"- `{outputs['merged']}/`: merged model "
                     f"(`AutoModelForCausalLM.from_pretrained('{outputs['merged']}')`), "
                     f"{len(report['merge']['shards'])} shard(s), {', '.join(report['merge']['dtypes'])}")
    for path in outputs.get("components", []):
        lines.append(f"- `{path}/`: PEFT adapter of one component")
    lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in report["plots"]]
    return "\n".join(lines) + "\n"


def write_report(out_dir: Path, report: dict) -> None:
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    (out_dir / "report.md").write_text(markdown(report))
