"""Resume on another world size (DeepSpeed's universal checkpoint) and extending a finished run.

The loaded state is compared tensor by tensor with the checkpoint's own shards, un-partitioned independently of the
universal conversion (comlora_ds/export/recover.py, DeepSpeed's zero_to_fp32); the continued losses with the
uninterrupted run (dropout 0, noise 0, same global batch: the only difference is the order of floating-point
reductions, hence FP32_TOL).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from comlora_ds.checkpointing import manifest
from comlora_ds.export.recover import locate_checkpoint, recover_optimizer_state, recover_tensors
from comlora_ds.presets import run_config_path

from helpers import FP32_TOL, assert_trajectories_match, base_overrides, ds_config, free_port, launch, step_losses, \
    run_in_group, subprocess_env

pytestmark = pytest.mark.distributed

STEP3 = Path("checkpoints") / "step_00000003"
DEMO_PRESET = run_config_path("demo")          # what launch/train.py uses without --config

# Trains like launch/train.py (its demo preset, the overrides); at the first resumed step, before the optimizer touches anything, rank 0 writes the
# full fp32 weights and Adam moments every rank gathered from its ZeRO partitions, and the step counters.
STATE_AFTER_LOAD = """
import sys, torch, torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
from comlora_ds.config import load_config
from comlora_ds.training.engine import Trainer, TrainerCallback, exit_process

class WriteLoadedState(TrainerCallback):
    def __init__(self, path):
        self.path, self.written = path, False

    def on_gradients(self, trainer, step):
        if self.written:
            return
        self.written = True
        params = {n: p for n, p in trainer.engine.module.named_parameters() if p.requires_grad}
        state = {"step": step, "scheduler_step": trainer.engine.lr_scheduler.last_epoch,
                 "adam_steps": sorted({float(s["step"]) for s in trainer.engine.optimizer.optimizer.state.values()}),
                 "fp32": {n: safe_get_full_fp32_param(p) for n, p in params.items()},
                 **{m: {n: safe_get_full_optimizer_state(p, m) for n, p in params.items()}
                    for m in ("exp_avg", "exp_avg_sq")}}
        if dist.get_rank() == 0:
            torch.save(state, self.path)

cfg = load_config(sys.argv[3], overrides=sys.argv[4:])
trainer = Trainer(cfg, sys.argv[1], callbacks=[WriteLoadedState(sys.argv[2])])
trainer.train()
trainer.close()
exit_process(0)
"""


def resume_and_capture(tmp_path: Path, checkpoint: Path, nproc: int, stage: int, split: dict) -> tuple[Path, dict]:
    """Resumes ``checkpoint`` on ``nproc`` ranks; returns the run folder and the state it loaded."""
    script = tmp_path / "state_after_load.py"
    script.write_text(STATE_AFTER_LOAD)
    out, dump = tmp_path / "resumed", tmp_path / "loaded.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
           str(script), str(ds_config(tmp_path, stage)), str(dump), str(DEMO_PRESET),
           *base_overrides(out, **split, **{"train.resume": checkpoint})]
    proc = run_in_group(cmd, 300, env=subprocess_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, torch.load(dump)


def assert_state_is_the_checkpoints(loaded: dict, checkpoint: Path) -> None:
    ref = locate_checkpoint(checkpoint)
    saved = {"fp32": recover_tensors(ref), **{m: recover_optimizer_state(ref, m) for m in ("exp_avg", "exp_avg_sq")}}
    for kind, tensors in saved.items():
        assert loaded[kind].keys() == tensors.keys(), kind
        different = [n for n in tensors if not torch.equal(loaded[kind][n].float(), tensors[n])]
        assert not different, (kind, different[:4])
    assert all(t.abs().sum() > 0 for t in saved["exp_avg_sq"].values())     # three real steps, not zeros
    assert loaded["step"] == 4 and loaded["scheduler_step"] == 3 and loaded["adam_steps"] == [3.0]


def assert_resume_continues(reference: Path, checkpoint: Path, tmp_path: Path, nproc: int, stage: int,
                            split: dict) -> None:
    """Resumed on ``nproc`` ranks, ``checkpoint`` (step 3 of a run like ``reference``) loads the state it holds and
    continues the uninterrupted losses; the checkpoint stays as written and no conversion folder is left."""
    out, loaded = resume_and_capture(tmp_path, checkpoint, nproc, stage, split)
    assert_state_is_the_checkpoints(loaded, checkpoint)
    want = {s: v for s, v in step_losses(reference).items() if s > 3}
    assert_trajectories_match(step_losses(out), want, FP32_TOL)
    manifest.verify(checkpoint)           # every file as the save wrote it
    assert not list((out / "checkpoints").glob("tmp-*"))


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory) -> Path:
    """The reference's run (global batch 4) on 2 ranks of micro-batch 2, ZeRO-2."""
    out = tmp_path_factory.mktemp("two_ranks") / "run"
    launch(base_overrides(out, **{"train.micro_batch_size": 2}), nproc=2, ds=ds_config(out.parent, 2))
    return out


