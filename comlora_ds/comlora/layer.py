"""The K-stacked adapter layer: a frozen ``nn.Linear`` plus K LoRA components.

Component k adds ``scaling * B[k] @ A[k] @ dropout(x)`` to the frozen projection. All K components
run in one batched matmul over a *component-major replicated batch*: the leading batch dimension of
the input is ``K * B`` and rows ``k*B .. (k+1)*B - 1`` belong to component k. With K = 1 this is
exactly PEFT's LoRA (same init, same dropout placement, same scaling).

The wrapped layer is kept untouched as ``self.base`` and always called as ``self.base(x)``, so ZeRO-3
gathers the frozen weight once per forward for all K components.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn


def lora_scaling(alpha: float, rank: int, use_rslora: bool = False) -> float:
    """alpha / r, or alpha / sqrt(r) with rsLoRA (PEFT's two rules)."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


@dataclass
class LoRAFactors:
    """One component of one layer as a LoRA pair: ``delta = scaling * B @ A`` (what merge adds to W0, what the PEFT
    adapter stores)."""

    A: torch.Tensor          # [rank, d_in] fp32
    B: torch.Tensor          # [d_out, rank] fp32
    scaling: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def delta(self) -> torch.Tensor:
        """``scaling * B @ A`` in fp32, [d_out, d_in]."""
        return (self.B.float() @ self.A.float()).mul_(self.scaling)


SOUP = "soup"
"""The selection that stands for the uniform average of the K components' updates (``--winner-rule soup``), accepted
wherever a component index is (:meth:`ComLoRALinear.delta_weight`, ``merge``, the exporter's ``factors``)."""


def soup_factors(components: list[LoRAFactors]) -> LoRAFactors:
    """The uniform average ``(1/K) sum_k s_k B_k A_k`` as one LoRA pair of rank sum_k r_k, exactly:
    ``A = cat_k A_k`` (rows), ``B = cat_k s_k B_k / K`` (columns), scaling 1 (the PEFT writer folds its own
    scaling's ratio into B)."""
    k = len(components)
    A = torch.cat([f.A.float() for f in components], dim=0)
    B = torch.cat([f.B.float() * (f.scaling / k) for f in components], dim=1)
    return LoRAFactors(A, B, 1.0)


class ComLoRALinear(nn.Module):
    """``base(x) + scaling * B_k A_k dropout(x)`` for K components stored as ``A [K, r, d_in]``,
    ``B [K, d_out, r]``.

    Modes, set by the model (see ``comlora_ds.comlora.model``):
      * ``active_component = None``: batched over all K (input rows are component-major, K * B).
      * ``active_component = k``: only component k, on an ordinary batch (sequential mode, eval).
      * after ``merge(k)``: component k lives in ``base.weight`` and the forward is just ``base(x)``.
    """

    def __init__(self, base: nn.Linear, num_components: int, rank: int, alpha: float,
                 dropout: float = 0.0, use_rslora: bool = False, init: str = "kaiming"):
        super().__init__()
        if num_components < 1 or rank < 1:
            raise ValueError(f"num_components and rank must be >= 1, got {num_components} and {rank}")
        if init == "orthogonal" and num_components * rank > base.in_features:
            raise ValueError(f"adapter.init = orthogonal needs K * r = {num_components * rank} <= d_in = "
                             f"{base.in_features} (orthogonal rows of all components' A)")
        self.init = init
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.num_components, self.rank, self.alpha = num_components, rank, alpha
        self.scaling = lora_scaling(alpha, rank, use_rslora)
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(num_components, rank, self.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(num_components, self.out_features, rank, device=device))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.active_component: int | None = None
        self.merged_component: int | None = None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """B = 0 (the layer starts as its base); A by ``self.init`` (``adapter.init``)."""
        A, K = self.lora_A, self.num_components
        if self.init == "kaiming":
            # Each [r, d_in] slice like nn.Linear(d_in, r).weight (PEFT's init for lora_A); a 3-D tensor
            # would give kaiming the wrong fan-in.
            for k in range(K):
                nn.init.kaiming_uniform_(A[k], a=math.sqrt(5))
        elif self.init == "shared":
            nn.init.kaiming_uniform_(A[0], a=math.sqrt(5))
            A[1:] = A[0]
        elif self.init == "gaussian":                       # PEFT: nn.init.normal_(lora_A, std=1 / r)
            nn.init.normal_(A, std=1 / self.rank)
        elif self.init == "orthogonal":
            # kaiming_uniform(a=sqrt 5) draws U(-1/sqrt(d_in), 1/sqrt(d_in)): rows of squared norm 1/3 on average
            rows = torch.empty(K * self.rank, self.in_features, device=A.device)
            nn.init.orthogonal_(rows, gain=1 / math.sqrt(3))
            A.copy_(rows.view_as(A))
        else:
            raise ValueError(f"adapter.init = {self.init!r}: unknown (kaiming, gaussian, orthogonal, shared)")
        nn.init.zeros_(self.lora_B)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, K={self.num_components}, r={self.rank}, "
                f"scaling={self.scaling:g}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.merged_component is not None:
            return out
        k = self.active_component
        A, B = (self.lora_A, self.lora_B) if k is None else (self.lora_A[k:k + 1], self.lora_B[k:k + 1])
        return out + self.adapter_output(self.dropout(x), A, B).to(out.dtype)

    def adapter_output(self, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """``scaling * x_k A_k^T B_k^T`` for the n = A.shape[0] components, one bmm pair."""
        n = A.shape[0]
        if x.shape[0] % n:
            raise ValueError(f"batch of {x.shape[0]} rows is not a multiple of the {n} components it runs")
        h = x.to(A.dtype).reshape(n, -1, self.in_features)          # [n, rows, d_in], component-major
        delta = torch.bmm(torch.bmm(h, A.transpose(1, 2)), B.transpose(1, 2))
        return (self.scaling * delta).reshape(*x.shape[:-1], self.out_features)

    @staticmethod
    def factors_of(tensors: Mapping[str, torch.Tensor], k: int, scaling: float) -> LoRAFactors:
        """Component k as LoRA factors, from one layer's tensors by attribute name (``lora_A`` [K, r, d_in],
        ``lora_B`` [K, d_out, r], and a subclass's own parameters and persistent buffers): the live layer's
        (:meth:`component_factors`) or those recovered from a checkpoint (consolidation). THE definition of a
        component's weight update: training's merge, the streamed merge and the PEFT adapter all use it. A method
        whose component is more than ``B_k A_k`` overrides it with an equivalent (possibly higher-rank) pair."""
        return LoRAFactors(tensors["lora_A"][k].float(), tensors["lora_B"][k].float(), scaling)

    def component_factors(self, k: int | str) -> LoRAFactors:
        """Component k's factors; ``k = SOUP``: the soup's (:func:`soup_factors` of the K components)."""
        if k == SOUP:
            return soup_factors([self.component_factors(i) for i in range(self.num_components)])
        tensors = {**dict(self.named_parameters(recurse=False)), **dict(self.named_buffers(recurse=False))}
        return self.factors_of({name: t.detach() for name, t in tensors.items()}, k, self.scaling)

    def delta_weight(self, k: int | str) -> torch.Tensor:
        """Component k's (or the soup's) weight update in fp32, [d_out, d_in] (``scaling * B_k A_k`` for LoRA)."""
        return self.component_factors(k).delta()

    @torch.no_grad()
    def merge(self, k: int | str, safe: bool = True) -> None:
        """Fold component k (or the soup) into the frozen weight (in fp32, then cast back to its dtype)."""
        if self.merged_component is not None:
            raise RuntimeError(f"component {self.merged_component} is already merged; unmerge() first")
        if k != SOUP and not 0 <= k < self.num_components:
            raise IndexError(f"component {k} out of range for K = {self.num_components}")
        weight = self.base.weight
        merged = weight.float() + self.delta_weight(k)
        if safe and not torch.isfinite(merged).all():
            raise ValueError(f"merging component {k} gives non-finite weights; the adapter is broken")
        weight.copy_(merged.to(weight.dtype))
        self.merged_component = k

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged_component is None:
            return
        weight = self.base.weight
        weight.copy_((weight.float() - self.delta_weight(self.merged_component)).to(weight.dtype))
        self.merged_component = None
