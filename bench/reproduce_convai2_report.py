"""The results section of bench/reproduce_convai2.py: paper Table 4 (with best-of-K LoRA), ComLoRA under each winner
rule, paired tests, Table 10, and the components' divergence over training.

Everything is read back from the runs' own files (or their numbers in ``--archive``, in the same layout): validation.json (validation loss per component, the selector's
winner and diagnostics), metrics.jsonl (the validations during training: divergence and distinguishability),
eval/<model>/results.json (corpus metrics) and eval/<model>/predictions.jsonl (per test example: the reference's
summed NLL and token count, METEOR, ROUGE-L, BERTScore F1). The winner rules (``consolidate.py --winner-rule``):
``selector`` is eval/winner, ``val_loss`` the eval of the lowest-validation-loss component, ``soup`` eval/soup.
"""

from __future__ import annotations

import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from comlora_ds.evaluation.stats import paired_comparison
from reproduce_report import compose_page, mean_sd

METRICS = (("BLEU", "bleu"), ("METEOR", "meteor"), ("R-L", "rougeL"), ("BERT F1", "bertscore_f1"),
           ("BERT R", "bertscore_r"), ("BERT P", "bertscore_p"), ("NLL", "nll"), ("PPL", "perplexity"))
# per-example scores for the paired tests: name, how to read it from a predictions row, higher is better?
RULES = ("selector", "val_loss", "soup")
PAIRED = (("NLL / token", lambda r: r["nll_sum"] / r["response_tokens"], False),
          ("METEOR", lambda r: r["meteor"], True), ("R-L", lambda r: r["rougeL"], True),
          ("BERT F1", lambda r: r["bertscore_f1"], True))


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def _predictions(folder: Path) -> list[dict] | None:
    path = folder / "predictions.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else None


def finished_runs(args, run_dir) -> dict[str, list[dict]]:
    """Per variant, the finished seeds: {seed, folder, validation, winner (results), predictions, components}."""
    out: dict[str, list[dict]] = {}
    for variant in args.variants:
        for seed in args.seeds:
            folder = run_dir(args, variant, seed)
            validation = _load(folder / "validation.json")
            winner = _load(folder / "eval" / "winner" / "results.json")
            if validation is None or winner is None:
                continue
            components = {validation["winner"]: winner}
            for k in range(len(validation["mean_loss"])):
                found = _load(folder / "eval" / f"component_{k}" / "results.json")
                if found is not None:
                    components[k] = found
            out.setdefault(variant, []).append({
                "seed": seed, "folder": folder, "validation": validation, "winner": winner,
                "predictions": _predictions(folder / "eval" / "winner"), "components": components,
                "rules": rule_results(folder, validation)})
    return out


def rule_results(folder: Path, validation: dict) -> dict[str, dict]:
    """Per winner rule whose test evaluation exists: {results, predictions, validation_loss} of what it exports."""
    if len(validation["mean_loss"]) < 2:
        return {}
    lowest = validation["lowest_loss_component"]
    evals = {"selector": folder / "eval" / "winner",
             "val_loss": folder / "eval" / ("winner" if lowest == validation["winner"] else f"component_{lowest}"),
             "soup": folder / "eval" / "soup"}
    export = _load(folder / "export" / "report.json") or {}
    losses = {"selector": validation["mean_loss"][validation["winner"]], "val_loss": validation["mean_loss"][lowest],
              "soup": ((export.get("validation") or {}).get("rule_loss") or {}).get("soup")}
    out = {}
    for rule, where in evals.items():
        results = _load(where / "results.json")
        if results is not None:
            out[rule] = {"results": results, "predictions": _predictions(where), "validation_loss": losses[rule]}
    return out


def divergence_over_training(folder: Path) -> list[dict]:
    """The validations during training (train.eval_steps) of one run, from its metrics.jsonl: step, the first pair's
    update distance and cosine, its loss difference and paired SE (a resumed run logs a step once more: the last
    record of a step is kept)."""
    path = folder / "metrics.jsonl"
    by_step = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        record = json.loads(line)
        v = record.get("validation")
        if v and v.get("update_divergence"):
            (pair, d), = list(v["update_divergence"].items())[:1]
            diff = v["loss_difference"][pair]
            by_step[int(record["step"])] = {"step": int(record["step"]), "distance": d["relative_distance"],
                                            "cosine": d["cosine"], "difference": diff["mean"],
                                            "se": diff["paired_se"], "distinguishable": diff["distinguishable"]}
    return [by_step[s] for s in sorted(by_step)]