def test_two_ranks_resumed_on_one_with_gradient_accumulation(reference, two_rank_run, tmp_path):
    """2 ranks x micro-batch 2 -> 1 rank x micro-batch 2 x 2 accumulation steps."""
    assert_resume_continues(reference, two_rank_run / STEP3, tmp_path, nproc=1, stage=2,
                            split={"train.micro_batch_size": 2, "train.gradient_accumulation_steps": 2})


def test_one_rank_resumed_on_two(reference, tmp_path):
    assert_resume_continues(reference, reference / STEP3, tmp_path, nproc=2, stage=2,
                            split={"train.micro_batch_size": 2})


@pytest.mark.slow
@pytest.mark.parametrize("first,then", [(2, 1), (1, 2)])
def test_zero3_resumed_on_another_world_size(reference, tmp_path, first, then):
    run = tmp_path / "first"
    launch(base_overrides(run, **{"train.micro_batch_size": 4 // first}), nproc=first, ds=ds_config(tmp_path, 3))
    assert_resume_continues(reference, run / STEP3, tmp_path, nproc=then, stage=3,
                            split={"train.micro_batch_size": 4 // then})


def test_extending_a_finished_run_recomputes_the_schedule(reference, tmp_path):
    """The reference finished its 6 steps; resumed with max_steps=8 on purpose it trains steps 7 and 8 at the
    learning rate and eta an 8-step plan has there (what transformers' scheduler and the annealing give for T=8)."""
    from transformers import get_scheduler

    from comlora_ds.config import load_config
    from comlora_ds.comlora.losses import annealing_eta

    out = tmp_path / "extended"
    launch(base_overrides(out, **{"train.max_steps": 8, "train.resume": reference / "checkpoints" / "step_00000006",
                                  "train.resume_allow_changes": "[train.max_steps]"}),
           nproc=1, ds=ds_config(tmp_path, 2))
    cfg = load_config(DEMO_PRESET, overrides=base_overrides(out, **{"train.max_steps": 8}))
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.train.learning_rate)
    schedule = get_scheduler(cfg.train.lr_scheduler, optimizer, num_warmup_steps=int(cfg.train.warmup_ratio * 8),
                             num_training_steps=8)
    planned_lr = []
    for _ in range(8):
        planned_lr.append(schedule.get_last_lr()[0])
        optimizer.step()
        schedule.step()
    assert step_losses(out, "lr") == pytest.approx({7: planned_lr[6], 8: planned_lr[7]}, rel=1e-12)
    assert step_losses(out, "eta") == pytest.approx(
        {t: annealing_eta(cfg.comlora.annealing, t, 8, cfg.comlora.annealing_rate) for t in (7, 8)}, rel=1e-12)
    assert (out / "checkpoints" / "latest").read_text() == "step_00000008"


def test_the_epoch_position_is_counted_in_samples():
    from comlora_ds.checkpointing.reshard import BatchLayout, batches_in_epoch

    two_ranks, one_rank_accumulating = BatchLayout(2, 2, 1), BatchLayout(1, 2, 2)
    assert batches_in_epoch(3, two_ranks, one_rank_accumulating) == 6      # 3 steps of 4 samples either way
    assert batches_in_epoch(6, one_rank_accumulating, two_ranks) == 3


def test_new_rank_streams_are_not_the_run_start_streams():
    from comlora_ds.training.setup import rank_stream_seed
    from comlora_ds.checkpointing.reshard import fresh_stream_seed

    fresh = {fresh_stream_seed(42, rank, step) for rank in range(4) for step in (3, 6)}
    assert len(fresh) == 8 and not fresh & {rank_stream_seed(42, rank) for rank in range(4)}
