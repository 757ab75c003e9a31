"""bench/reproduce_convai2.py end to end on the tiny LLaMA and a tiny ConvAI2 slice: the data it writes, the grid
(train -> consolidate -> evaluate, every ComLoRA component), and a results section whose numbers are checked
against the runs' own files (validation.json, results.json, predictions.jsonl); the archive of the finished runs
(--archive) gives the same tables and keeps a run from being run again."""

import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from assets import convai2_files, tiny_model_dir
from comlora_ds.evaluation.convai2 import parse_convai2, training_rows
from comlora_ds.evaluation.stats import paired_comparison
from helpers import subprocess_env

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import reproduce_convai2 as driver  # noqa: E402
import reproduce_convai2_report as report_module  # noqa: E402


def _cells(page: str, prefix: str) -> list[str]:
    line = next(line for line in page.splitlines() if line.startswith(prefix))
    return [cell.strip() for cell in line.strip("|").split("|")]


def _mean_sd(values: list[float], digits: int) -> str:
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def test_first_turns_and_dialogue_lines():
    lines = ["1 your persona: a.", "2 your persona: b.", "3 hi\tyo", "4 how ?\tfine", "5 bye\tsee you"]
    assert driver.first_turns(lines, 2) == lines[:4]
    assert driver.first_turns(lines, 0) == lines
    files = convai2_files()
    dialogues = driver.read_dialogue_lines([str(f) for f in files])
    assert len(dialogues) == 8 and all(d[0].startswith("1 your persona:") for d in dialogues)
    assert sum(len(parse_convai2(f)) for f in files) == 8


def test_best_of_keeps_the_lowest_validation_loss():
    runs = [{"seed": s, "validation": {"mean_loss": [loss]}} for s, loss in ((1, 0.3), (2, 0.1), (3, 0.2))]
    assert [r["seed"] for r in report_module.best_of(runs, 2)] == [2, 3, 2]     # (1,2) (1,3) (2,3)


