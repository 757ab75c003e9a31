"""Padding-free micro-batches (``data.packing = padding_free``) and length-grouped sampling (``data.group_by_length``).

A packed micro-batch of B rows with n_0 .. n_{B-1} tokens (T = sum n_b) is one sequence:

* ``input_ids [1, T]``: the rows one after the other, no pad token;
* ``position_ids [1, T]``: 0 .. n_b - 1 for row b, restarting at every row. transformers (>= 4.56; 5.25 tested) turns
  restarting positions with no ``attention_mask`` into a block-diagonal causal mask for sdpa and eager
  (``masking_utils.find_packed_sequence_indices``); flash_attention_2 gets the row boundaries as varlen
  ``cu_seq_lens`` (:func:`flash_varlen_kwargs`), so attention never crosses a row;
* ``labels [1, T]``: each row's labels, with the row's first token -100: no position predicts a row's first token
  from the row before (a padded row's first label is never a target either, so the targets are the same);
* ``segment_ids [1, T]``: b on row b's tokens; the per-row losses and the selector's rows come from it.

A packed micro-batch holds the ``train.micro_batch_size`` rows a padded one would, so the step's objective is the
padded one. :class:`LengthGroupedSampler` orders rows so that a padded micro-batch holds rows of similar length; it is
deterministic for (seed, epoch), like ``DistributedSampler``, so a resumed run sees the rows it would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DistributedSampler

from .tokenize import IGNORE_INDEX

# Attention implementations whose packed forward is tested to keep rows apart (tests/test_packing.py; FA2 by varlen).
PACKED_ATTENTION = ("sdpa", "eager", "flash_attention_2")
# Rows sorted together by data.group_by_length: this many global batches (HF's LengthGroupedSampler uses 50).
LENGTH_GROUP_BATCHES = 50


def check_packed_attention(implementation: str) -> None:
    """Refuse an attention implementation that is not known to isolate the rows of a packed sequence."""
    if implementation not in PACKED_ATTENTION:
        raise ValueError(f"model.attn_implementation = {implementation!r} cannot keep the rows of a packed batch "
                         f"apart (data.packing = padding_free needs one of {', '.join(PACKED_ATTENTION)})")


class PackedCollator:
    """Concatenate a list of rows (``input_ids``, ``labels``; lists or 1-D tensors) into one packed sequence (module
    doc)."""

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not rows:
            raise ValueError("PackedCollator got an empty batch")
        ids = [torch.as_tensor(row["input_ids"], dtype=torch.long) for row in rows]
        labels = [torch.as_tensor(row["labels"], dtype=torch.long).clone() for row in rows]
        for i, (x, y) in enumerate(zip(ids, labels)):
            if x.ndim != 1 or x.shape != y.shape or len(x) == 0:
                raise ValueError(f"batch row {i}: input_ids {tuple(x.shape)} and labels {tuple(y.shape)} must be "
                                 "equal, non-empty 1-D sequences")
            y[0] = IGNORE_INDEX
        return {
            "input_ids": torch.cat(ids)[None],
            "labels": torch.cat(labels)[None],
            "position_ids": torch.cat([torch.arange(len(x)) for x in ids])[None],
            "segment_ids": torch.cat([torch.full((len(x),), b) for b, x in enumerate(ids)])[None],
        }


def row_lengths(segment_ids: torch.Tensor) -> torch.Tensor:
    """[B] tokens of each row of a packed sequence, from its ``segment_ids [1, T]``."""
    return torch.bincount(segment_ids[0])


def unpack_rows(packed: torch.Tensor, segment_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``packed [1, T, ...]`` as right-padded rows ``[B, L, ...]`` (zeros after each row) and their ``[B, L]`` mask."""
    lengths = row_lengths(segment_ids).tolist()
    rows = torch.split(packed[0], lengths)
    mask = [torch.ones(n, dtype=torch.long, device=packed.device) for n in lengths]
    return pad_sequence(rows, batch_first=True), pad_sequence(mask, batch_first=True)


def flash_varlen_kwargs(segment_ids: torch.Tensor, copies: int) -> dict[str, Any]:
    """FlashAttention-2's varlen arguments for ``copies`` replicas of a packed sequence ([copies, T], flattened row by
    row): transformers infers row boundaries from ``position_ids`` only for a batch of one sequence, so the K-replicated
    batch passes them explicitly."""
    lengths = row_lengths(segment_ids).repeat(copies)
    cu_seq_lens = torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    longest = int(lengths.max())
    return {"cu_seq_lens_q": cu_seq_lens, "cu_seq_lens_k": cu_seq_lens, "max_length_q": longest,
            "max_length_k": longest}


def real_tokens(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Non-pad tokens of a padded (``attention_mask``) or packed micro-batch."""
    return batch["attention_mask"].sum() if "attention_mask" in batch else torch.tensor(batch["input_ids"].numel())


def _epoch_permutation(num_rows: int, seed: int, epoch: int) -> list[int]:
    """The row order of DistributedSampler(shuffle=True) for (seed, epoch)."""
    g = torch.Generator().manual_seed(seed + epoch)
    return torch.randperm(num_rows, generator=g).tolist()


class LengthGroupedSampler(DistributedSampler):
    """DistributedSampler (shuffle, drop_last) whose epoch permutation is sorted by row length, longest first, within
    consecutive groups of ``LENGTH_GROUP_BATCHES`` global batches (``global_batch`` = micro-batch x accumulation x
    ranks). The order depends on (seed, epoch) and the rows' lengths only, and a group is a whole number of optimizer
    steps, so resume (and a resume on another split of the same global batch) sees exactly the rows the run would
    have seen. Each rank takes every ``world``-th row of the sorted order, as DistributedSampler does."""

    def __init__(self, lengths: Sequence[int], global_batch: int, num_replicas: int = 1, rank: int = 0,
                 seed: int = 0):
        super().__init__(range(len(lengths)), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed,
                         drop_last=True)
        self.lengths, self.group = list(lengths), global_batch * LENGTH_GROUP_BATCHES

    def __iter__(self) -> Iterator[int]:
        order = _epoch_permutation(len(self.lengths), self.seed, self.epoch)
        grouped = []       # grouped before the cut to total_size (which depends on the world size)
        for start in range(0, len(order), self.group):
            grouped += sorted(order[start:start + self.group], key=lambda row: -self.lengths[row])
        return iter(grouped[self.rank:self.total_size:self.num_replicas])