def best_of(runs: list[dict], k: int) -> list[dict]:
    """For every k-subset of the runs (by seed order), the run with the lowest validation loss: the best-of-k
    control, one entry per subset."""
    return [min(group, key=lambda r: r["validation"]["mean_loss"][0]) for group in itertools.combinations(runs, k)]


def _metric_row(name: str, n: int, results: list[dict], validation: list[float]) -> str:
    cells = [mean_sd([r["metrics"][key] for r in results], 3 if key == "nll" else 2) for _, key in METRICS]
    return f"| {name} | {n} | " + " | ".join(cells) + f" | {mean_sd(validation, 4)} |"


def _mean_scores(prediction_lists: list[list[dict]], read) -> list[float]:
    """Per test example, the score averaged over the given runs (all scored the same examples)."""
    keys = [[(p["dialogue"], p["turn"]) for p in preds] for preds in prediction_lists]
    if any(k != keys[0] for k in keys):
        raise SystemExit("runs scored different test examples; rerun their evaluations")
    return [statistics.mean(read(preds[i]) for preds in prediction_lists) for i in range(len(keys[0]))]


def _paired_rows(label_a: str, runs_a: list[list[dict]], label_b: str, runs_b: list[list[dict]]) -> list[str]:
    rows = []
    for metric, read, higher in PAIRED:
        c = paired_comparison(_mean_scores(runs_a, read), _mean_scores(runs_b, read))
        better = c.a_better if higher else c.b_better
        worse = c.b_better if higher else c.a_better
        rows.append(f"| {label_a} vs {label_b} | {metric} | {c.mean_a:.3f} | {c.mean_b:.3f} | {c.difference:+.3f} | "
                    f"{c.standard_error:.3f} | {better}/{worse} | {c.sign_test_p:.2g} | {_bootstrap_p(c.bootstrap_p)} |")
    return rows


def _bootstrap_p(p: float) -> str:
    return f"{p:.2g}" if p > 0 else "< 1e-4"     # no resample of 10,000 crossed zero


def _rank_of(variant: str) -> str:
    return variant.rsplit("_r", 1)[1]


def _complete_rules(group: list[dict]) -> list[str]:
    """The winner rules every seed of a ComLoRA variant was evaluated under."""
    return [rule for rule in RULES if all(rule in r["rules"] for r in group)]


def comparisons(runs: dict[str, list[dict]], base_predictions: list[dict] | None) -> list[str]:
    """Paired tests: each ComLoRA rule vs LoRA of its rank and vs best-of-K LoRA; every variant vs the base."""
    rows = []
    for variant, group in runs.items():
        if not variant.startswith("comlora"):
            continue
        lora = runs.get(f"lora_r{_rank_of(variant)}", [])
        k = len(group[0]["validation"]["mean_loss"])
        for rule in _complete_rules(group) or ["selector"]:
            mine = [r["rules"][rule]["predictions"] if r["rules"] else r["predictions"] for r in group]
            label = f"{variant} {rule}"
            if lora:
                rows += _paired_rows(label, mine, f"lora_r{_rank_of(variant)}", [r["predictions"] for r in lora])
            if len(lora) >= k:
                rows += _paired_rows(label, mine, f"best-of-{k} lora_r{_rank_of(variant)}",
                                     [r["predictions"] for r in best_of(lora, k)])
    if base_predictions is not None:
        for variant, group in runs.items():
            rows += _paired_rows(variant, [r["predictions"] for r in group], "base", [base_predictions])[:1]
    return rows


