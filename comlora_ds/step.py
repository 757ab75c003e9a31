"""One micro-batch of ComLoRA training: forward, objective, backward, in either execution mode.

``model`` is a ``ComLoRAModel`` or the DeepSpeed engine wrapping one (both are called the same way);
``backward`` is ``loss.backward`` or ``engine.backward``.

Batched mode replicates the micro-batch K times and backpropagates L_total once. Sequential mode
runs K passes of one component each and backpropagates ``sum_b w[k, b] L[k, b]`` after each, with
``w = dL_total/dL`` (the selector's outputs are constants for the adapters), then the pairwise loss
through the selector: the same gradients with 1/K of the activation memory.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from .losses import ComLoRAObjective, ObjectiveTerms


class StepOutput(NamedTuple):
    terms: ObjectiveTerms          # detached
    losses: torch.Tensor           # [K, B] detached
    sims: torch.Tensor | None      # [B, K] detached


def forward_backward(model: Callable, batch: dict[str, torch.Tensor], objective: ComLoRAObjective,
                     eta: float, backward: Callable[[torch.Tensor], None],
                     execution: str = "batched") -> StepOutput:
    if execution == "batched":
        out = model(**batch)
        terms = objective(out.losses, out.sims, eta)
        backward(terms.total)
        return StepOutput(_detach(terms), out.losses.detach(), _maybe_detach(out.sims))
    if execution != "sequential":
        raise ValueError(f"unknown execution mode {execution!r}")

    batch_size = batch["input_ids"].shape[0]
    per_component, sims, weights = [], None, None
    for k in range(objective.num_components):
        out = model(**batch, component=k, use_selector=(k == 0))
        if k == 0:
            sims = out.sims
            weights = objective.component_weights(_maybe_detach(sims), eta, batch_size)
        backward((weights[k] * out.losses[0]).sum())
        per_component.append(out.losses[0].detach())
    losses = torch.stack(per_component)
    terms = objective(losses, _maybe_detach(sims), eta, with_pairwise=False)
    if sims is not None and objective.use_pairwise:
        pairwise = objective.pairwise_loss(losses, sims)
        backward(pairwise)
        terms = terms._replace(total=terms.total + pairwise.detach(), pairwise=pairwise.detach())
    return StepOutput(_detach(terms), losses, _maybe_detach(sims))


def _maybe_detach(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach()


def _detach(terms: ObjectiveTerms) -> ObjectiveTerms:
    return ObjectiveTerms(*(t.detach() for t in terms))
