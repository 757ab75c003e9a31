"""Scoring the validation split: per-component LM loss and the selector's accumulated scores.

The paper picks the winner as argmax_k of sim_k accumulated over the validation rows (eqs. 11-12).
We also report each component's validation LM loss, how often each component is the per-sample
argmax of the selector and the per-sample argmin of the loss, how often the two coincide on a sample
(the selector's per-sample agreement), and the Spearman rank correlation between the selector's scores
and -loss, both centred per sample over the components (does a larger score margin go with a larger loss
margin?), so a user sees whether the selector learned anything. Used during training (sharded over ranks)
and offline.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from scipy.stats import spearmanr

from .divergence import loss_difference, verdict


@dataclass
class ValidationScores:
    loss_sum: torch.Tensor          # [K] sum over samples of L[k, b]
    sim_sum: torch.Tensor | None    # [K] accumulated selector scores (None without a selector)
    selector_argmax: torch.Tensor   # [K] per-sample argmax-of-sims counts
    loss_argmin: torch.Tensor       # [K] per-sample argmin-of-loss counts
    num_samples: int
    agreement: int = 0              # samples whose selector argmax is their loss argmin
    rank_correlation: float | None = None   # Spearman(sims, -loss), centred per sample (None without a selector)
    row_losses: torch.Tensor | None = None  # [N, K] per validation row, in the split's order
    row_sims: torch.Tensor | None = None    # [N, K] (None without a selector)
    update_divergence: dict | None = None   # comlora_ds.comlora.divergence.update_divergence of the scored components

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
            "winner_loss": float(self.mean_loss[self.winner]),
            "lowest_loss_component": self.lowest_loss_component,
            "selector_winner_is_lowest_loss": self.winner == self.lowest_loss_component,
            "num_samples": self.num_samples,
            "mean_loss": self.mean_loss.tolist(),
            "sim_sum": None if self.sim_sum is None else self.sim_sum.tolist(),
            "selector_argmax_counts": self.selector_argmax.tolist(),
            "loss_argmin_counts": self.loss_argmin.tolist(),
            "selector_agreement_rate": (self.agreement / self.num_samples
                                        if self.sim_sum is not None and self.num_samples else None),
            "selector_rank_correlation": self.rank_correlation,
            **self.divergence(),
        }

    def divergence(self) -> dict:
        """Are the components different? Their validation-loss difference per pair (with the one-line verdict) and
        the weight-space distance of their updates (:mod:`comlora_ds.comlora.divergence`)."""
        if self.row_losses is None:
            return {}
        difference = loss_difference(self.row_losses)
        return {"loss_difference": difference, "distinguishability": verdict(difference),
                "update_divergence": self.update_divergence}

    def per_row(self) -> list[dict]:
        """One record per validation row: each component's loss and selector score (what every aggregate is
        computed from)."""
        sims = self.row_sims.tolist() if self.row_sims is not None else [None] * len(self.row_losses)
        return [{"row": i, "loss": loss, "sim": sim} for i, (loss, sim) in enumerate(zip(self.row_losses.tolist(), sims))]


def centred_rank_correlation(sims: torch.Tensor, losses: torch.Tensor) -> float | None:
    """Spearman correlation of sims [N, K] with -losses [N, K], each centred per sample over the K components
    (removes how hard a sample is, keeps how the components compare on it). None when undefined."""
    if sims.shape[0] < 2:
        return None
    x = (sims - sims.mean(1, keepdim=True)).flatten().double().numpy()
    y = (-(losses - losses.mean(1, keepdim=True))).flatten().double().numpy()
    rho = spearmanr(x, y).statistic
    return None if rho != rho else float(rho)


def shard_indices(num_rows: int, world_size: int, rank: int) -> tuple[list[int], list[bool]]:
    """This rank's rows, padded so every rank runs the same number of forwards (ZeRO-3 gathers are
    collective); the flags mark real rows (padding repeats row 0 and is not counted)."""
    padded = num_rows + (-num_rows) % world_size
    rows = list(range(rank, padded, world_size))
    return [r if r < num_rows else 0 for r in rows], [r < num_rows for r in rows]


@torch.no_grad()
def score_validation(model: Callable, rows: Sequence[dict], collate: Callable, num_components: int,
                     batch_size: int, device: torch.device | str = "cpu", by_length: bool = True) -> ValidationScores:
    """Runs all K components on every validation row (batched mode). Under torch.distributed each
    rank scores its shard and the sums are all-reduced, so every rank returns the same scores.

    ``by_length``: each rank scores its rows longest first, so a padded batch holds rows of similar length (less
    padding, K times over); a row's scores do not depend on its batch-mates, and the per-row results come back in the
    split's order, so only the summation order of the totals changes (fp32 rounding; tested)."""
    distributed = dist.is_available() and dist.is_initialized()
    world, rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
    indices, real = shard_indices(len(rows), world, rank)
    if by_length:
        order = sorted(range(len(indices)), key=lambda i: -len(rows[indices[i]]["input_ids"]))
        indices, real = [indices[i] for i in order], [real[i] for i in order]
    k = num_components
    loss_sum, sim_sum = torch.zeros(k, device=device), torch.zeros(k, device=device)
    argmax, argmin = torch.zeros(k, device=device), torch.zeros(k, device=device)
    has_selector, per_sample_sims, per_sample_losses = False, [], []
    row_ids = torch.tensor(indices, dtype=torch.float32, device=device)
    for start in range(0, len(indices), batch_size):
        batch = collate([rows[i] for i in indices[start:start + batch_size]])
        weight = torch.tensor(real[start:start + batch_size], dtype=torch.float32, device=device)
        out = model(**{name: t.to(device) for name, t in batch.items()})
        losses = out.losses.float()                                         # [K, B]
        loss_sum += (losses * weight).sum(1)
        argmin += torch.bincount(losses.argmin(0), weights=weight, minlength=k)
        per_sample_losses.append(losses.t())
        if out.sims is not None:
            has_selector = True
            sim_sum += (out.sims.float() * weight[:, None]).sum(0)
            argmax += torch.bincount(out.sims.argmax(1), weights=weight, minlength=k)
            per_sample_sims.append(out.sims.float())
    stats = torch.cat([loss_sum, sim_sum, argmax, argmin, torch.tensor([float(sum(real))], device=device)])
    if distributed:
        dist.all_reduce(stats)
    loss_sum, sim_sum, argmax, argmin, n = stats.cpu().split([k, k, k, k, 1])
    scores = ValidationScores(loss_sum, sim_sum if has_selector else None, argmax.long(), argmin.long(), int(n))
    if not per_sample_losses:
        return scores
    losses = torch.cat(per_sample_losses)
    sims = torch.cat(per_sample_sims) if has_selector else torch.zeros_like(losses)
    sims, losses = _gather_samples(sims, losses, row_ids, torch.tensor(real, device=device), distributed, world)
    scores.row_losses, scores.row_sims = losses, sims if has_selector else None
    if has_selector:
        scores.agreement = int((sims.argmax(1) == losses.argmin(1)).sum())
        scores.rank_correlation = centred_rank_correlation(sims, losses)
    return scores


def _gather_samples(sims: torch.Tensor, losses: torch.Tensor, row_ids: torch.Tensor, real: torch.Tensor,
                    distributed: bool, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's per-sample [n, K] sims and losses in the validation split's row order, padding rows dropped."""
    stacked = torch.cat([sims, losses, row_ids[:, None], real[:, None].float()], dim=1)
    if distributed:
        parts = [torch.empty_like(stacked) for _ in range(world)]
        dist.all_gather(parts, stacked)
        stacked = torch.cat(parts)
    stacked = stacked.cpu()
    stacked = stacked[stacked[:, -1] > 0]
    stacked = stacked[stacked[:, -2].argsort()]
    k = sims.shape[1]
    return stacked[:, :k], stacked[:, k:2 * k]
