"""Recovered checkpoint tensors -> each component's LoRA factors, layer by layer, for the merge and the PEFT adapter.

The maths is the adapter layer's: :meth:`comlora_ds.comlora.layer.ComLoRALinear.factors_of` of the run's method
(``layer_type`` of ``comlora_ds.methods.method_class(adapter.method)``), so consolidation computes exactly what
training's in-memory merge computes. A method whose component is more than ``scaling * B_k A_k`` (LoRA-Dash) needs
nothing here: its layer class overrides ``factors_of``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from ..comlora.layer import SOUP, LoRAFactors, lora_scaling, soup_factors
from ..config import AdapterConfig
from .errors import ConsolidationError


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
    """The factors of one component (or of the soup, ``k = SOUP``) for every adapted layer, computed on demand
    (one layer at a time)."""

    def __init__(self, tensors: dict[str, torch.Tensor], adapter: AdapterConfig):
        from ..methods import method_class

        try:
            self.layer_type = method_class(adapter.method).layer_type
        except ValueError as err:
            raise ConsolidationError(f"the checkpoint's {err}") from None
        self.layers = layer_tensors(tensors)
        self.method = adapter.method
        self.scaling = lora_scaling(adapter.alpha, adapter.rank, adapter.use_rslora)
        self.num_components = adapter.num_components

    def components(self) -> Iterator[tuple[str, list[LoRAFactors]]]:
        """(module type, the K components' factors) per adapted layer, one layer at a time."""
        for module in self.layers:
            yield module.rsplit(".", 1)[-1], [self.factors(module, k) for k in range(self.num_components)]

    def factors(self, module: str, k: int | str) -> LoRAFactors:
        if k == SOUP:
            return soup_factors([self.factors(module, i) for i in range(self.num_components)])
        if not 0 <= k < self.num_components:
            raise ConsolidationError(f"component {k} does not exist: the checkpoint has K = {self.num_components} "
                                     f"components (0 .. {self.num_components - 1})")
        factors = self.layer_type.factors_of(self.layers[module], k, self.scaling)
        d_out, d_in = factors.B.shape[0], factors.A.shape[1]
        if factors.A.dim() != 2 or factors.B.dim() != 2 or factors.B.shape[1] != factors.rank:
            raise ConsolidationError(f"{self.layer_type.__name__}.factors_of returned A {list(factors.A.shape)} and "
                                     f"B {list(factors.B.shape)}: expected [rank, {d_in}] and [{d_out}, rank]")
        return factors

    def weight_deltas(self, k: int | str) -> dict[str, Callable[[], torch.Tensor]]:
        """Base weight name -> a function computing component k's fp32 delta for it (lazily, to keep one
        delta in memory at a time during the streamed merge)."""
        return {f"{module}.weight": (lambda m=module: self.factors(m, k).delta()) for module in self.layers}
