"""Gradient norms per group, and clipping each group by its own norm (``train.clip_scope = per_group``).

The groups: each LoRA component k (its slices ``lora_A[k]``, ``lora_B[k]`` of every adapted layer) and the
rest (the selector and any other trainable tensor). DeepSpeed's ``gradient_clipping`` scales every gradient by
one factor from the global norm; with ComLoRA that norm is the selector's (20-40x a component's on
SmolLM2-135M, bench/grad_norms.py), so the factor the components get is set by the selector and jumps by an
order of magnitude between steps, which Adam does not undo. Clipped per group, each component gets what a
plain LoRA run of its rank gets. Reads and writes the full gradients through DeepSpeed's public API, so it
works at every ZeRO stage; the reads are collectives, so every rank calls this at the same point.
"""

from __future__ import annotations

import torch
from deepspeed.utils import safe_get_full_grad, safe_set_full_grad
from torch import nn

ADAPTER_TENSORS = ("lora_A", "lora_B")
EPS = 1e-6          # as torch.nn.utils.clip_grad_norm_ and DeepSpeed: factor = max_norm / (norm + 1e-6)


def full_grads(model: nn.Module) -> list[tuple[str, nn.Parameter, torch.Tensor]]:
    """(name, parameter, full gradient) of every trainable parameter that has one, in a fixed order."""
    out = []
    for name, param in model.named_parameters():
        if param.requires_grad:
            grad = safe_get_full_grad(param)
            if grad is not None:
                out.append((name, param, grad))
    return out


def group_norms(grads: list[tuple[str, nn.Parameter, torch.Tensor]], num_components: int) -> list[float]:
    """L2 norms [component 0, ..., component K-1, rest]."""
    squares = torch.zeros(num_components + 1, dtype=torch.float64)
    for name, _, grad in grads:
        g = grad.detach().double()
        if name.endswith(ADAPTER_TENSORS):
            squares[:num_components] += g.pow(2).flatten(1).sum(dim=1)
        else:
            squares[num_components] += g.pow(2).sum()
    return squares.sqrt().tolist()


def clip_factor(norm: float, max_norm: float) -> float:
    """What clipping at ``max_norm`` multiplies a gradient of this norm by (1 when clipping is off)."""
    return min(1.0, max_norm / (norm + EPS)) if max_norm else 1.0


@torch.no_grad()
def clip_per_group(model: nn.Module, num_components: int, max_norm: float) -> list[float]:
    """Scale each group's gradient by its ``clip_factor``; return the norms before clipping."""
    grads = full_grads(model)
    norms = group_norms(grads, num_components)
    factors = [clip_factor(n, max_norm) for n in norms]
    if all(f == 1.0 for f in factors):
        return norms
    per_component = torch.tensor(factors[:num_components])
    for name, param, grad in grads:
        if name.endswith(ADAPTER_TENSORS):
            scaled = grad * per_component.to(grad.device, grad.dtype).view(-1, *[1] * (grad.dim() - 1))
        else:
            scaled = grad * factors[num_components]
        safe_set_full_grad(param, scaled)
    return norms
