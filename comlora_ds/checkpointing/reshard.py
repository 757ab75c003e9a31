"""Resume on another world size, or another split of the same global batch.

ZeRO partitions the trainable fp32 weights and their Adam moments over the data-parallel ranks, so a checkpoint's
shard files fit only its own world size. When the ranks change, the checkpoint is converted by DeepSpeed's own
``deepspeed.checkpoint.ds_to_universal`` into a folder of the resuming run (``checkpoints/tmp-universal-<tag>``,
removed once every rank has loaded it, and by the next save if the run dies first) and loaded with
``"checkpoint": {"load_universal": true}``; the checkpoint itself is only read.

What carries over exactly: every trainable tensor and both Adam moments (fp32), the optimizer and scheduler step,
the global step and the position in the epoch. The global batch (micro-batch x accumulation x ranks) must stay the
same: DistributedSampler deals every optimizer step the same contiguous slice of the epoch's permutation (which
depends on the seed and epoch only) whatever the split, so the samples left in the epoch are exactly the ones the
uninterrupted run would still see. What cannot carry over: each rank's dropout and noise stream (they are per rank;
another world size gets new streams, seeded from (seed, rank, step)).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .run_layout import DS_CONFIG, RUN_CONFIG, TMP_PREFIX, read_trainer_state

UNIVERSAL_PREFIX = f"{TMP_PREFIX}universal-"


@dataclass(frozen=True)
class BatchLayout:
    """How one optimizer step's global batch is split."""
    world_size: int
    micro_batch_size: int
    gradient_accumulation_steps: int

    @property
    def global_batch(self) -> int:
        return self.world_size * self.micro_batch_size * self.gradient_accumulation_steps

    def describe(self) -> str:
        return (f"{self.world_size} rank(s) x micro-batch {self.micro_batch_size} x {self.gradient_accumulation_steps} "
                f"accumulation step(s) = {self.global_batch}")


def layout_of(cfg, world_size: int) -> BatchLayout:
    return BatchLayout(world_size, cfg.train.micro_batch_size, cfg.train.gradient_accumulation_steps)


def saved_layout(folder: Path) -> BatchLayout:
    """The split the checkpoint in ``folder`` was trained with (its trainer state and run config)."""
    from ..config import load_config

    return layout_of(load_config(folder / RUN_CONFIG), read_trainer_state(folder)["world_size"])


def batches_in_epoch(saved_batches: int, saved: BatchLayout, now: BatchLayout) -> int:
    """This rank's micro-batches of the epoch already consumed, counted in the new split: the same number of samples
    (checkpoints fall on step boundaries and the global batch is unchanged, so it divides)."""
    return saved_batches * saved.micro_batch_size * saved.world_size // (now.micro_batch_size * now.world_size)


def needs_universal(step_dir: Path, saved: BatchLayout, world_size: int) -> bool:
    """Only ZeRO (stage >= 1) partitions the state by rank; without it every rank's file holds all of it."""
    saved_ds = json.loads((step_dir / DS_CONFIG).read_text())        # the filled config the run trained with
    return saved.world_size != world_size and int((saved_ds.get("zero_optimization") or {}).get("stage") or 0) >= 1


def universal_work_dir(save_dir: Path, tag: str) -> Path:
    return Path(save_dir) / f"{UNIVERSAL_PREFIX}{tag}"


def convert_to_universal(step_dir: Path, work_dir: Path) -> Path:
    """``ds_to_universal`` of ``step_dir`` into ``work_dir/<tag>`` (run on one rank; the caller screened the files).
    A subprocess: the converter forks worker pools, which must not inherit the process group."""
    target = work_dir / step_dir.name
    shutil.rmtree(work_dir, ignore_errors=True)
    work_dir.mkdir(parents=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(step_dir),
           "--output_folder", str(target), "--inject_missing_state", "--num_extract_workers", "1",
           "--num_merge_workers", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        shutil.rmtree(work_dir, ignore_errors=True)
        raise RuntimeError(f"deepspeed.checkpoint.ds_to_universal failed on {step_dir}:\n{proc.stderr[-3000:]}")
    return target


def fresh_stream_seed(seed: int, rank: int, step: int) -> int:
    """A rank's dropout / noise stream after a resume on another world size: the saved per-rank streams no longer
    map onto the ranks, so each rank starts a new one, distinct from every rank's stream of the run's start."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1, np.uint64)[0])
