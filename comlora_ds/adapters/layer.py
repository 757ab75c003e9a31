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

import torch
from torch import nn


class ComLoRALinear(nn.Module):
    """``base(x) + scaling * B_k A_k dropout(x)`` for K components stored as ``A [K, r, d_in]``,
    ``B [K, d_out, r]``.

    Modes, set by the model (see ``comlora_ds.model``):
      * ``active_component = None``: batched over all K (input rows are component-major, K * B).
      * ``active_component = k``: only component k, on an ordinary batch (sequential mode, eval).
      * after ``merge(k)``: component k lives in ``base.weight`` and the forward is just ``base(x)``.
    """

    def __init__(self, base: nn.Linear, num_components: int, rank: int, alpha: float,
                 dropout: float = 0.0, use_rslora: bool = False):
        super().__init__()
        if num_components < 1 or rank < 1:
            raise ValueError(f"num_components and rank must be >= 1, got {num_components} and {rank}")
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.num_components, self.rank, self.alpha = num_components, rank, alpha
        self.scaling = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(num_components, rank, self.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(num_components, self.out_features, rank, device=device))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.active_component: int | None = None
        self.merged_component: int | None = None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # Each [r, d_in] slice like nn.Linear(d_in, r).weight (PEFT's init for lora_A); a 3-D tensor
        # would give kaiming the wrong fan-in.
        for k in range(self.num_components):
            nn.init.kaiming_uniform_(self.lora_A[k], a=math.sqrt(5))
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

    def delta_weight(self, k: int) -> torch.Tensor:
        """Component k's weight update ``scaling * B_k A_k`` in fp32, [d_out, d_in]."""
        return self.scaling * (self.lora_B[k].float() @ self.lora_A[k].float())

    @torch.no_grad()
    def merge(self, k: int, safe: bool = True) -> None:
        """Fold component k into the frozen weight (in fp32, then cast back to its dtype)."""
        if self.merged_component is not None:
            raise RuntimeError(f"component {self.merged_component} is already merged; unmerge() first")
        if not 0 <= k < self.num_components:
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
