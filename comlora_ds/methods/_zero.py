"""A DeepSpeed helper shared by the methods (DeepSpeed is imported only when ZeRO-3 is actually in use)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor


@contextmanager
def gathered(params: list[Tensor]) -> Iterator[None]:
    """Inside the block, ZeRO-3-partitioned ``params`` hold their full values on every rank (a collective: all
    ranks must enter it for the same parameters in the same order); anything else is left as it is."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield
    else:
        yield
