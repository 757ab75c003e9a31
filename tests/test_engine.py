"""The DeepSpeed engine on CPU (gloo): 2 ranks vs 1 process, ZeRO-2/3, fp32/bf16, save/resume, kill.

Every run is the real CLI (``launch/train.py``) under ``torchrun``, on a tiny LLaMA shaped like stories260K and real
LLM-Adapters-format ARC-Challenge rows (tests/assets.py). Noise and dropout are 0 so runs with different world sizes
see identical numbers up to the order of floating-point reductions.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import (BF16_TOL, FP32_TOL, REPO, assert_trajectories_match, base_overrides, ds_config, free_port,
                     launch, run_in_group, step_losses, subprocess_env, tensorboard_scalars)

pytestmark = pytest.mark.distributed

def test_single_process_run_writes_everything(reference):
    losses = step_losses(reference)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    lm = step_losses(reference, "lm_loss")            # the total is mostly the selector's pairwise term early on
    assert lm[6] < lm[1]
    ckpts = reference / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_00000006"
    step_dir = ckpts / "step_00000006"
    for name in ("run_config.yaml", "ds_config.json", "rng_state_rank0.pt", "tokenizer", "data_report.json",
                 "validation_rows.jsonl"):
        assert (step_dir / name).exists(), name
    assert json.loads((step_dir / "ds_config.json").read_text())["train_batch_size"] == 4
    # the frozen base is excluded: only adapters, selector and optimizer state are stored
    assert sum(f.stat().st_size for f in step_dir.glob("*.pt")) < 3e6
    assert list((reference / "wandb").glob("offline-run-*/run-*.wandb")), "wandb offline files"
    validation = json.loads((reference / "validation.json").read_text())
    assert validation["num_samples"] == 8 and len(validation["mean_loss"]) == 2
    assert 0 <= validation["selector_agreement_rate"] <= 1 and validation["selector_rank_correlation"] is not None


def test_annealing_clock_counts_the_step_being_taken(reference):
    """eta of step 1 is eta(1) > 0 and the last step's is eta(T), the schedule's end value."""
    records = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    etas = {r["step"]: r["eta"] for r in records if "eta" in r}
    assert etas == pytest.approx({t: 1 - math.exp(-5.0 * t / 6) for t in range(1, 7)}, abs=1e-12)


@pytest.mark.parametrize("stage,extra", [
    (2, {}),
    # ZeRO-3, 2 ranks vs 1 process with the default per-group clipping: also test_clipping's per-group ZeRO-3 test
    pytest.param(3, {}, marks=pytest.mark.slow),
    pytest.param(2, {"comlora.execution": "sequential"}, marks=pytest.mark.slow),    # sequential: ZeRO-3 below
    (3, {"comlora.execution": "sequential", "model.gradient_checkpointing": "true"}),
])
def test_two_ranks_match_single_process(reference, tmp_path, stage, extra):
    """Same global batch on 2 ranks (ZeRO-2/3, batched or component-sequential execution, with or
    without activation checkpointing) gives the single-process loss trajectory."""
    out = tmp_path / "run"
    launch(base_overrides(out, **{"train.micro_batch_size": 2}, **extra), nproc=2, ds=ds_config(tmp_path, stage))
    assert_trajectories_match(step_losses(out), step_losses(reference), FP32_TOL)
    assert json.loads((out / "validation.json").read_text())["mean_loss"] == pytest.approx(
        json.loads((reference / "validation.json").read_text())["mean_loss"], rel=FP32_TOL)


def test_gradient_accumulation_matches_larger_micro_batch(reference, tmp_path):
    out = tmp_path / "run"
    launch(base_overrides(out, **{"train.micro_batch_size": 2, "train.gradient_accumulation_steps": 2}),
           nproc=1, ds=ds_config(tmp_path, 2))
    assert_trajectories_match(step_losses(out), step_losses(reference), FP32_TOL)


@pytest.mark.parametrize("stage", [pytest.param(2, marks=pytest.mark.slow), 3])   # ZeRO-3 runs the partitioned start
def test_two_ranks_bf16_match_single_process_bf16(tmp_path, stage):
    """The LM loss (what the adapters learn from) agrees to bf16 precision. The total is not held to BF16_TOL: its
    pairwise term compares *summed* response losses, which carry each token's bf16 rounding n times over (the
    total's agreement is tested in fp32 above)."""
    short = {"train.max_steps": 3, "train.save_steps": 0}
    ref = tmp_path / "ref"
    launch(base_overrides(ref, **short, **{"train.bf16": "true"}), nproc=1, ds=ds_config(tmp_path, stage))
    out = tmp_path / "run"
    launch(base_overrides(out, **short, **{"train.bf16": "true", "train.micro_batch_size": 2}), nproc=2,
           ds=ds_config(tmp_path, stage))
    assert_trajectories_match(step_losses(out, "lm_loss"), step_losses(ref, "lm_loss"), BF16_TOL)


