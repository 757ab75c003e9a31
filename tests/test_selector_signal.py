"""bench/selector_signal.py's results section from run folders laid out as the trainer writes them."""

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from selector_signal import TAG, section, train_command  # noqa: E402


def _run(folder: Path, mean_loss, winner, agreement, rho, order_rates):
    folder.mkdir(parents=True)
    lowest = min(range(2), key=lambda k: mean_loss[k])
    (folder / "validation.json").write_text(json.dumps({
        "winner": winner, "lowest_loss_component": lowest, "selector_winner_is_lowest_loss": winner == lowest,
        "mean_loss": mean_loss, "selector_agreement_rate": agreement, "selector_rank_correlation": rho}))
    records = [{"step": 10 * (i + 1), "selector_diagnostics": {"target_order_rate": r}}
               for i, r in enumerate(order_rates)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_section_counts_winner_hits_and_averages_the_rates(tmp_path):
    args = argparse.Namespace(out=tmp_path, seeds=[1, 2, 3], settings=["old", "new"], max_steps=60, extra=[],
                              report=tmp_path / "results.md", ds_config="zero2.json")
    _run(tmp_path / "new-seed1", [0.15, 0.16], 0, 0.70, 0.30, [0.5, 0.9])
    _run(tmp_path / "new-seed2", [0.17, 0.16], 1, 0.80, 0.50, [0.8])
    _run(tmp_path / "old-seed1", [0.15, 0.16], 1, 0.40, -0.10, [0.6])      # seeds 2, 3 not run yet: left out
    text = section(args)
    assert "| new: summed target (eq. 4/6), per-group clipping | 2 | 2 / 2 | 75.0 +- 7.1 | 0.400 +- 0.141 | " \
           "85.0 +- 7.1 | 0.1550 +- 0.0071 | 0.0100 +- 0.0000 |" in text
    assert "| old: per-token mean target, global clipping | 1 | 0 / 1 | 40.0 | -0.100 | 60.0 | 0.1500 | 0.0100 |" in text
    assert "| new | 2 | 0.1700 / 0.1600 | 1 | 1 | 80.0 | 0.500 | 80.0 |" in text
    assert TAG == "selector-signal"


def test_settings_differ_only_in_the_selector_signal(tmp_path):
    args = argparse.Namespace(out=tmp_path, max_steps=60, extra=["data.max_length=128"], ds_config="zero2.json")
    old, new = (set(train_command(args, s, 1)) for s in ("old", "new"))
    assert old - new == {"comlora.loss_reduction=mean", "train.clip_scope=global",
                         f"train.output_dir={tmp_path / 'old-seed1'}"}
    assert "data.max_length=128" in new
