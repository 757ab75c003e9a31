"""LoRA-Dash (Si et al., ICLR 2025): after t optimizer steps of plain LoRA, learn scales on the singular
directions of W0 that the LoRA update has changed most.

Per adapted layer (each of the K components its own directions and scales):

  * pre-launch, optimizer steps 1..t: plain LoRA, W_k = W0 + s B_k A_k;
  * the switch, right after optimizer step t (once, in fp32, computed once per layer and shared by the K
    components): W0 = U diag(sigma) V^T; for each k the change rate c_i = |u_i^T dW_k v_i| / (sigma_i + eps) with
    dW_k = s B_k A_k; the s_d largest give U_S,k [d_out, s_d] and V_S,k [d_in, s_d], frozen from then on;
  * dash phase: W_k = W0 + s B_k A_k + U_S,k diag(d_k) V_S,k^T with d_k learnable, initialised to 0 (so the
    output is continuous at the switch); A and B keep training. Merge and export include the dash term
    (``DashLinear.factors_of``: a rank-(r + s_d) LoRA pair).

Unlike the official code (a counter of forward calls inside the layer: shifted by gradient accumulation,
evaluation and checkpoint recomputation, lost on resume) the switch is an optimizer-step callback and its state
lives in persistent buffers, so DeepSpeed checkpoints carry it. Every tensor exists from construction on (nothing
is created or replaced after ``deepspeed.initialize``), and the dash term is always computed in factored form
((x V) * d) U^T: zero before the switch, with zero gradient for d, and never a d_out x d_in matrix per forward.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..comlora.layer import ComLoRALinear, LoRAFactors
from ..config import ConfigError
from ._zero import gathered
from .base import AdapterMethod


class DashLinear(ComLoRALinear):
    """ComLoRALinear plus, per component k, ``U_S,k diag(d_k) V_S,k^T`` on s_d frozen singular directions of W0.

    Parameters/buffers (created here, before the engine exists):
      dash_d [K, s_d] trainable, zeros; dash_U [K, d_out, s_d] and dash_V [K, d_in, s_d] persistent buffers,
      zeros until the switch; dash_idx [K, s_d] the chosen singular indices (-1 before); dash_active (bool) and
      dash_step (the optimizer step of the switch, 0 before) as persistent buffers.
    """

    def __init__(self, base: nn.Linear, num_components: int, rank: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False, init: str = "kaiming", num_directions: int = 8):
        super().__init__(base, num_components, rank, alpha, dropout, use_rslora, init)
        if not 1 <= num_directions <= min(self.in_features, self.out_features):
            raise ConfigError(f"lora_dash.num_directions = {num_directions} must be between 1 and min(d_in, d_out) = "
                             f"{min(self.in_features, self.out_features)} for a {self.out_features}x"
                             f"{self.in_features} layer")
        self.num_directions = num_directions
        device, k, s_d = base.weight.device, num_components, num_directions
        self.dash_d = nn.Parameter(torch.zeros(k, s_d, device=device))
        self.register_buffer("dash_U", torch.zeros(k, self.out_features, s_d, device=device))
        self.register_buffer("dash_V", torch.zeros(k, self.in_features, s_d, device=device))
        self.register_buffer("dash_idx", torch.full((k, s_d), -1, dtype=torch.long, device=device))
        self.register_buffer("dash_active", torch.zeros((), dtype=torch.bool, device=device))
        self.register_buffer("dash_step", torch.zeros((), dtype=torch.long, device=device))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, s_d={self.num_directions}"

    def _components(self) -> slice:
        k = self.active_component
        return slice(None) if k is None else slice(k, k + 1)

    def adapter_output(self, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """LoRA output plus ``((x V_k) * d_k) U_k^T`` for the same components (all K, or the active one)."""
        out = super().adapter_output(x, A, B)
        sl = self._components()
        U, V, d = self.dash_U[sl], self.dash_V[sl], self.dash_d[sl]
        h = x.to(V.dtype).reshape(U.shape[0], -1, self.in_features)
        dash = torch.bmm(torch.bmm(h, V) * d.to(V.dtype).unsqueeze(1), U.transpose(1, 2))
        return out + dash.reshape(*x.shape[:-1], self.out_features).to(out.dtype)

    @staticmethod
    def factors_of(tensors: Mapping[str, Tensor], k: int, scaling: float) -> LoRAFactors:
        """Component k as an exact LoRA pair of rank r + s_d: ``B' A' = s B_k A_k + U_k diag(d_k) V_k^T`` with
        ``B' = [s B_k, U_k diag(d_k)]``, ``A' = [A_k; V_k^T]``, scaling 1 (in PEFT: r = lora_alpha = r + s_d,
        use_rslora = False). Before the switch U = V = 0 and the extra block is zero, so every layer of a run has
        the same rank."""
        A, B = tensors["lora_A"][k].float(), tensors["lora_B"][k].float()
        U, V, d = tensors["dash_U"][k].float(), tensors["dash_V"][k].float(), tensors["dash_d"][k].float()
        return LoRAFactors(torch.cat([A, V.T], 0), torch.cat([scaling * B, U * d], 1), 1.0)

    @torch.no_grad()
    def set_directions(self, idx: Tensor, U: Tensor, V: Tensor, step: int) -> None:
        self.dash_idx.copy_(idx)
        self.dash_U.copy_(U)
        self.dash_V.copy_(V)
        self.dash_active.fill_(True)
        self.dash_step.fill_(step)


# ------------------------------------------------------------------------------------------------ the maths
def change_rates(U: Tensor, S: Tensor, Vh: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float,
                 sigma_eps: float = 1e-12) -> Tensor:
    """c[k, i] = |u_i^T dW_k v_i| / (sigma_i + eps) with dW_k = s B_k A_k, without forming dW_k: [K, min(m, n)].
    U [m, q], S [q], Vh [q, n] are the thin SVD of W0; lora_A [K, r, n], lora_B [K, m, r]."""
    ut_b = torch.einsum("mq,kmr->kqr", U, lora_B.to(U.dtype))         # [K, q, r]
    a_v = torch.einsum("krn,qn->kqr", lora_A.to(U.dtype), Vh)          # [K, q, r]
    projected = scaling * (ut_b * a_v).sum(-1)                         # u_i^T dW_k v_i
    return projected.abs() / (S + sigma_eps)


@torch.no_grad()
def select_directions(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float, num_directions: int,
                      sigma_eps: float = 1e-12) -> tuple[Tensor, Tensor, Tensor]:
    """One fp32 SVD of the frozen W0 [m, n], then each component's top-s_d directions by change rate.
    Returns (idx [K, s_d], U_S [K, m, s_d], V_S [K, n, s_d]) in fp32."""
    U, S, Vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)
    idx = change_rates(U, S, Vh, lora_A.detach(), lora_B.detach(), scaling, sigma_eps).topk(num_directions, -1).indices
    return idx, U[:, idx].permute(1, 0, 2), Vh[idx].transpose(1, 2)


def dash_layers(model: nn.Module) -> dict[str, DashLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, DashLinear)}


@torch.no_grad()
def switch_to_dash(model: nn.Module, step: int, sigma_eps: float = 1e-12) -> None:
    """Choose every layer's directions (collective under torch.distributed: all ranks call it at the same step).

    Layer i (sorted by name) is computed on rank i mod world and broadcast, so all ranks hold the same
    directions (an SVD's signs are not guaranteed to agree across ranks). Under ZeRO-3 every rank gathers the
    layer's W0, A and B, in the same order, around the computation."""
    distributed = dist.is_available() and dist.is_initialized()
    world, rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
    for i, (_, layer) in enumerate(sorted(dash_layers(model).items())):
        if bool(layer.dash_active):          # identical on all ranks: never re-select trained directions
            continue
        owner = i % world
        idx, U, V = layer.dash_idx.clone(), layer.dash_U.clone(), layer.dash_V.clone()
        with gathered([layer.base.weight, layer.lora_A, layer.lora_B]):
            if rank == owner:
                idx, U_sel, V_sel = select_directions(layer.base.weight, layer.lora_A, layer.lora_B, layer.scaling,
                                                      layer.num_directions, sigma_eps)
                U.copy_(U_sel)
                V.copy_(V_sel)
        if world > 1:
            for t in (idx, U, V):
                dist.broadcast(t, src=owner)
        layer.set_directions(idx, U, V, step)


# ---------------------------------------------------------------------------------------------- the method
class LoRADashMethod(AdapterMethod):
    """LoRA-Dash per component (K = 1: LoRA-Dash; K > 1: ComLoRA x LoRA-Dash). Works with every ZeRO stage, bf16
    and offload: the switch only reads W0 (gathered under ZeRO-3) and writes buffers."""

    name = "lora_dash"
    layer_type = DashLinear

    @property
    def layer_cls(self):
        return partial(DashLinear, num_directions=self.cfg.lora_dash.num_directions)

    def check_plan(self, total_steps: int) -> None:
        t = self.cfg.lora_dash.t_steps
        if t >= total_steps:
            raise ConfigError(f"lora_dash.t_steps = {t}: the switch would never happen: the run has {total_steps} "
                              f"optimizer steps (train.max_steps = {self.cfg.train.max_steps}, train.num_epochs = "
                              f"{self.cfg.train.num_epochs}); lower lora_dash.t_steps or train longer")

    def on_optimizer_step(self, model: nn.Module, step: int) -> None:
        """Switch right after optimizer step t. ``>= t`` with the per-layer flag also covers a run resumed from a
        checkpoint written before a changed t; the buffers are identical on all ranks, so all ranks agree."""
        if step < self.cfg.lora_dash.t_steps:
            return
        layers = dash_layers(model).values()
        if layers and not all(bool(layer.dash_active) for layer in layers):
            switch_to_dash(model, step, self.cfg.lora_dash.sigma_eps)

