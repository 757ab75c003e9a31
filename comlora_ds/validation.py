"""Scoring the validation split: per-component LM loss and the selector's accumulated scores.

The paper picks the winner as argmax_k of sim_k accumulated over the validation rows (eqs. 11-12).
We also report each component's validation LM loss and how often each component is the per-sample
argmax of the selector and the per-sample argmin of the loss, so a user sees whether the selector's
winner is the lowest-loss component. Used during training (sharded over ranks) and offline.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class ValidationScores:
    loss_sum: torch.Tensor          # [K] sum over samples of L[k, b]
    sim_sum: torch.Tensor | None    # [K] accumulated selector scores (None without a selector)
    selector_argmax: torch.Tensor   # [K] per-sample argmax-of-sims counts
    loss_argmin: torch.Tensor       # [K] per-sample argmin-of-loss counts
    num_samples: int

    @property
    def mean_loss(self) -> torch.Tensor:
        return self.loss_sum / max(self.num_samples, 1)

    @property
    def lowest_loss_component(self) -> int:
        return int(self.loss_sum.argmin())

    @property
    def winner(self) -> int:
        """argmax of the accumulated sims; the lowest validation loss without a selector."""
        return int(self.sim_sum.argmax()) if self.sim_sum is not None else self.lowest_loss_component

    def as_dict(self) -> dict:
        return {
            "winner": self.winner,
            "winner_by": "selector" if self.sim_sum is not None else "validation_loss",
            "lowest_loss_component": self.lowest_loss_component,
            "selector_winner_is_lowest_loss": self.winner == self.lowest_loss_component,
            "num_samples": self.num_samples,
            "mean_loss": self.mean_loss.tolist(),
            "sim_sum": None if self.sim_sum is None else self.sim_sum.tolist(),
            "selector_argmax_counts": self.selector_argmax.tolist(),
            "loss_argmin_counts": self.loss_argmin.tolist(),
        }


def shard_indices(num_rows: int, world_size: int, rank: int) -> tuple[list[int], list[bool]]:
    """This rank's rows, padded so every rank runs the same number of forwards (ZeRO-3 gathers are
    collective); the flags mark real rows (padding repeats row 0 and is not counted)."""
    padded = num_rows + (-num_rows) % world_size
    rows = list(range(rank, padded, world_size))
    return [r if r < num_rows else 0 for r in rows], [r < num_rows for r in rows]


@torch.no_grad()
def score_validation(model: Callable, rows: Sequence[dict], collate: Callable, num_components: int,
                     batch_size: int, device: torch.device | str = "cpu") -> ValidationScores:
    """Runs all K components on every validation row (batched mode). Under torch.distributed each
    rank scores its shard and the sums are all-reduced, so every rank returns the same scores."""
    distributed = dist.is_available() and dist.is_initialized()
    world, rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
    indices, real = shard_indices(len(rows), world, rank)
    k = num_components
    loss_sum, sim_sum = torch.zeros(k, device=device), torch.zeros(k, device=device)
    argmax, argmin = torch.zeros(k, device=device), torch.zeros(k, device=device)
    has_selector = False
    for start in range(0, len(indices), batch_size):
        batch = collate([rows[i] for i in indices[start:start + batch_size]])
        weight = torch.tensor(real[start:start + batch_size], dtype=torch.float32, device=device)
        out = model(**{name: t.to(device) for name, t in batch.items()})
        losses = out.losses.float()                                         # [K, B]
        loss_sum += (losses * weight).sum(1)
        argmin += torch.bincount(losses.argmin(0), weights=weight, minlength=k)
        if out.sims is not None:
            has_selector = True
            sim_sum += (out.sims.float() * weight[:, None]).sum(0)
            argmax += torch.bincount(out.sims.argmax(1), weights=weight, minlength=k)
    stats = torch.cat([loss_sum, sim_sum, argmax, argmin, torch.tensor([float(sum(real))], device=device)])
    if distributed:
        dist.all_reduce(stats)
    loss_sum, sim_sum, argmax, argmin, n = stats.cpu().split([k, k, k, k, 1])
    return ValidationScores(loss_sum, sim_sum if has_selector else None, argmax.long(), argmin.long(), int(n))
