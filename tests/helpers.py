"""Helpers the tests share: a small ComLoRA model with non-zero adapters, and for the training tests the subprocess
environment, the CLI under torchrun, the tiny run's overrides, the DeepSpeed configs, loss trajectories. The
``reference`` run fixture is in conftest.py."""

from __future__ import annotations

import json
import os
import socket
import signal
import subprocess
import sys
from pathlib import Path

from assets import commonsense_file, tiny_model_dir

REPO = Path(__file__).resolve().parents[1]
FP32_TOL = 1e-5   # fp32: same math, different all-reduce order
BF16_TOL = 2e-2   # bf16: 8 mantissa bits; per-rank partial sums round differently


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env() -> dict:
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}


def base_overrides(output_dir: Path, **extra) -> list[str]:
    items = {
        "model.name_or_path": tiny_model_dir(),
        "data.train_files": f"[{commonsense_file('ARC-Challenge')}]",
        "data.max_train_samples": 48, "data.val_size": 8, "data.max_length": 64,
        "adapter.num_components": 2, "adapter.rank": 4, "adapter.dropout": 0.0, "comlora.noise": 0.0,
        "train.max_steps": 6, "train.save_steps": 3, "train.save_total_limit": 3, "train.learning_rate": 5e-3,
        "train.output_dir": output_dir, "logging.wandb_mode": "disabled", "train.micro_batch_size": 4,
    }
    items.update(extra)
    return [f"{key}={value}" for key, value in items.items()]


def ds_config(tmp_path: Path, stage: int) -> Path:
    """The shipped config, with ZeRO-3 forced to partition even tiny tensors (else it tests nothing)."""
    cfg = json.loads((REPO / "ds_configs" / f"zero{stage}.json").read_text())
    if stage == 3:
        cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path = tmp_path / f"zero{stage}.json"
    path.write_text(json.dumps(cfg))
    return path


def run_in_group(cmd: list, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True, ...)`` with the command in its own process group, all of
    which is killed when ``timeout`` fires: killing torchrun alone leaves its ranks running as orphans, so one hang
    would starve the rest of the suite."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            **kwargs)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise subprocess.TimeoutExpired(cmd, timeout, out, err) from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def launch(overrides: list[str], nproc: int, ds: Path, timeout: int = 300, wait: bool = True, port: int | None = None):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={port or free_port()}", str(REPO / "launch" / "train.py"), "--deepspeed", str(ds), *overrides]
    if not wait:
        return subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True, text=True)
    proc = run_in_group(cmd, timeout, env=subprocess_env())
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def step_losses(output_dir: Path, key: str = "loss") -> dict[int, float]:
    """Per-step ``key`` of metrics.jsonl (the total loss by default)."""
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in records if key in r}


def tensorboard_scalars(output_dir: Path) -> dict[tuple[str, int], float]:
    """Every scalar of the run's TensorBoard files as tensorboard's own reader sees them: {(tag, step): value}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(output_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return {(tag, e.step): e.value for tag in events.Tags()["scalars"] for e in events.Scalars(tag)}


def assert_trajectories_match(got: dict, want: dict, tol: float) -> None:
    assert got.keys() == want.keys(), (got, want)
    for step in want:
        assert abs(got[step] - want[step]) <= tol * max(1.0, abs(want[step])), (step, got, want)


def comlora_model(num_components=2, seed=0, overrides=(), **llama_overrides):
    """A ComLoRA model on conftest's tiny LLaMA with random (non-zero) B factors, and its config."""
    import torch

    from comlora_ds.config import load_config
    from comlora_ds.comlora.model import build_model
    from conftest import tiny_llama

    cfg = load_config(overrides=[f"adapter.num_components={num_components}", "adapter.rank=4",
                                 "adapter.dropout=0.0", "train.ce_chunk_size=7", *overrides])
    model = build_model(cfg, tiny_llama(seed=seed, **llama_overrides))
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for layer in model.adapter_layers().values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.05)
    return model, cfg
