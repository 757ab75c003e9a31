"""Rank coordination that is not DeepSpeed's: one rank does a piece of work, every rank gets its result or its error;
and the clean-up of DeepSpeed's CPU shared-memory names."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Optional

import torch.distributed as dist


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def on_rank0(compute: Callable[[], Any]) -> Any:
    """``compute()`` on rank 0 only (hashing large files once), its result or its error given to every rank, so all
    ranks go on, or stop with the same error, together (no rank is left waiting for the broadcast). Without a process
    group: just ``compute()``."""
    if not _active():
        return compute()
    result, error = None, None
    if dist.get_rank() == 0:
        try:
            result = compute()
        except Exception as err:
            error = err
    shared = [result, error]
    dist.broadcast_object_list(shared, src=0)
    if shared[1] is not None:
        raise shared[1]
    return shared[0]


def on_local_leaders(compute: Callable[[], None], needed: bool) -> None:
    """``compute()`` on every node's local rank 0 where ``needed`` is true there; every rank then raises the first
    error any of them hit, or goes on."""
    error: Optional[Exception] = None
    if needed and int(os.environ.get("LOCAL_RANK", 0)) == 0:
        try:
            compute()
        except Exception as err:
            error = err
    if not _active():
        if error is not None:
            raise error
        return
    errors: list = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise first


def release_shm_names() -> None:
    """Remove this rank's ``/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>`` (66 MB of RAM).

    On CPU, when every rank is on one node, DeepSpeed's shm all-reduce op (built in ``init_distributed``) creates one
    such file per rank, maps every rank's, and never removes them, so each run used to leave them behind. Call after
    ``init_distributed`` on every rank: after the barrier every rank has mapped every buffer, and a removed name keeps
    its memory mapped until the processes exit, also after a crash or SIGKILL."""
    if not _active():
        return
    dist.barrier()
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{dist.get_rank()}")
    (Path("/dev/shm") / name).unlink(missing_ok=True)