# ZeRO-2, one rank: also covered, bit for bit on 2 ranks, by test_killed_run_with_dropout_and_noise_resumes_bit_exactly
@pytest.mark.parametrize("stage,nproc", [pytest.param(2, 1, marks=pytest.mark.slow), (3, 2)])
def test_resume_continues_the_uninterrupted_trajectory(reference, tmp_path, stage, nproc):
    """Train 6 steps with a checkpoint at 3 (same world size), resume from step 3: steps 4-6 match."""
    micro = 4 // nproc
    first = tmp_path / "first"
    launch(base_overrides(first, **{"train.micro_batch_size": micro}), nproc=nproc, ds=ds_config(tmp_path, stage))
    resumed = tmp_path / "resumed"
    launch(base_overrides(resumed, **{"train.micro_batch_size": micro,
                                      "train.resume": first / "checkpoints" / "step_00000003"}),
           nproc=nproc, ds=ds_config(tmp_path, stage))
    want = {s: v for s, v in step_losses(reference).items() if s > 3}
    assert_trajectories_match(step_losses(resumed), want, FP32_TOL)


@pytest.mark.slow      # the 2-rank kill-and-resume test below checks the same bit for bit in the default suite
def test_resume_is_bit_exact_with_dropout_and_noise(tmp_path):
    """Adapter dropout 0.05 and pairwise noise 0.1 (the defaults) draw from the RNG a checkpoint restores: a run
    resumed from step 3 repeats the uninterrupted run's steps 4-6 exactly."""
    random_parts = {"adapter.dropout": 0.05, "comlora.noise": 0.1}
    full = tmp_path / "full"
    launch(base_overrides(full, **random_parts), nproc=1, ds=ds_config(tmp_path, 2))
    resumed = tmp_path / "resumed"
    launch(base_overrides(resumed, **random_parts, **{"train.resume": full / "checkpoints" / "step_00000003"}),
           nproc=1, ds=ds_config(tmp_path, 2))
    want = {s: v for s, v in step_losses(full).items() if s > 3}
    assert step_losses(resumed) == want


RANK_STREAMS = """
import sys, torch, torch.distributed as dist
from comlora_ds.config import load_config
from comlora_ds.training.engine import Trainer, exit_process
trainer = Trainer(load_config(overrides=sys.argv[3:]), sys.argv[1])
weights = {n: p.detach().clone() for n, p in trainer.engine.module.named_parameters() if p.requires_grad}
torch.save({"weights": weights, "draws": torch.rand(16)}, f"{sys.argv[2]}/rank{dist.get_rank()}.pt")
trainer.close()
exit_process(0)
"""


