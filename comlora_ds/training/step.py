"""One micro-batch of ComLoRA training: forward, objective, backward, in either execution mode.

``model`` is a ``ComLoRAModel`` or the DeepSpeed engine wrapping one (both are called the same way);
``backward`` is ``loss.backward`` or ``engine.backward``.

Batched mode replicates the micro-batch K times and backpropagates L_total once. Sequential mode
runs K passes of one component each and backpropagates ``sum_b w[k, b] L[k, b]`` after each, with
``w = dL_total/dL`` (the selector's outputs are constants for the adapters): the same gradients with
1/K of the activation memory. The selector runs in the first pass (for w) and again in the last (for
the pairwise loss, once every L[k] is known), so that no graph spans two backward calls. With
selector dropout > 0 the two runs draw different masks; the default dropout is 0.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from ..comlora.losses import ComLoRAObjective, ObjectiveTerms, PairTarget


class StepOutput(NamedTuple):
    terms: ObjectiveTerms          # detached
    losses: torch.Tensor           # [K, B] detached
    sims: torch.Tensor | None      # [B, K] detached
    target: PairTarget | None      # the pairwise target this step drew (None without the pairwise loss)


def forward_backward(model: Callable, batch: dict[str, torch.Tensor], objective: ComLoRAObjective,
                     eta: float, backward: Callable[[torch.Tensor], None], execution: str = "batched",
                     between_passes: Callable[[], None] | None = None) -> StepOutput:
    """``between_passes`` runs after each sequential pass but the last (DeepSpeed: ``engine.step``,
    each pass being one of its gradient-accumulation micro-steps)."""
    if execution == "batched":
        out = model(**batch)
        target = objective.pair_target(out.losses, out.num_tokens) if _pairwise(objective, out.sims) else None
        terms = objective(out.losses, out.sims, eta, out.num_tokens, target)
        backward(terms.total)
        return StepOutput(_detach(terms), out.losses.detach(), _maybe_detach(out.sims), target)
    if execution != "sequential":
        raise ValueError(f"unknown execution mode {execution!r}")

    k_total = objective.num_components
    per_component, sims, weights, pairwise, target = [], None, None, None, None
    for k in range(k_total):
        last = k == k_total - 1
        out = model(**batch, component=k, use_selector=(k == 0 or last))
        loss_k = out.losses[0]
        per_component.append(loss_k.detach())
        if k == 0:
            sims = _maybe_detach(out.sims)
            num_tokens = out.num_tokens
            weights = objective.component_weights(sims, eta, num_tokens.shape[0], num_tokens)
        loss = (weights[k] * loss_k).sum()
        if _pairwise(objective, out.sims):
            if last:
                target = objective.pair_target(torch.stack(per_component), num_tokens)
                pairwise = objective.pairwise_loss(target, out.sims)
                loss = loss + pairwise
            else:
                # An exactly-zero selector gradient in the first pass: DeepSpeed ZeRO-3 (0.19.8,
                # stage3.partition_grads) adds a parameter's first gradient of a step onto a stale
                # buffer when it arrives after the first micro-step.
                loss = loss + 0.0 * out.sims.sum()
        backward(loss)
        if not last and between_passes is not None:
            between_passes()
    losses = torch.stack(per_component)
    terms = objective(losses, sims, eta, num_tokens, with_pairwise=False)
    if pairwise is not None:
        terms = terms._replace(total=terms.total + pairwise.detach(), pairwise=pairwise.detach())
    return StepOutput(_detach(terms), losses, sims, target)


def backward_passes(num_components: int, execution: str) -> int:
    """Backward calls per micro-batch: K in component-sequential mode (each pass is one DeepSpeed
    gradient-accumulation micro-step, so the DeepSpeed config accumulates K times as many), else 1."""
    return num_components if execution == "sequential" else 1


class DeepSpeedStepper:
    """One micro-batch under a DeepSpeed engine, in either execution mode: the one place that knows how the K
    sequential passes map onto DeepSpeed's micro-steps. DeepSpeed divides every backward by its accumulation
    steps, which count the K passes, so each pass's loss is scaled back by K; every pass but the last is followed
    by ``engine.step()`` (a micro-step that applies nothing); the last pass's ``engine.step()`` is the trainer's,
    after the gradient transforms at an accumulation boundary."""

    def __init__(self, engine, objective: ComLoRAObjective, execution: str):
        self.engine, self.objective, self.execution = engine, objective, execution
        self.passes = backward_passes(objective.num_components, execution)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss * self.passes if self.passes > 1 else loss)

    def forward_backward(self, batch: dict[str, torch.Tensor], eta: float) -> StepOutput:
        return forward_backward(self.engine, batch, self.objective, eta, self.backward, self.execution,
                                between_passes=self.engine.step)


def _pairwise(objective: ComLoRAObjective, sims: torch.Tensor | None) -> bool:
    return sims is not None and objective.use_pairwise


def _maybe_detach(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach()


def _detach(terms: ObjectiveTerms) -> ObjectiveTerms:
    return ObjectiveTerms(*(t.detach() for t in terms))
