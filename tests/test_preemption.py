"""Preemption on CPU (gloo): SIGUSR1 / SIGTERM stop every rank after the same step, one checkpoint is written, every
process exits 0, and launch/slurm.sbatch requeues the job.

The sbatch runs as Slurm would run it, with two stand-ins on PATH: ``srun`` (one task per "node" on this machine,
signals passed on to the tasks as srun does) and ``scontrol`` (answers ``show hostnames`` with 127.0.0.1 and records
every call). A launcher's exit code 0 means every rank it started exited 0 (torchrun and the deepspeed launcher both
report the first failing rank's code).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from helpers import REPO, base_overrides, ds_config, free_port, subprocess_env

pytestmark = pytest.mark.distributed

SRUN = """#!/bin/bash
# stand-in for srun: one task per node of SLURM_NNODES on this machine, USR1 and TERM passed on to the tasks
while [[ "$1" == --* ]]; do shift; done
pids=()
for ((node = 0; node < SLURM_NNODES; node++)); do
    SLURM_NODEID=$node "$@" &
    pids+=($!)
done
trap 'kill -USR1 "${pids[@]}" 2>/dev/null' USR1
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM
status=0
for pid in "${pids[@]}"; do
    while :; do
        wait "$pid" && code=0 || code=$?
        kill -0 "$pid" 2>/dev/null || break
    done
    [ "$code" = 0 ] || status=$code
done
exit $status
"""
SCONTROL = """#!/bin/bash
echo "$*" >> "$SCONTROL_LOG"
if [ "$1" = show ]; then echo 127.0.0.1; fi
"""
JOB_ID = "4242"
LONG_RUN = {"train.max_steps": 400, "train.save_steps": 0, "train.micro_batch_size": 2}


@pytest.fixture
def slurm_stubs(tmp_path):
    stubs = tmp_path / "bin"
    stubs.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    return stubs


def sbatch(stubs: Path, tmp_path: Path, overrides: list[str], nodes: int, gpus_per_node: int) -> subprocess.Popen:
    env = {**subprocess_env(), "PATH": f"{stubs}:{Path(sys.executable).parent}:{os.environ['PATH']}",
           "SCONTROL_LOG": str(tmp_path / "scontrol.log"), "SLURM_JOB_ID": JOB_ID, "SLURM_NNODES": str(nodes),
           "SLURM_JOB_NODELIST": f"node[1-{nodes}]", "GPUS_PER_NODE": str(gpus_per_node),
           "MASTER_PORT": str(free_port()), "DS_CONFIG": str(ds_config(tmp_path, 2))}
    log = open(tmp_path / "job.out", "w")
    return subprocess.Popen(["bash", str(REPO / "launch" / "slurm.sbatch"), *overrides], cwd=REPO, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait_for_training(proc: subprocess.Popen, out: Path, tmp_path: Path) -> None:
    """Until the first optimizer step is logged (the ranks handle their stop signals by then)."""
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 240
    while (not metrics.exists() or metrics.stat().st_size == 0) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert metrics.exists(), (tmp_path / "job.out").read_text()[-4000:]


def finish(proc: subprocess.Popen, tmp_path: Path) -> str:
    try:
        proc.wait(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    output = (tmp_path / "job.out").read_text()
    assert proc.returncode == 0, output[-6000:]
    return output


def assert_one_checkpoint_at_the_agreed_step(out: Path, world: int, output: str) -> int:
    checkpoints = out / "checkpoints"
    tag = (checkpoints / "latest").read_text()
    step = int(tag.split("_")[1])
    assert sorted(p.name for p in checkpoints.iterdir() if p.is_dir()) == [tag]     # one checkpoint, no tmp- left
    assert 1 <= step < LONG_RUN["train.max_steps"]
    assert json.loads((checkpoints / tag / "trainer_state.json").read_text())["global_step"] == step
    # every rank wrote its optimizer partition into the same step folder: they stopped after the same step
    assert len(list((checkpoints / tag).glob("*zero_pp_rank_*_mp_rank_00_optim_states.pt"))) == world
    assert output.count("stop requested (SIGTERM, SIGUSR1 or Ctrl-C)") == 1
    assert not (out / "validation.json").exists()
    return step


def test_catches_reads_the_handler_mask():
    from comlora_ds.checkpointing.preemption import catches

    previous = signal.signal(signal.SIGUSR1, lambda *_: None)
    try:
        assert catches(os.getpid(), signal.SIGUSR1)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert not catches(os.getpid(), signal.SIGUSR1)
    assert not catches(2 ** 22 + 1, signal.SIGUSR1)          # no such process


def test_time_limit_signal_stops_two_ranks_checkpoints_once_and_requeues(tmp_path, slurm_stubs):
    """``--signal=B:USR1@300``: the batch shell gets SIGUSR1; 2 ranks under torchrun stop after one step, write one
    checkpoint, every process exits 0 and the job requeues itself."""
    out = tmp_path / "run"
    proc = sbatch(slurm_stubs, tmp_path, base_overrides(out, **LONG_RUN), nodes=1, gpus_per_node=2)
    wait_for_training(proc, out, tmp_path)
    os.kill(proc.pid, signal.SIGUSR1)
    output = finish(proc, tmp_path)
    assert_one_checkpoint_at_the_agreed_step(out, 2, output)
    assert (tmp_path / "scontrol.log").read_text().splitlines() == ["show hostnames node[1-1]", f"requeue {JOB_ID}"]


@pytest.mark.slow
def test_preemption_of_two_nodes_on_loopback(tmp_path, slurm_stubs):
    """Preemption: Slurm sends SIGTERM to every process of the job (batch shell, srun, both nodes' torchrun and ranks).
    Two "nodes" of one rank each on 127.0.0.1 stop after the same step, checkpoint once, exit 0, and requeue."""
    out = tmp_path / "run"
    proc = sbatch(slurm_stubs, tmp_path, base_overrides(out, **LONG_RUN), nodes=2, gpus_per_node=1)
    wait_for_training(proc, out, tmp_path)
    job = psutil.Process(proc.pid)
    for process in [job, *job.children(recursive=True)]:
        try:
            process.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    output = finish(proc, tmp_path)
    assert_one_checkpoint_at_the_agreed_step(out, 2, output)
    assert (tmp_path / "scontrol.log").read_text().splitlines() == ["show hostnames node[1-2]", f"requeue {JOB_ID}"]


@pytest.mark.slow
@pytest.mark.parametrize("target", ["launcher", "rank 1 only"])
def test_deepspeed_launcher_stops_cleanly(tmp_path, target):
    """launch/preemptible.py over the deepspeed launcher, 2 ranks: SIGTERM to it (as Slurm's srun delivers it), or
    SIGUSR1 to rank 1 alone (rank 0 learns of it through the step's all-reduce); one checkpoint, exit code 0."""
    out = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "launch" / "preemptible.py"), sys.executable, "-m", "deepspeed.launcher.runner",
           "--num_gpus", "2", "--master_port", str(free_port()), str(REPO / "launch" / "train.py"),
           "--deepspeed", str(ds_config(tmp_path, 2)), *base_overrides(out, **LONG_RUN)]
    log = open(tmp_path / "job.out", "w")
    proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    wait_for_training(proc, out, tmp_path)
    if target == "launcher":
        os.kill(proc.pid, signal.SIGTERM)
    else:
        rank1, = [p for p in psutil.Process(proc.pid).children(recursive=True) if "--local_rank=1" in p.cmdline()]
        rank1.send_signal(signal.SIGUSR1)
    output = finish(proc, tmp_path)
    assert_one_checkpoint_at_the_agreed_step(out, 2, output)
