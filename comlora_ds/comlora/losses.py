"""ComLoRA's losses (paper, section 3.4) and the per-sample, per-component LM loss they are built on.

Shapes: ``losses [K, B]`` is L[k, b], the mean response-token NLL of sample b under component k;
``num_tokens [B]`` counts sample b's response tokens, so ``losses * num_tokens`` is the summed NLL of the
paper's eq. 4; ``sims [B, K]`` are the selector's scores. A packed batch (data/packing.py) has the same per-row
L and counts: a supervised position's row is its segment.

Reductions (``comlora.loss_reduction``, ``comlora.lm_reduction``): the pairwise target and its noise see
the *summed* NLL by default, as in eqs. 4 and 6; on a per-token mean the components' gaps (~1e-3) drown in
the alpha = 0.1 noise. L_LM and L_align keep the per-token mean by default, so K = 1 is exactly PEFT/HF
LoRA and a learning rate tuned for LoRA carries over (docs/method.md has the measurement behind that).

Sign decisions (docs/method.md, "Losses"), fixed here, not user knobs:
  * L_align carries a *plus* sign: it reinforces the components the selector prefers. With the minus
    sign of one extraction of eq. 5 the preferred component would be pushed towards gradient ascent.
  * In L_pairwise, D_lm[i, j] = Lt[j] - Lt[i], so a *lower* loss earns a *higher* score, which is what
    the paper's text asks for (its printed eq. 7 has the opposite sign).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..data.tokenize import IGNORE_INDEX

ALIGN_SIGN = 1.0


def annealing_eta(schedule: str, step: int, total_steps: int, rate: float = 5.0) -> float:
    """eta(t) of the alignment loss for the optimizer step being taken, t = 1..T (clamped to [0, T]), so the
    first step already has eta(1) > 0 and the last one the schedule's end value eta(T)."""
    frac = min(max(step / total_steps, 0.0), 1.0) if total_steps > 0 else 1.0
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1.0 - math.cos(math.pi * frac))
    if schedule == "exponential":
        return 1.0 - math.exp(-rate * frac)
    if schedule == "linear":
        return frac
    raise ValueError(f"unknown annealing schedule {schedule!r}")


class ResponsePositions(NamedTuple):
    """Every supervised next-token prediction: sequence ``seq``, position ``col`` (it predicts ``col + 1``), its
    ``target`` and the ``row`` whose loss it belongs to, of ``num_rows``."""
    seq: torch.Tensor
    col: torch.Tensor
    target: torch.Tensor
    row: torch.Tensor
    num_rows: int


def _response_positions(labels: torch.Tensor, segment_ids: torch.Tensor | None = None) -> ResponsePositions:
    """Padded: a row is a sequence of ``labels [R, L]``. Packed (``segment_ids [R, T]``, data/packing.py): sequence
    s holds rows s*B .. s*B + B - 1, one per segment."""
    targets = labels[:, 1:]
    seqs, cols = (targets != IGNORE_INDEX).nonzero(as_tuple=True)
    if segment_ids is None:
        return ResponsePositions(seqs, cols, targets[seqs, cols], seqs, labels.shape[0])
    segments = segment_ids[seqs, cols]
    if not torch.equal(segments, segment_ids[seqs, cols + 1]):
        raise ValueError("a label of the packed batch predicts a row's first token from the row before; a row's "
                         "first label must be -100 (data.packing.PackedCollator)")
    rows_per_sequence = int(segment_ids.max()) + 1
    return ResponsePositions(seqs, cols, targets[seqs, cols], seqs * rows_per_sequence + segments,
                             labels.shape[0] * rows_per_sequence)