def component_rows(runs: dict[str, list[dict]]) -> list[str]:
    """Paper Table 10: per ComLoRA run, each component's validation and test numbers and the selector's pick."""
    rows = []
    for variant, group in runs.items():
        for run in group:
            v = run["validation"]
            if len(v["mean_loss"]) < 2:
                continue
            nll = {k: res["metrics"]["nll"] for k, res in run["components"].items()}
            meteor = {k: res["metrics"]["meteor"] for k, res in run["components"].items()}
            best_test = min(nll, key=nll.get) if len(nll) == len(v["mean_loss"]) else None
            rows.append(
                f"| {variant} seed {run['seed']} | " + ", ".join(f"{x:.4f}" for x in v["mean_loss"])
                + f" | {v['winner']} | {v['lowest_loss_component']} | "
                + ", ".join(f"{nll[k]:.3f}" if k in nll else "–" for k in range(len(v["mean_loss"]))) + " | "
                + ", ".join(f"{meteor[k]:.2f}" if k in meteor else "–" for k in range(len(v["mean_loss"])))
                + f" | {v.get('selector_agreement_rate', float('nan')):.2f} | "
                f"{v.get('selector_rank_correlation', float('nan')):.2f} | "
                + ("–" if best_test is None else f"{best_test} ({'yes' if best_test == v['winner'] else 'no'})")
                + " |")
    return rows


def rule_rows(runs: dict[str, list[dict]]) -> list[str]:
    """Each ComLoRA variant under each winner rule: test metrics over the seeds and the validation loss of what the
    rule exports."""
    rows = []
    for variant, group in runs.items():
        for rule in _complete_rules(group) if variant.startswith("comlora") else []:
            picked = [r["rules"][rule] for r in group]
            rows.append(_metric_row(f"{variant} {rule}", len(group), [p["results"] for p in picked],
                                    [p["validation_loss"] for p in picked if p["validation_loss"] is not None]))
    return rows


def divergence_rows(runs: dict[str, list[dict]]) -> list[str]:
    """Per ComLoRA run, per validation during training: the components' update distance and cosine and their
    validation loss difference (mean, paired SE, distinguishable = |mean| > 2 SE)."""
    rows = []
    for variant, group in runs.items():
        for run in group if variant.startswith("comlora") else []:
            for d in divergence_over_training(run["folder"]):
                rows.append(f"| {variant} seed {run['seed']} | {d['step']} | {d['distance']:.3f} | {d['cosine']:.3f} "
                            f"| {d['difference']:+.4f} | {d['se']:.4f} | {'yes' if d['distinguishable'] else 'no'} |")
    return rows


def _intro(args) -> list[str]:
    from reports import cpu_model

    device = (torch.cuda.get_device_name() + f" x {torch.cuda.device_count()}" if torch.cuda.is_available()
              else f"{cpu_model()}, {len(os.sched_getaffinity(0))} CPU cores, no GPU")
    info = _load((args.archive or args.out) / "data" / "data.json") or {}
    span = {key: "{}-{}".format(start, end - 1) for key, (start, end) in
            (("train", args.train_dialogues), ("test", args.test_dialogues))}
    return [f"## ConvAI2 (paper Table 4 at small scale): ComLoRA vs LoRA vs best-of-K LoRA on {Path(args.model).name}",
            "", f"Machine: {device}, torch {torch.__version__}. Written {time.strftime('%Y-%m-%d')} by:", "",
            "```bash", "python " + " ".join(sys.argv), "```", "",
            f"Data: ConvAI2 self persona (ParlAI valid file, dialogues 0-799 in ../shared/data/convai2). Training: "
            f"dialogues {span['train']} ({info.get('train_rows')} rows, {args.val_size} of them held "
            f"out for validation, data seed 42: the same rows in the same order for every run); prompt = persona + "
            f"the last {args.max_history} dialogue line(s). Test: dialogues {span['test']}, the first "
            f"{info.get('test_turns') or 'all'} turns of each ({info.get('test_rows')} replies). {args.max_steps} "
            f"steps x micro-batch {args.micro_batch} (= {args.max_steps * args.micro_batch} training rows seen), lr "
            f"{args.lr} linear decay, 3% warm-up, seeds {args.seeds}. Greedy replies of at most "
            f"{args.max_new_tokens} tokens; BERTScore with the offline all-MiniLM-L6-v2 (not comparable to the "
            "paper's roberta-large numbers); NLL = the reference reply's tokens (EOS included) per token.", ""]


LEGEND = ("Mean ± standard deviation over seeds (n). ComLoRA rows are the validation winner merged into the base; "
          "best-of-K LoRA: K independent LoRA runs (seeds), the lowest validation loss kept, over every K-subset of "
          "the seeds. Validation loss = the kept model's mean response-token loss on the held-out rows.")
