"""Gradient norms per group, and clipping each group by its own norm (``train.clip_scope = per_group``).

The groups: each LoRA component k (slice k of every trainable tensor that an adapter layer owns: ``lora_A``,
``lora_B``, LoRA-Dash's ``dash_d``, whatever a method adds, all stacked as [K, ...]) and the rest (the selector).
Membership follows module ownership, not tensor names, so a method's new per-component tensor lands in its
component's group without a change here. DeepSpeed's ``gradient_clipping`` scales every gradient by
one factor from the global norm; with ComLoRA that norm is the selector's (20-40x a component's on
SmolLM2-135M, bench/grad_norms.py), so the factor the components get is set by the selector and jumps by an
order of magnitude between steps, which Adam does not undo. Clipped per group, each component gets what a
plain LoRA run of its rank gets. Reads and writes the full gradients through DeepSpeed's public API, so it
works at every ZeRO stage; the reads are collectives, so every rank calls this at the same point.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from deepspeed.utils import safe_get_full_grad, safe_set_full_grad
from torch import nn

from ..comlora.layer import ComLoRALinear

EPS = 1e-6          # as torch.nn.utils.clip_grad_norm_ and DeepSpeed: factor = max_norm / (norm + 1e-6)


class FullGrad(NamedTuple):
    name: str
    param: nn.Parameter
    grad: torch.Tensor
    per_component: bool     # owned by an adapter layer: component k is slice k of dim 0


def component_tensor_names(model: nn.Module) -> set[str]:
    """Names of the trainable tensors that adapter layers own (each stacks the K components along dim 0)."""
    names = set()
    for module_name, module in model.named_modules():
        if isinstance(module, ComLoRALinear):
            prefix = f"{module_name}." if module_name else ""
            names.update(prefix + name for name, p in module.named_parameters() if p.requires_grad)
    return names


def full_grads(model: nn.Module) -> list[FullGrad]:
    """Every trainable parameter that has a gradient, with its full gradient and group, in a fixed order."""
    components = component_tensor_names(model)
    out = []
    for name, param in model.named_parameters():
        if param.requires_grad:
            grad = safe_get_full_grad(param)
            if grad is not None:
                out.append(FullGrad(name, param, grad, name in components))
    return out


def group_norms(grads: list[FullGrad], num_components: int) -> list[float]:
    """L2 norms [component 0, ..., component K-1, rest]."""
    squares = torch.zeros(num_components + 1, dtype=torch.float64)
    for name, _, grad, per_component in grads:
        g = grad.detach().double()
        if per_component:
            if g.dim() == 0 or g.shape[0] != num_components:
                raise RuntimeError(f"{name} belongs to an adapter layer but its gradient {tuple(g.shape)} does not "
                                   f"stack K = {num_components} components along dim 0")
            squares[:num_components] += g.pow(2).flatten(1).sum(dim=1) if g.dim() > 1 else g.pow(2)
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
    component_factors = torch.tensor(factors[:num_components])
    for _, param, grad, per_component in grads:
        if per_component:
            scaled = grad * component_factors.to(grad.device, grad.dtype).view(-1, *[1] * (grad.dim() - 1))
        else:
            scaled = grad * factors[num_components]
        safe_set_full_grad(param, scaled)
    return norms