def test_ranks_draw_independent_streams_from_identical_initial_weights(tmp_path):
    """Data-parallel ranks see different batches: their dropout masks and pairwise noise come from different
    streams (what the trainer leaves in torch's global RNG), while every rank starts from the same adapters."""
    script = tmp_path / "streams.py"
    script.write_text(RANK_STREAMS)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(script), str(ds_config(tmp_path, 2)), str(tmp_path), *base_overrides(tmp_path / "run")]
    proc = run_in_group(cmd, 300, env=subprocess_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    import torch

    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["weights"].keys() == r1["weights"].keys() and len(r0["weights"]) > 0
    assert all(torch.equal(r0["weights"][n], r1["weights"][n]) for n in r0["weights"])
    assert not torch.equal(r0["draws"], r1["draws"])


SETUP_ORDER = """
import json, sys
from comlora_ds.config import load_config
from comlora_ds.training import setup
from comlora_ds.training.engine import Trainer, exit_process
calls = []
for name in setup.STAGES:
    def recorded(*args, _stage=getattr(setup, name), _name=name):
        calls.append(_name)
        return _stage(*args)
    setattr(setup, name, recorded)
trainer = Trainer(load_config(overrides=sys.argv[3:]), sys.argv[1])
json.dump(calls, open(sys.argv[2], "w"))
trainer.close()
exit_process(0)
"""


def test_trainer_runs_each_setup_stage_once_in_order(tmp_path):
    """The set-up is the stages of training/setup.py, each called once and in the documented order."""
    script = tmp_path / "order.py"
    script.write_text(SETUP_ORDER)
    proc = run_in_group([sys.executable, str(script), str(ds_config(tmp_path, 2)), str(tmp_path / "calls.json"),
                         *base_overrides(tmp_path / "run")], 300, env=subprocess_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    from comlora_ds.training.setup import STAGES

    assert json.loads((tmp_path / "calls.json").read_text()) == list(STAGES) == [
        "plan_run", "build_data", "build_method", "plan_resume", "build_ds_config", "build_model", "build_engine"]


def test_selector_learning_rate_sets_the_selectors_step_alone(tmp_path):
    """comlora.selector_learning_rate: the selector's parameters are their own optimizer groups at that rate. Adam's
    second step moves a parameter by at most ~1.002 lr (the bias-corrected m / sqrt(v) of two gradients), so between
    the step-1 and step-2 checkpoints no selector entry moves more than that (plus fp32 rounding of weights near 1,
    whose ulp is 1.2e-7: measured 1.013e-6 at most), while the adapters move at 5e-3."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    out, selector_lr = tmp_path / "run", 1e-6
    launch(base_overrides(out, **{"train.max_steps": 2, "train.save_steps": 1, "train.lr_scheduler": "constant",
                                  "train.warmup_ratio": 0.0, "train.weight_decay": 0.0,
                                  "comlora.selector_learning_rate": selector_lr}), nproc=1, ds=ds_config(tmp_path, 2))
    states = [get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoints"), tag=f"step_{step:08d}")
              for step in (1, 2)]
    moved = {name: (states[1][name] - states[0][name]).abs().max().item() for name in states[0]}
    selector = [v for name, v in moved.items() if name.startswith("selector.")]
    adapters = [v for name, v in moved.items() if ".lora_" in name]
    assert selector and adapters
    assert 0.5 * selector_lr < max(selector) <= 1.1 * selector_lr
    assert max(adapters) > 0.5 * 5e-3


def kill_after_first_checkpoint(overrides: list[str], out: Path, tmp_path: Path) -> Path:
    """Starts a 2-rank ZeRO-2 run and SIGKILLs it once its first checkpoint is published; returns ``latest``."""
    proc = launch(overrides, nproc=2, ds=ds_config(tmp_path, 2), wait=False)
    latest = out / "checkpoints" / "latest"
    deadline = time.time() + 240
    while not latest.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert latest.exists(), proc.stdout.read()[-3000:]
    return latest


@pytest.mark.slow    # its checks of the leftover, metrics.jsonl and TensorBoard are also in the bit-exact test below
def test_killed_run_resumes_from_last_complete_checkpoint(reference, tmp_path):
    """SIGKILL a 2-rank run after its first checkpoint; a leftover partial checkpoint is never used;
    resume=auto continues and matches the uninterrupted run."""
    out = tmp_path / "run"
    overrides = base_overrides(out, **{"train.micro_batch_size": 2, "train.save_steps": 2, "train.max_steps": 6})
    latest = kill_after_first_checkpoint(overrides, out, tmp_path)
    tag = latest.read_text()
    # a crash in the middle of the next save leaves a tmp- folder behind: it must be ignored
    shutil.copytree(out / "checkpoints" / tag, out / "checkpoints" / "tmp-step_00000099")
    launch(overrides + ["train.resume=auto"], nproc=2, ds=ds_config(tmp_path, 2))
    assert_trajectories_match(step_losses(out), step_losses(reference), FP32_TOL)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6], steps        # each step once: the killed run's steps past its checkpoint dropped
    assert not list((out / "checkpoints").glob("tmp-*"))
    # TensorBoard too: the resumed run purged the killed run's events past its checkpoint (purge_step)
    logged = {step: value for (tag, step), value in tensorboard_scalars(out).items() if tag == "loss"}
    assert logged == pytest.approx(step_losses(out), rel=1e-6)


def test_killed_run_with_dropout_and_noise_resumes_bit_exactly(tmp_path):
    """kill -9 of a 2-rank run with the default adapter dropout and pairwise noise, then resume=auto: every step's
    loss equals the uninterrupted run's exactly (each rank's RNG stream comes back with the checkpoint); a leftover
    partial checkpoint is never used and is removed; metrics.jsonl and TensorBoard hold each step once."""
    random_parts = {"adapter.dropout": 0.05, "comlora.noise": 0.1, "train.micro_batch_size": 2, "train.save_steps": 2}
    full = tmp_path / "full"
    launch(base_overrides(full, **random_parts), nproc=2, ds=ds_config(tmp_path, 2))
    out = tmp_path / "run"
    overrides = base_overrides(out, **random_parts)
    tag = kill_after_first_checkpoint(overrides, out, tmp_path).read_text()
    # a crash in the middle of the next save leaves a tmp- folder behind: it must be ignored
    shutil.copytree(out / "checkpoints" / tag, out / "checkpoints" / "tmp-step_00000099")
    launch(overrides + ["train.resume=auto"], nproc=2, ds=ds_config(tmp_path, 2))
    assert step_losses(out) == step_losses(full)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6], steps        # each step once: the killed run's steps past its checkpoint dropped
    assert not list((out / "checkpoints").glob("tmp-*"))
    logged = {step: value for (tag, step), value in tensorboard_scalars(out).items() if tag == "loss"}
    assert logged == pytest.approx(step_losses(out), rel=1e-6)


def test_ctrl_c_writes_a_checkpoint_before_exit(tmp_path):
    """Ctrl-C in the terminal (SIGINT to the process group): a checkpoint at the next step boundary, then the run
    stops. SIGTERM / SIGUSR1 (preemption) are tested in tests/test_preemption.py."""
    out = tmp_path / "run"
    overrides = base_overrides(out, **{"train.max_steps": 400, "train.save_steps": 0})
    proc = launch(overrides, nproc=1, ds=ds_config(tmp_path, 2), wait=False)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while (not metrics.exists() or metrics.stat().st_size == 0) and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)    # every process of the job gets it
    output, _ = proc.communicate(timeout=120)
    tag = (out / "checkpoints" / "latest").read_text()
    assert 1 <= int(tag.split("_")[1]) < 400 and "stop requested (SIGTERM, SIGUSR1 or Ctrl-C)" in output


def test_two_nodes_on_loopback(tmp_path):
    """Two "nodes" of one rank each on 127.0.0.1 with the deepspeed launcher: trains and checkpoints."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    out = tmp_path / "run"
    port = free_port()
    overrides = base_overrides(out, **{"train.micro_batch_size": 2, "train.max_steps": 2, "train.save_steps": 2})
    procs = [subprocess.Popen(
        [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile), "--no_ssh",
         "--node_rank", str(rank), "--master_addr", "127.0.0.1", "--master_port", str(port),
         str(REPO / "launch" / "train.py"), "--deepspeed", str(ds_config(tmp_path, 2)), *overrides],
        env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        for rank in (0, 1)]
    try:
        outputs = [p.communicate(timeout=300)[0] for p in procs]
    finally:                     # a hang must not leave the launchers' ranks running as orphans
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outputs)
    assert (out / "checkpoints" / "latest").read_text() == "step_00000002"
    assert json.loads((out / "checkpoints" / "step_00000002" / "ds_config.json").read_text())["train_batch_size"] == 4


def test_rank_stream_seeds_are_distinct_and_reproducible():
    from comlora_ds.training.setup import rank_stream_seed

    seeds = {(seed, rank): rank_stream_seed(seed, rank) for seed in range(4) for rank in range(8)}
    assert len(set(seeds.values())) == len(seeds)                   # seed + rank would collide: (1, 0) vs (0, 1)
    assert rank_stream_seed(42, 3) == rank_stream_seed(42, 3)