RULES_LEGEND = ("selector: the selector's winner (paper eq. 12, the default); val_loss: the component with the lower "
                "validation loss; soup: the base plus the uniform average of the K components' updates (one merged "
                "model, the same inference cost). Validation loss: of the model each rule exports.")
DIVERGENCE_LEGEND = ("From each run's metrics.jsonl (train.eval_steps): update distance = ||dW_0 - dW_1||_F / mean "
                     "||dW_k||_F over all adapted layers (0: twins; sqrt(2) = 1.41 for unrelated updates of equal "
                     "norm), cosine of the two updates; the loss difference is over the validation rows, "
                     "distinguishable when |mean| > 2 paired SE.")
PAIRED_LEGEND = ("Per test reply, the score averaged over the seeds of each side (for best-of-K: over the kept runs of "
                 "every K-subset), then compared reply by reply: difference of means, its paired standard error, "
                 "replies where the first side is better / worse, the two-sided sign test and a paired bootstrap "
                 "(10,000 resamples). NLL / token here is each reply's mean (every reply weighs the same; the table "
                 "above pools all tokens); lower is better. BLEU is a corpus statistic and is left out here.")


def write_report(args, run_dir, commands: list[str]) -> None:
    runs = finished_runs(args, run_dir)
    root = args.archive or args.out      # where the base evaluation is (run_dir already points into the archive)
    base = _load(root / "base" / "eval" / "results.json")
    header = ["method", "n", *[label for label, _ in METRICS], "validation loss"]
    lines = [*_intro(args), "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    if base:
        lines.append(_metric_row(f"{Path(args.model).name} (no training)", 1, [base], []))
    k = max((len(g[0]["validation"]["mean_loss"]) for v, g in runs.items() if v.startswith("comlora")), default=0)
    for variant, group in runs.items():
        lines.append(_metric_row(variant, len(group), [r["winner"] for r in group],
                                 [r["validation"]["mean_loss"][r["validation"]["winner"]] for r in group]))
        if not variant.startswith("comlora") and k and len(group) >= k:
            kept = best_of(group, k)
            lines.append(_metric_row(f"best-of-{k} {variant}", len(kept), [r["winner"] for r in kept],
                                     [r["validation"]["mean_loss"][0] for r in kept]))
    lines += ["", LEGEND, ""]
    rules = rule_rows(runs)
    if rules:
        lines += ["### ComLoRA under each winner rule (`consolidate.py --winner-rule`)", "",
                  "| method | n | " + " | ".join(label for label, _ in METRICS) + " | validation loss |",
                  "|" + "---|" * (len(METRICS) + 3), *rules, "", RULES_LEGEND, ""]
    paired = comparisons(runs, _predictions(root / "base" / "eval"))
    if paired:
        lines += ["### Paired tests over the test replies", "",
                  "| comparison | score | first | second | difference | SE | better/worse | sign test p | "
                  "bootstrap p |", "|---|---|---|---|---|---|---|---|---|", *paired, "", PAIRED_LEGEND, ""]
    table10 = component_rows(runs)
    if table10:
        lines += ["### ComLoRA's components (paper Table 10)", "",
                  "| run | validation loss per component | selector winner | lowest validation loss | test NLL per "
                  "component | test METEOR per component | selector agreement (validation) | selector rank "
                  "correlation | best test NLL (= winner?) |", "|---|---|---|---|---|---|---|---|---|",
                  *table10, ""]
    divergence = divergence_rows(runs)
    if divergence:
        lines += ["### Do the components move apart during training?", "",
                  "| run | step | update distance | update cosine | val. loss difference (0 - 1) | paired SE | "
                  "distinguishable |", "|---|---:|---:|---:|---:|---:|---|", *divergence, "", DIVERGENCE_LEGEND, ""]
    lines += ["### Commands", "", "What the driver runs (the first seed; the others differ only in `train.seed` and "
              "the folders; each other ComLoRA component is evaluated like the winner):", "", "```bash", *commands,
              "```", ""]
    old = args.report.read_text() if args.report.exists() else ""
    args.report.write_text(compose_page(old, args.tag, "\n".join(lines).rstrip("\n")))
