"""Benchmarks that run in other processes: a worker script with a JSON payload, and a training run under a
launcher (torchrun / deepspeed) on CPU with a free port.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from environment import REPO
from timing import wait_quiet


def run_worker(script: Path, payload: dict, timeout: int = 1800) -> dict:
    """Run ``script --worker JSON`` in a fresh Python process (its peak memory is its own); the worker
    prints one line ``RESULT {json}``."""
    proc = subprocess.run([sys.executable, str(script), "--worker", json.dumps(payload)], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"worker {payload} failed (rc {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def worker_result(result: dict) -> None:
    print("RESULT " + json.dumps(result), flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_training_env() -> dict:
    """The environment of a training subprocess on this CPU machine: one thread per rank, offline, this checkout."""
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}


def run_training(cmd: list[str], env: dict, output_dir: Path, timeout: float = 3600,
                 quiet: bool = True) -> tuple[list[dict], float]:
    """A training command run to the end (with ``quiet``, once the cores are quiet): (its metrics.jsonl records,
    its wall seconds)."""
    if quiet:
        wait_quiet()
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}\nfailed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()], wall
