"""bench/selector_signal.py's results section from run folders laid out as the trainer writes them."""

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import selector_signal  # noqa: E402
from selector_signal import TAG, section, train_command  # noqa: E402


def _run(folder: Path, mean_loss, winner, agreement, rho, order_rates, divergence=None):
    """A run folder as the trainer writes it; ``divergence`` = (distance, cosine, paired SE, distinguishable), or
    None for a run from before the divergence diagnostics."""
    folder.mkdir(parents=True)
    lowest = min(range(2), key=lambda k: mean_loss[k])
    validation = {"winner": winner, "lowest_loss_component": lowest, "selector_winner_is_lowest_loss": winner == lowest,
                  "mean_loss": mean_loss, "selector_agreement_rate": agreement, "selector_rank_correlation": rho}
    if divergence:
        distance, cosine, se, apart = divergence
        validation["update_divergence"] = {"0-1": {"relative_distance": distance, "cosine": cosine}}
        validation["loss_difference"] = {"0-1": {"mean": mean_loss[0] - mean_loss[1], "paired_se": se,
                                                 "distinguishable": apart}}
    (folder / "validation.json").write_text(json.dumps(validation))
    records = [{"step": 10 * (i + 1), "selector_diagnostics": {"target_order_rate": r}}
               for i, r in enumerate(order_rates)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_section_counts_winner_hits_and_averages_the_rates(tmp_path):
    args = selector_signal.parse_args(["--out", str(tmp_path), "--seeds", "1", "2", "3", "--report",
                                       str(tmp_path / "results.md")])
    _run(tmp_path / "new-seed1", [0.15, 0.16], 0, 0.70, 0.30, [0.5, 0.9], (1.2, 0.3, 0.002, True))
    _run(tmp_path / "new-seed2", [0.17, 0.16], 1, 0.80, 0.50, [0.8], (1.0, 0.5, 0.008, False))
    _run(tmp_path / "old-seed1", [0.15, 0.16], 1, 0.40, -0.10, [0.6])      # seeds 2, 3 not run yet: left out
    text = section(args)
    assert text.startswith("## Selector signal: old vs new defaults, up to 3 seeds (issue 14)")
    assert ("| new: summed target (eq. 4/6), per-group clipping | 2 | 1 / 2 | 2 / 2 | 1 / 1 | 1.100 +- 0.141 | "
            "0.400 +- 0.141 | 0.0100 +- 0.0000 | 0.0050 +- 0.0042 | 75.0 +- 7.1 | 0.400 +- 0.141 | 85.0 +- 7.1 | "
            "0.1550 +- 0.0071 |") in text
    assert ("| old: per-token mean target, global clipping | 1 | - | 0 / 1 | - | - | - | 0.0100 | - | 40.0 | -0.100 | "
            "60.0 | 0.1500 |") in text
    assert "| new | 2 | 0.1700 / 0.1600 | +0.0100 +- 0.0080 | no | 1.000 | 0.500 | 1 | 1 | 80.0 | 0.500 | 80.0 |" in text
    assert "| old | 1 | 0.1500 / 0.1600 | - | - | - | - | 1 | 0 | 40.0 | -0.100 | 60.0 |" in text
    assert TAG == "selector-signal"


def test_an_archived_run_is_read_from_the_archive(tmp_path):
    args = selector_signal.parse_args(["--out", str(tmp_path / "runs"), "--settings", "top1", "--seeds", "1",
                                       "--tag", "knobs", "--archive", str(tmp_path / "archive"), "--report", "r.md"])
    _run(tmp_path / "archive" / "top1-seed1", [0.15, 0.16], 0, 0.70, 0.30, [0.5], (1.2, 0.3, 0.002, True))
    text = section(args)
    assert text.startswith("## Competition knobs (knobs): what moves ComLoRA's components apart, up to 1 seeds")
    assert "| top1 | 1 | 0.1500 / 0.1600 | -0.0100 +- 0.0020 | yes | 1.200 | 0.300 | 0 | 0 | 70.0 | 0.300 | 50.0 |" in text
    assert "--tag knobs --archive" in text


def test_distinguishable_means_the_best_component_beats_every_other():
    pairs = {"0-1": (0.01, True), "0-2": (0.02, False), "1-2": (0.01, True)}
    validation = {"lowest_loss_component": 1,
                  "loss_difference": {p: {"mean": m, "paired_se": 0.001, "distinguishable": d}
                                      for p, (m, d) in pairs.items()}}
    assert selector_signal.competition(validation)["distinguishable"] is True        # 0-1 and 1-2
    validation["lowest_loss_component"] = 2
    assert selector_signal.competition(validation)["distinguishable"] is False       # 0-2 is not
    assert selector_signal.competition({"lowest_loss_component": 0}) == {}


def test_settings_differ_only_in_the_selector_signal(tmp_path):
    args = selector_signal.parse_args(["--out", str(tmp_path), "--extra", "data.max_length=128"])
    old, new = (set(train_command(args, s, 1)) for s in ("old", "new"))
    assert old - new == {"comlora.loss_reduction=mean", "train.clip_scope=global",
                         f"train.output_dir={tmp_path / 'old-seed1'}"}
    assert "data.max_length=128" in new
