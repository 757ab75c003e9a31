"""One component of one adapted layer -> LoRA factors ``(A', B', scaling)``: THE extension point of export.

Everything consolidation writes comes from :func:`component_factors`: the PEFT adapter stores ``A'`` and
``B'``, the merged model adds ``LoRAFactors.delta() = scaling * B' @ A'`` (fp32, [d_out, d_in]) to the base
weight. A method whose component is more than ``scaling * B_k A_k`` registers its own rule, keyed by
``adapter.method``, that returns an equivalent (possibly higher-rank) LoRA; nothing else changes. LoRA-Dash,
for instance, adds ``U_S diag(d) V_S^T`` and is exported as a rank-(r + s) LoRA
(``comlora_ds.methods.lora_dash.export_factors``)::

    @register_factors("lora_dash")
    def export_factors(tensors, k, scaling):
        A, B = tensors["lora_A"][k], tensors["lora_B"][k]
        U, V, d = tensors["dash_U"][k], tensors["dash_V"][k], tensors["dash_d"][k]   # [d_out, s], [d_in, s], [s]
        return torch.cat([A, V.T]), torch.cat([scaling * B, U * d], dim=1), 1.0     # (A', B', scaling)

``tensors`` are the recovered tensors of one adapted layer by attribute name (``lora_A`` [K, r, d_in],
``lora_B`` [K, d_out, r], plus the method's own parameters and persistent buffers); floating ones in fp32.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..config import AdapterConfig
from .errors import ConsolidationError


@dataclass
class LoRAFactors:
    A: torch.Tensor          # [rank, d_in] fp32
    B: torch.Tensor          # [d_out, rank] fp32
    scaling: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def delta(self) -> torch.Tensor:
        """``scaling * B @ A`` in fp32, [d_out, d_in]: the same expression as ``ComLoRALinear.delta_weight``."""
        return (self.B.float() @ self.A.float()).mul_(self.scaling)


FactorRule = Callable[[dict[str, torch.Tensor], int, float], "LoRAFactors | tuple[torch.Tensor, torch.Tensor, float]"]
_RULES: dict[str, FactorRule] = {}


def register_factors(*methods: str) -> Callable[[FactorRule], FactorRule]:
    """Decorator: ``rule(tensors, k, scaling) -> LoRAFactors`` (or a tuple ``(A', B', scaling)``) for the given
    ``adapter.method`` names. A method's module registers its rule when it is imported."""
    def wrap(rule: FactorRule) -> FactorRule:
        for name in methods:
            _RULES[name] = rule
        return rule
    return wrap


def unregister_factors(method: str) -> None:
    _RULES.pop(method, None)


@register_factors("lora", "lora_pro")   # LoRA-Pro changes the optimizer, not the weights' form
def lora_factors(tensors: dict[str, torch.Tensor], k: int, scaling: float) -> LoRAFactors:
    return LoRAFactors(tensors["lora_A"][k].float(), tensors["lora_B"][k].float(), scaling)


def adapter_scaling(adapter: AdapterConfig) -> float:
    """alpha / r, or alpha / sqrt(r) with rsLoRA (as ``ComLoRALinear`` and PEFT compute it)."""
    return adapter.alpha / math.sqrt(adapter.rank) if adapter.use_rslora else adapter.alpha / adapter.rank


def component_factors(method: str, tensors: dict[str, torch.Tensor], k: int, scaling: float) -> LoRAFactors:
    if method not in _RULES:
        import comlora_ds.methods  # noqa: F401  (imports every method module, which registers its rule)
    rule = _RULES.get(method)
    if rule is None:
        raise ConsolidationError(f"adapter.method = {method!r} has no export rule; register one with "
                                 f"comlora_ds.export.register_factors (known: {sorted(_RULES)})")
    factors = rule(tensors, k, scaling)
    if isinstance(factors, tuple):
        factors = LoRAFactors(*factors)
    d_out, d_in = factors.B.shape[0], factors.A.shape[1]
    if factors.A.dim() != 2 or factors.B.dim() != 2 or factors.B.shape[1] != factors.rank:
        raise ConsolidationError(f"export rule of {method!r} returned A {list(factors.A.shape)} and B "
                                 f"{list(factors.B.shape)}: expected [rank, {d_in}] and [{d_out}, rank]")
    return factors


def layer_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Recovered tensors grouped by adapted module path (relative to the causal LM):
    ``{'model.layers.0.self_attn.q_proj': {'lora_A': ..., 'lora_B': ...}}``."""
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        if name.startswith("llm."):
            module, _, leaf = name[len("llm."):].rpartition(".")
            layers.setdefault(module, {})[leaf] = tensor
    return {module: t for module, t in layers.items() if "lora_A" in t}


class ComponentExporter:
    """The factors of one component for every adapted layer, computed on demand (one layer at a time)."""

    def __init__(self, tensors: dict[str, torch.Tensor], adapter: AdapterConfig):
        self.layers = layer_tensors(tensors)
        self.method = adapter.method
        self.scaling = adapter_scaling(adapter)
        self.num_components = adapter.num_components

    def factors(self, module: str, k: int) -> LoRAFactors:
        if not 0 <= k < self.num_components:
            raise ConsolidationError(f"component {k} does not exist: the checkpoint has K = {self.num_components} "
                                     f"components (0 .. {self.num_components - 1})")
        return component_factors(self.method, self.layers[module], k, self.scaling)

    def weight_deltas(self, k: int) -> dict[str, Callable[[], torch.Tensor]]:
        """Base weight name -> a function computing component k's fp32 delta for it (lazily, to keep one
        delta in memory at a time during the streamed merge)."""
        return {f"{module}.weight": (lambda m=module: self.factors(m, k).delta()) for module in self.layers}
