"""bench/reproduce_commonsense.py end to end on the tiny LLaMA of tests/assets.py: a chunk stopped by its time
budget, a run locked by another driver left alone, the full grid (train -> consolidate -> evaluate, every
ComLoRA component), the results page, and a rerun that finds everything done."""

import fcntl
import json
import subprocess
import sys
from pathlib import Path


from comlora_ds.evaluation.stats import cohen_kappa

from assets import commonsense_dir, commonsense_file, tiny_model_dir
from helpers import subprocess_env

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from reproduce_report import _component_row, compose_page  # noqa: E402

TRAIN = commonsense_file("ARC-Challenge")


def drive(out: Path, *extra: str, timeout: int = 600) -> str:
    cmd = [sys.executable, str(REPO / "bench" / "reproduce_commonsense.py"), "--out", str(out),
           "--model", str(tiny_model_dir()), "--train-files", str(TRAIN), "--test-dir", str(commonsense_dir()),
           "--variants", "comlora_k2_r8", "lora_r8", "--seeds", "1", "--max-steps", "4", "--max-length", "64",
           "--eval-limit", "3", "--eval-batch", "4", "--report", str(out / "results.md"), *extra]
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_driver_runs_in_chunks_writes_the_results_page_and_skips_finished_work(tmp_path):
    out = tmp_path / "repro"
    out.mkdir()
    (out / "results.md").write_text("# Results\n\nold table\n\n## Notes\n\nHand-written conclusions.\n")

    stopped = drive(out, "--chunk-minutes", "0.02")    # 1.2 s: the first stage cannot finish in it
    assert "stopped (time budget); run again to continue" in stopped
    assert not (out / "base" / "eval" / "results.json").exists()

    busy = out / "lora_r8-seed1"
    busy.mkdir()
    with open(busy / ".driver.lock", "w") as lock:       # another driver works on this run: it is left alone
        fcntl.flock(lock, fcntl.LOCK_EX)
        assert f"skipping {busy}: another driver is working on it" in drive(out)
    assert (out / "comlora_k2_r8-seed1" / "eval" / "winner" / "results.json").exists()
    assert not (busy / "checkpoints").exists()

    drive(out)
    for run in ("comlora_k2_r8-seed1", "lora_r8-seed1"):
        assert (out / run / "export" / "merged" / "config.json").exists()
        assert (out / run / "eval" / "winner" / "results.json").exists()
    components = sorted(p.name for p in (out / "comlora_k2_r8-seed1" / "eval").iterdir())
    assert len(components) == 2 and "winner" in components   # the winner plus the other component

    page = (out / "results.md").read_text()
    assert f"| {tiny_model_dir().name} zero-shot |" in page
    assert "`comlora.loss_reduction = sum`, `train.clip_scope = auto`, annealing clock t = 1..T" in page
    lora_average = json.loads((out / "lora_r8-seed1" / "eval" / "winner" / "results.json").read_text())
    lora_row = next(line for line in page.splitlines() if line.startswith("| lora_r8 (n=1) |"))
    lora_validation = json.loads((out / "lora_r8-seed1" / "export" / "report.json").read_text())["validation"]
    arc = lora_average["metrics"]["per_task"]["ARC-Challenge"]["accuracy"]   # the only task with training rows
    predictions = [json.loads(line) for line in
                   (out / "lora_r8-seed1" / "eval" / "winner" / "predictions.jsonl").read_text().splitlines()]
    arc_rows = [p for p in predictions if p["task"] == "ARC-Challenge"]
    arc_kappa = cohen_kappa([p["pred"] for p in arc_rows], [p["answer"] for p in arc_rows])
    assert lora_row.endswith(f" | {lora_average['metrics']['average']:.1f} | {arc:.1f} | "
                             f"{arc_kappa:.2f} | {lora_validation['mean_loss'][0]:.4f} |")
    assert lora_row.split(" | ")[1].endswith("/0.00")   # plain LoRA has no selector
    winner = json.loads((out / "comlora_k2_r8-seed1" / "export" / "report.json").read_text())["winner"]
    assert "### ComLoRA's components (paper Table 10)" in page and "<!-- /reproduce: main -->" in page
    component_row = next(line for line in page.splitlines() if line.startswith("| comlora_k2_r8 seed 1 |"))
    assert component_row.split(" | ")[2].startswith(f"{winner} (")
    assert "| comlora_k2_r8 (n=1) |" in page
    assert "launch/train.py --deepspeed" in page and "launch/consolidate.py" in page
    assert page.endswith("## Notes\n\nHand-written conclusions.\n")     # the hand-written section survives
    assert "old table" not in page
    assert (out / "img" / "reproduce_curves.png").stat().st_size > 0

    logs = {p.name: p.stat().st_size for p in (out / "logs").iterdir()}
    again = drive(out)
    assert "$ " not in again                            # nothing run again
    assert {p.name: p.stat().st_size for p in (out / "logs").iterdir()} == logs


def test_each_grid_rewrites_only_its_own_section_of_the_results_page():
    """A sweep (--tag) adds its section; rewriting one grid keeps the others, their order and the notes."""
    first = compose_page("# Results\n\nold table\n\n## Notes\n\nHand-written.\n", "main", "## Main\n\nmain v1")
    assert "old table" not in first and first.endswith("\n## Notes\n\nHand-written.\n")
    swept = compose_page(first, "lr1e-4", "## Sweep lr1e-4\n\nsweep v1")
    page = compose_page(compose_page(swept, "main", "## Main\n\nmain v2"), "lr1e-4", "## Sweep lr1e-4\n\nsweep v2")
    assert "main v1" not in page and "sweep v1" not in page
    assert page.index("main v2") < page.index("sweep v2") < page.index("## Notes")
    assert page.count("<!-- reproduce: lr1e-4 -->") == 1 and page.count("<!-- /reproduce: main -->") == 1
    assert page.endswith("\n## Notes\n\nHand-written.\n")
    assert compose_page(page, "lr1e-4", "## Sweep lr1e-4\n\nsweep v2") == page    # kept sections stay byte-equal
    assert "<!-- reproduce: main -->\n## Main\n\nmain v2\n<!-- /reproduce: main -->" in page
    assert compose_page("", "lr1e-4", "## S\n\nonly").startswith("# Results\n")


def test_table10_row_calls_equal_test_averages_a_tie(tmp_path):
    def results(folder: str, accuracies: list[float]) -> None:
        path = tmp_path / "eval" / folder / "results.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({"metrics": {"per_task": {t: {"accuracy": a} for t, a in zip("ab", accuracies)}}}))

    report = {"winner": 1, "winner_by": "selector", "num_components": 2,
              "validation": {"lowest_loss_component": 1, "mean_loss": [0.2, 0.1], "selector_argmax_counts": [3, 5]}}
    results("component_0", [40.0, 30.0])
    results("winner", [30.0, 40.0])                     # same average, other answers right
    row = _component_row("run", tmp_path, report, ("a", "b"), ["a"])
    assert row.endswith("| tie (0, 1) | tie |") and "35.0 (40.0) / 35.0 (30.0)" in row
    (tmp_path / "eval" / "winner" / "results.json").unlink()
    (tmp_path / "eval" / "winner").rmdir()
    results("winner", [30.0, 30.0])
    assert _component_row("run", tmp_path, report, ("a", "b"), ["a"]).endswith("| 0 | no |")