@pytest.mark.slow     # ~3 min of subprocess start-ups; the grid machinery it shares (bench/grid.py) runs in test_reproduce
def test_grid_and_its_results_section(tmp_path):
    out = tmp_path / "grid"
    report = tmp_path / "results.md"
    files = [str(f) for f in convai2_files()]
    cmd = [sys.executable, str(REPO / "bench" / "reproduce_convai2.py"), "--out", str(out), "--model",
           str(tiny_model_dir()), "--files", *files, "--train-dialogues", "0:6", "--test-dialogues", "6:8",
           "--test-turns", "2", "--variants", "lora_r4", "comlora_k2_r4", "--seeds", "1", "2", "--max-steps", "2",
           "--eval-steps", "1", "--max-length", "128", "--val-size", "4", "--eval-batch", "4", "--max-new-tokens", "4",
           "--archive", str(tmp_path / "archive"), "--report", str(report)]
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # the data: dialogues 0-5 as training rows, 6-7 cut to two turns each as the test file
    info = json.loads((out / "data" / "data.json").read_text())
    train = json.loads((out / "data" / "train.json").read_text())
    all_dialogues = [d for f in files for d in parse_convai2(f)]
    assert train == training_rows(all_dialogues[:6], max_history=1) and info["train_rows"] == 24
    test = parse_convai2(out / "data" / "test.txt")
    assert [d.persona for d in test] == [d.persona for d in all_dialogues[6:8]]
    assert [d.turns for d in test] == [d.turns[:2] for d in all_dialogues[6:8]] and info["test_rows"] == 4

    page = report.read_text()
    runs = {(v, s): out / f"{v}-convai2-seed{s}" for v in ("lora_r4", "comlora_k2_r4") for s in (1, 2)}
    results = {key: json.loads((folder / "eval" / "winner" / "results.json").read_text())["metrics"]
               for key, folder in runs.items()}
    validation = {key: json.loads((folder / "validation.json").read_text()) for key, folder in runs.items()}

    # Table 4 rows: mean ± sd over the two seeds of each run's own numbers
    lora = _cells(page, "| lora_r4 |")
    assert lora[1] == "2"
    assert lora[2] == _mean_sd([results[("lora_r4", s)]["bleu"] for s in (1, 2)], 2)
    assert lora[8] == _mean_sd([results[("lora_r4", s)]["nll"] for s in (1, 2)], 3)
    assert lora[10] == _mean_sd([validation[("lora_r4", s)]["mean_loss"][0] for s in (1, 2)], 4)
    best_seed = min((1, 2), key=lambda s: validation[("lora_r4", s)]["mean_loss"][0])
    best = _cells(page, "| best-of-2 lora_r4 |")
    assert best[1] == "1" and best[8] == f"{results[('lora_r4', best_seed)]['nll']:.3f}"
    base = _cells(page, f"| {tiny_model_dir().name} (no training) |")
    base_nll = json.loads((out / "base" / "eval" / "results.json").read_text())["metrics"]["nll"]
    assert base[8] == f"{base_nll:.3f}"

    # the paired test, recomputed from the predictions files
    def nll_per_example(folder: Path) -> list[float]:
        rows = [json.loads(x) for x in (folder / "predictions.jsonl").read_text().splitlines()]
        return [r["nll_sum"] / r["response_tokens"] for r in rows]

    mine = [statistics.mean(v) for v in zip(*(nll_per_example(runs[("comlora_k2_r4", s)] / "eval" / "winner")
                                              for s in (1, 2)))]
    theirs = [statistics.mean(v) for v in zip(*(nll_per_example(runs[("lora_r4", s)] / "eval" / "winner")
                                                for s in (1, 2)))]
    c = paired_comparison(mine, theirs)
    row = _cells(page, "| comlora_k2_r4 selector vs lora_r4 | NLL / token |")
    assert row[2:6] == [f"{c.mean_a:.3f}", f"{c.mean_b:.3f}", f"{c.difference:+.3f}", f"{c.standard_error:.3f}"]
    assert row[7] == f"{c.sign_test_p:.2g}"
    assert _cells(page, "| comlora_k2_r4 soup vs best-of-2 lora_r4 | METEOR |")
    assert _cells(page, "| comlora_k2_r4 val_loss vs lora_r4 | NLL / token |")

    # each winner rule: selector = the winner's evaluation, val_loss = the lower-validation-loss component's, soup =
    # the merged soup's (its validation loss from the consolidation's report, which scores every rule)
    def rule_eval(seed: int, rule: str) -> Path:
        v, folder = validation[("comlora_k2_r4", seed)], runs[("comlora_k2_r4", seed)] / "eval"
        if rule == "soup":
            return folder / "soup"
        k = v["winner"] if rule == "selector" else v["lowest_loss_component"]
        return folder / ("winner" if k == v["winner"] else f"component_{k}")

    for rule in ("selector", "val_loss", "soup"):
        cells = _cells(page, f"| comlora_k2_r4 {rule} |")
        nll = [json.loads((rule_eval(s, rule) / "results.json").read_text())["metrics"]["nll"] for s in (1, 2)]
        assert cells[1] == "2" and cells[8] == _mean_sd(nll, 3)
    soup_val = [json.loads((runs[("comlora_k2_r4", s)] / "export" / "report.json").read_text())
                ["validation"]["rule_loss"]["soup"] for s in (1, 2)]
    assert _cells(page, "| comlora_k2_r4 soup |")[10] == _mean_sd(soup_val, 4)

    # the divergence over training: one row per validation (eval_steps 1: steps 1 and 2) from metrics.jsonl
    for seed in (1, 2):
        records = [json.loads(x)["validation"] for x in
                   (runs[("comlora_k2_r4", seed)] / "metrics.jsonl").read_text().splitlines() if '"validation"' in x]
        for v in records:
            cells = _cells(page, f"| comlora_k2_r4 seed {seed} | {v['step']} |")
            assert cells[2] == f"{v['update_divergence']['0-1']['relative_distance']:.3f}"
            assert cells[4] == f"{v['loss_difference']['0-1']['mean']:+.4f}"
        assert [v["step"] for v in records] == [1, 2]
    assert _cells(page, "| lora_r4 vs base | NLL / token |")

    # Table 10: each ComLoRA run's components, the selector's winner, and the test NLL of every component
    for seed in (1, 2):
        v = validation[("comlora_k2_r4", seed)]
        cells = _cells(page, f"| comlora_k2_r4 seed {seed} |")
        assert cells[1] == ", ".join(f"{x:.4f}" for x in v["mean_loss"])
        assert cells[2:4] == [str(v["winner"]), str(v["lowest_loss_component"])]
        folder = runs[("comlora_k2_r4", seed)] / "eval"
        nll = [json.loads((folder / ("winner" if k == v["winner"] else f"component_{k}") / "results.json")
                          .read_text())["metrics"]["nll"] for k in range(2)]
        assert cells[4] == ", ".join(f"{x:.3f}" for x in nll)
    assert "launch/train.py --deepspeed" in page and "<!-- /reproduce: convai2 -->" in page
    for folder in runs.values():          # finished runs keep what the report reads, not their merged models
        assert (folder / "export" / "report.json").is_file() and (folder / "checkpoints").is_dir()
        assert not (folder / "export" / "merged").exists() and not list(folder.glob("export/components/*"))
        assert not (folder / "export_soup" / "merged").exists()

    # the archive keeps every number the report reads: the page written from it (above) has the tables of the page
    # written from the run folders themselves
    from_runs = tmp_path / "from_runs.md"
    [arg_index] = [i for i, arg in enumerate(cmd) if arg == "--archive"]
    runs_cmd = cmd[:arg_index] + cmd[arg_index + 2:-1] + [str(from_runs), "--report-only"]
    proc = subprocess.run(runs_cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    tables = [[line for line in text.splitlines() if line.startswith("|")] for text in (page, from_runs.read_text())]
    assert tables[0] == tables[1] and len(tables[0]) > 30
    assert not list((tmp_path / "archive").rglob("*.safetensors")) and not list((tmp_path / "archive").rglob("*.pt"))

    # an archived run is not run again, even when its run folder is gone
    shutil.rmtree(runs[("lora_r4", 1)])
    rerun = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)   # everything is done
    assert rerun.returncode == 0 and "$ " not in rerun.stdout, rerun.stdout[-3000:]
    assert not runs[("lora_r4", 1)].exists() and report.read_text() == page


def test_other_data_settings_in_the_same_out_are_refused(tmp_path):
    files = [str(f) for f in convai2_files()]
    args = driver.parse_args(["--out", str(tmp_path), "--files", *files, "--train-dialogues", "0:6",
                              "--test-dialogues", "6:8"])
    driver.prepare_data(args)
    args.test_turns = 3
    with pytest.raises(SystemExit, match="made from other sources or settings"):
        driver.prepare_data(args)