def response_token_counts(labels: torch.Tensor, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
    """[B] number of supervised next-token predictions of each row (the tokens L[k, b] is a mean over); packed rows
    (``segment_ids``) counted per segment."""
    if segment_ids is None:
        return (labels[:, 1:] != IGNORE_INDEX).sum(dim=1)
    positions = _response_positions(labels, segment_ids)
    return torch.bincount(positions.row, minlength=positions.num_rows)


def _per_row_mean(token_nll: torch.Tensor, rows: torch.Tensor, num_rows: int) -> torch.Tensor:
    counts = torch.bincount(rows, minlength=num_rows)
    if (counts == 0).any():
        empty = (counts == 0).nonzero().flatten().tolist()
        raise ValueError(f"rows {empty} of the batch have no supervised (response) token; the data "
                         f"pipeline must drop such examples")
    summed = torch.zeros(num_rows, dtype=token_nll.dtype, device=token_nll.device).index_add_(0, rows, token_nll)
    return summed / counts


def _chunk_nll(hidden: torch.Tensor, targets: torch.Tensor, lm_head: nn.Module) -> torch.Tensor:
    return F.cross_entropy(lm_head(hidden).float(), targets, reduction="none")


class _ChunkNllWithGrad(torch.autograd.Function):
    """Token NLLs of one chunk through a frozen lm_head; the gradient w.r.t. the hidden states is computed
    in the forward, while the chunk's logits are alive, and only that [chunk, H] tensor is kept."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, targets: torch.Tensor, lm_head: nn.Module) -> torch.Tensor:
        with torch.enable_grad():
            leaf = hidden.detach().requires_grad_(True)
            nll = _chunk_nll(leaf, targets, lm_head)
            (grad_hidden,) = torch.autograd.grad(nll, leaf, torch.ones_like(nll))
        ctx.save_for_backward(grad_hidden)
        return nll.detach()

    @staticmethod
    def backward(ctx, grad_nll: torch.Tensor):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_nll.unsqueeze(1).to(grad_hidden.dtype), None, None


def response_nll(hidden: torch.Tensor, labels: torch.Tensor, lm_head: nn.Module,
                 chunk_size: int = 1024, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Mean response-token NLL per row, [R], fp32, from final hidden states [R, L, H]; with ``segment_ids``
    ([R, T], packed sequences) per row of each sequence, [R * B] (see ``_response_positions``).

    Logits are computed only at supervised positions, ``chunk_size`` tokens at a time, and freed before
    the next chunk, so the peak is one chunk's fp32 logits instead of the whole replicated batch's
    R x L x V. With the lm_head frozen (always, for the LoRA-type methods) each chunk's gradient w.r.t.
    its hidden states is taken in the forward (``_ChunkNllWithGrad``): two lm_head matmuls per step
    instead of the three of activation checkpointing (forward, recompute, backward); the lm_head is the
    largest matmul of a small-hidden, large-vocabulary model (bench/profile_step.py). A trainable lm_head
    falls back to checkpointing each chunk.
    """
    positions = _response_positions(labels, segment_ids)
    selected, targets = hidden[positions.seq, positions.col], positions.target  # [N, H], [N]
    frozen_head = not any(p.requires_grad for p in lm_head.parameters())
    pieces = []
    for start in range(0, selected.shape[0], chunk_size):
        h, y = selected[start:start + chunk_size], targets[start:start + chunk_size]
        if not (torch.is_grad_enabled() and h.requires_grad):
            pieces.append(_chunk_nll(h, y, lm_head))
        elif frozen_head:
            pieces.append(_ChunkNllWithGrad.apply(h, y, lm_head))
        else:
            pieces.append(checkpoint(_chunk_nll, h, y, lm_head, use_reentrant=False))
    return _per_row_mean(torch.cat(pieces), positions.row, positions.num_rows)


def response_nll_full_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The naive reference: fp32 logits for every position [R, L, V]. Kept for tests and benchmarks."""
    p = _response_positions(labels)
    token_nll = F.cross_entropy(logits[:, :-1].float()[p.seq, p.col], p.target, reduction="none")
    return _per_row_mean(token_nll, p.row, p.num_rows)


REDUCTIONS = ("sum", "mean")


def reduce_losses(losses: torch.Tensor, num_tokens: torch.Tensor | None, reduction: str) -> torch.Tensor:
    """Per-token mean losses [K, B] as the reduction asks: unchanged for ``mean``, times each sample's response
    token count for ``sum`` (the summed NLL, exact up to one rounding)."""
    if reduction == "mean":
        return losses
    if reduction != "sum":
        raise ValueError(f"unknown loss reduction {reduction!r}")
    if num_tokens is None:
        raise ValueError("the summed loss needs the response token counts (num_tokens)")
    return losses * num_tokens.to(losses.dtype)[None, :]


class ObjectiveTerms(NamedTuple):
    total: torch.Tensor
    lm: torch.Tensor
    align: torch.Tensor
    pairwise: torch.Tensor


class PairTarget(NamedTuple):
    """What the pairwise loss compares the selector's scores with, [B, K], detached: the per-sample losses in
    ``loss_reduction`` (``clean``) and the same plus ``noise * eps`` (``noisy``, what the loss sees)."""
    clean: torch.Tensor
    noisy: torch.Tensor


class ComLoRAObjective:
    """L_total = L_LM + L_align + L_pairwise with the paper's ablation switches.

    Without a selector (K = 1, or the no_selector ablation) only L_LM is defined. ``loss_reduction`` is what
    the pairwise target sees, ``lm_reduction`` what L_LM and L_align average (module doc).
    """

    def __init__(self, num_components: int, top_n: int | None = None, noise: float = 0.1,
                 use_lm: bool = True, use_align: bool = True, use_pairwise: bool = True,
                 loss_reduction: str = "sum", lm_reduction: str = "mean"):
        for name, value in (("loss_reduction", loss_reduction), ("lm_reduction", lm_reduction)):
            if value not in REDUCTIONS:
                raise ValueError(f"{name} = {value!r}: must be one of {', '.join(REDUCTIONS)}")
        self.num_components = num_components
        self.top_n = top_n or num_components
        self.noise = noise
        self.use_lm, self.use_align, self.use_pairwise = use_lm, use_align, use_pairwise
        self.loss_reduction, self.lm_reduction = loss_reduction, lm_reduction

    def lm_loss(self, losses: torch.Tensor, num_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """L_LM = mean over k and b of L[k, b] (in ``lm_reduction``)."""
        return reduce_losses(losses, num_tokens, self.lm_reduction).mean()

    def top_n_weights(self, sims: torch.Tensor) -> torch.Tensor:
        """p [K, B]: softmax over each sample's top-N sims (detached), 0 outside the top N."""
        sims = sims.detach()
        top = sims.topk(self.top_n, dim=1)
        p = torch.zeros_like(sims).scatter_(1, top.indices, top.values.softmax(dim=1))
        return p.t()

    def align_loss(self, losses: torch.Tensor, sims: torch.Tensor, eta: float,
                   num_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """L_align = +eta * mean_b sum_{k in topN(b)} p[k, b] L[k, b]   (plus sign: see module doc)."""
        losses = reduce_losses(losses, num_tokens, self.lm_reduction)
        return ALIGN_SIGN * eta * (self.top_n_weights(sims) * losses).sum(0).mean()

    def pair_target(self, losses: torch.Tensor, num_tokens: torch.Tensor | None = None) -> PairTarget:
        """Draws the noise of eq. 6 on the (detached) per-sample losses in ``loss_reduction``."""
        clean = reduce_losses(losses.detach().float(), num_tokens, self.loss_reduction).t()   # [B, K]
        noisy = clean + self.noise * torch.randn(clean.shape, device=clean.device) if self.noise > 0 else clean
        return PairTarget(clean, noisy)

    def pairwise_loss(self, target: PairTarget, sims: torch.Tensor) -> torch.Tensor:
        """mean_b || log_softmax(D_sim) - log_softmax(D_lm) ||_1 over all K*K pairs; trains the selector."""
        noisy = target.noisy
        d_sim = sims[:, :, None] - sims[:, None, :]                             # sim_i - sim_j
        d_lm = noisy[:, None, :] - noisy[:, :, None]                            # Lt_j - Lt_i
        log_p_sim = d_sim.flatten(1).log_softmax(dim=1)
        log_p_lm = d_lm.flatten(1).log_softmax(dim=1)
        return (log_p_sim - log_p_lm).abs().sum(dim=1).mean()

    def component_weights(self, sims: torch.Tensor | None, eta: float, batch_size: int,
                          num_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """w [K, B] with d(L_LM + L_align)/dL[k, b] = w[k, b] (L the per-token means): the backward weight of
        each component's per-sample loss, used by the component-sequential execution mode."""
        k = self.num_components
        device = sims.device if sims is not None else None
        use_lm = self.use_lm or sims is None
        w = torch.full((k, batch_size), float(use_lm) / (k * batch_size), device=device)
        if sims is not None and self.use_align:
            w = w + ALIGN_SIGN * eta * self.top_n_weights(sims) / batch_size
        return reduce_losses(w, num_tokens, self.lm_reduction)

    def __call__(self, losses: torch.Tensor, sims: torch.Tensor | None, eta: float,
                 num_tokens: torch.Tensor | None = None, target: PairTarget | None = None,
                 with_pairwise: bool = True) -> ObjectiveTerms:
        """``target``: the pairwise target already drawn (``pair_target``); drawn here when None."""
        zero = losses.new_zeros(())
        lm = self.lm_loss(losses, num_tokens) if self.use_lm or sims is None else zero
        align = self.align_loss(losses, sims, eta, num_tokens) if sims is not None and self.use_align else zero
        with_pairwise = with_pairwise and sims is not None and self.use_pairwise
        if with_pairwise and target is None:
            target = self.pair_target(losses, num_tokens)
        pair = self.pairwise_loss(target, sims) if with_pairwise else zero
        return ObjectiveTerms(lm + align + pair, lm, align, pair)
