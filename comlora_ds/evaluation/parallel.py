"""Data-parallel evaluation: under ``torchrun --nproc_per_node N launch/evaluate.py ...`` each rank runs a share of the
batches and every rank ends up with every result.

The batches are exactly the ones a single process forms (the same rows, order and padding); rank r runs batches
r, r + N, r + 2N, ... and :func:`map_batches` gathers the per-batch results (``all_gather_object``) back into batch
order. So the outputs, and the metrics computed from them on every rank, are the single process's (same batch size,
same device type and dtype); rank 0 writes the files. Done by hand rather than with accelerate's
``split_between_processes``: its contiguous row slices would be sorted and batched per rank, so the batches (and their
padding) would not be the single process's.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

T = TypeVar("T")


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def join_launcher_group(device: str) -> None:
    """Under torchrun (``WORLD_SIZE`` > 1): join the process group, nccl when this rank's device is a GPU, else
    gloo. A single process does nothing."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return
    on_gpu = torch.device(device).type == "cuda"
    if on_gpu:
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group("nccl" if on_gpu else "gloo")


def leave_launcher_group() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def map_batches(run_batch: Callable[[int], T], n_batches: int, *, desc: str, progress: bool) -> list[T]:
    """``[run_batch(b) for b in range(n_batches)]``, the batches shared out over the ranks (see the module doc)."""
    rank, world = rank_and_world()
    mine = range(rank, n_batches, world)
    local = [run_batch(b) for b in tqdm(mine, desc=desc, disable=not progress or rank != 0, unit="batch")]
    if world == 1:
        return local
    shares: list[list[T]] = [[] for _ in range(world)]
    dist.all_gather_object(shares, local)
    return [shares[b % world][b // world] for b in range(n_batches)]
