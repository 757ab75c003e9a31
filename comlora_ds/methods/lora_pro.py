"""LoRA-Pro (Wang et al., ICLR 2025): LoRA updates whose first-order effect on W best matches full fine-tuning.

For one pair W = W0 + s B A (A [r, n], B [m, r]) autograd gives gA = s B^T G and gB = s G A^T, G = dL/dW.
LoRA-Pro replaces them by the pair whose equivalent gradient s (B gA' + gB' A) is the Frobenius-closest to G:

    gA' = (1/s^2) (B^T B)^-1 gA + X A
    gB' = (1/s^2) (I - P_B) gB (A A^T)^-1 - B X             P_B = B (B^T B)^-1 B^T

for any r x r X; the equivalent gradient is then P_B G + (I - P_B) G P_A whatever X is. X = "sylvester" solves
B^T B X + X A A^T = -(1/s^2) (B^T B)^-1 gA A^T (the X closest to the raw gradients), in the batched, real form
through the eigendecompositions of the two SPD r x r matrices. Everything is batched over the K components of a
ComLoRA layer (each component its own pair, against its own G_k) and runs in fp32 (fp64 inputs stay fp64).

``LoRAProAdamW`` is the AdamW variant, applied once per optimizer step to the accumulated, all-reduced gradients:
  * mode "full" (the official one): Adam moments of the d_out x d_in equivalent gradient, preconditioned, mapped
    back to (A, B) with the same projection; K x d_out x d_in x 2 fp32 of state per layer;
  * mode "efficient": adjusted factor gradients, then ordinary AdamW on A and B (LoRA-sized state).
Pairs are registered by the adapter layers (module name, A, B, the layer's real scaling), never found by position.
Deviations from the official code (all deliberate; docs/methods.md lists them): the layer's true scaling instead of a
hard-coded 2, the standard Adam step count t = 1, 2, ..., fp32 moments, no m x m identity, explicit clipping.

The optimizer needs the real parameter tensors with full gradients: DeepSpeed gives it those with ZeRO stage 0 and
bf16 off (methods.md section 3.1). Under ZeRO stage 1-3 or bf16 the efficient mode runs instead as a gradient
transform between the last backward and the DeepSpeed step (``LoRAProMethod.before_optimizer_step``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..comlora.inject import adapter_layers
from ..config import ConfigError
from ._zero import gathered
from .base import AdapterMethod

X_MODES = ("sylvester", "zero", "symmetry")
MODES = ("full", "efficient")
CLIP_MODES = ("pre_adam", "official")


class LoRAPair(NamedTuple):
    name: str                  # module path of the adapter layer
    A: nn.Parameter            # [K, r, d_in]
    B: nn.Parameter            # [K, d_out, r]
    scaling: float             # the layer's alpha / r (or alpha / sqrt(r) with rsLoRA)


def lora_pairs(model: nn.Module) -> list[LoRAPair]:
    """Every adapter layer's (A, B, scaling), sorted by module name (the same order on every rank)."""
    return [LoRAPair(name, layer.lora_A, layer.lora_B, layer.scaling)
            for name, layer in sorted(adapter_layers(model).items())]


# ------------------------------------------------------------------------------------------- the math
def _t(x: Tensor) -> Tensor:
    return x.transpose(-1, -2)


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


class PairFactors(NamedTuple):
    """The r x r algebra of one (batched) pair, computed once per optimizer step and reused."""
    A: Tensor                  # [..., r, n] compute dtype
    B: Tensor                  # [..., m, r]
    evals_b: Tensor            # eigh of B^T B (eigenvalues clamped at 0)
    evecs_b: Tensor
    evals_a: Tensor            # eigh of A A^T
    evecs_a: Tensor
    btb_inv: Tensor            # (B^T B + delta I)^-1
    aat_inv: Tensor            # (A A^T + delta I)^-1
    scaling: float


def factorize(A: Tensor, B: Tensor, scaling: float, delta: float = 1e-8) -> PairFactors:
    dtype = _compute_dtype(A, B)
    A, B = A.detach().to(dtype), B.detach().to(dtype)
    evals_b, evecs_b = torch.linalg.eigh(_t(B) @ B)
    evals_a, evecs_a = torch.linalg.eigh(A @ _t(A))
    evals_b, evals_a = evals_b.clamp_min(0), evals_a.clamp_min(0)

    def inverse(evals: Tensor, evecs: Tensor) -> Tensor:
        return (evecs / (evals + delta).unsqueeze(-2)) @ _t(evecs)

    return PairFactors(A, B, evals_b, evecs_b, evals_a, evecs_a, inverse(evals_b, evecs_b),
                       inverse(evals_a, evecs_a), scaling)


def solve_sylvester_spd(evals_p: Tensor, evecs_p: Tensor, evals_q: Tensor, evecs_q: Tensor, C: Tensor) -> Tensor:
    """X with P X + X Q = C for symmetric PSD P = U_p diag(l) U_p^T, Q = U_q diag(m) U_q^T (batched, real):
    X = U_p [(U_p^T C U_q) / (l_i + m_j)] U_q^T. Unique when l_i + m_j > 0 for all i, j."""
    denom = (evals_p.unsqueeze(-1) + evals_q.unsqueeze(-2)).clamp_min(torch.finfo(C.dtype).tiny)
    return evecs_p @ ((_t(evecs_p) @ C @ evecs_q) / denom) @ _t(evecs_q)


def _x_zero_parts(f: PairFactors, gA: Tensor, gB: Tensor) -> tuple[Tensor, Tensor]:
    """The X = 0 minimisers: (1/s^2) (B^T B)^-1 gA and (1/s^2) (I - P_B) gB (A A^T)^-1, without an m x m matrix."""
    inv_s2 = 1.0 / f.scaling ** 2
    ga0 = inv_s2 * (f.btb_inv @ gA)
    gb_perp = gB - f.B @ (f.btb_inv @ (_t(f.B) @ gB))
    return ga0, inv_s2 * (gb_perp @ f.aat_inv)


def solve_x(f: PairFactors, gA: Tensor, gB: Tensor, x_mode: str = "sylvester") -> Tensor | None:
    """The r x r X of the chosen mode (None for "zero")."""
    if x_mode == "zero":
        return None
    inv_s2 = 1.0 / f.scaling ** 2
    if x_mode == "sylvester":
        rhs = -inv_s2 * (f.btb_inv @ gA @ _t(f.A))
        return solve_sylvester_spd(f.evals_b, f.evecs_b, f.evals_a, f.evecs_a, rhs)
    if x_mode == "symmetry":                                     # old peta/optim.py's closed-form alternative
        return -0.5 * inv_s2 * (f.btb_inv @ _t(f.B) @ gB @ (f.A @ _t(f.A)))
    raise ValueError(f"unknown x_mode {x_mode!r}; choose from {', '.join(X_MODES)}")


def adjust_with(f: PairFactors, gA: Tensor, gB: Tensor, x_mode: str = "sylvester") -> tuple[Tensor, Tensor]:
    gA, gB = gA.to(f.A.dtype), gB.to(f.A.dtype)
    ga, gb = _x_zero_parts(f, gA, gB)
    X = solve_x(f, gA, gB, x_mode)
    if X is not None:
        ga = ga + X @ f.A
        gb = gb - f.B @ X
    return ga, gb


def lorapro_adjust(A: Tensor, B: Tensor, gA: Tensor, gB: Tensor, scaling: float, x_mode: str = "sylvester",
                   delta: float = 1e-8) -> tuple[Tensor, Tensor]:
    """The LoRA-Pro gradients (gA', gB') from the LoRA gradients (gA, gB); shapes [.., r, n] / [.., m, r]
    (a leading K batches the components). Returned in fp32 (fp64 for fp64 inputs)."""
    return adjust_with(factorize(A, B, scaling, delta), gA, gB, x_mode)


def equivalent_parts(f: PairFactors, gA: Tensor, gB: Tensor) -> tuple[Tensor, Tensor]:
    """(Y, Z) with equivalent gradient s (B Y + Z A): the LoRA-sized factors of g~."""
    return _x_zero_parts(f, gA.to(f.A.dtype), gB.to(f.A.dtype))


def equivalent_gradient(A: Tensor, B: Tensor, gA: Tensor, gB: Tensor, scaling: float,
                        delta: float = 1e-8) -> Tensor:
    """g~ = P_B G + (I - P_B) G P_A, computed from the LoRA gradients only; [.., m, n]."""
    f = factorize(A, B, scaling, delta)
    Y, Z = equivalent_parts(f, gA, gB)
    return scaling * (f.B @ Y + Z @ f.A)


def equivalent_sqnorm(f: PairFactors, Y: Tensor, Z: Tensor) -> Tensor:
    """||s (B Y + Z A)||_F^2 summed over the batch, with r x r products only (no m x n matrix)."""
    btb, aat = _t(f.B) @ f.B, f.A @ _t(f.A)
    sq = (Y * (btb @ Y)).sum() + (Z * (Z @ aat)).sum() + 2 * ((_t(f.B) @ Z) * (Y @ _t(f.A))).sum()
    return f.scaling ** 2 * sq.clamp_min(0)


# ------------------------------------------------------------------------------------------ the optimizer
class LoRAProAdamW(torch.optim.Optimizer):
    """AdamW with LoRA-Pro on registered (A, B) pairs and plain AdamW on every other parameter.

    ``pairs``: from :func:`lora_pairs`; each becomes its own parameter group ``{"params": [A, B], "pair": name,
    "scaling": s}``, so its optimizer state is keyed by the parameters themselves and survives checkpoints.
    ``other_groups``: ordinary parameter groups (the ComLoRA selector, LoRA-Dash scales, ...).

    Clipping with ``max_grad_norm`` > 0 (the DeepSpeed config's gradient clipping must then be off):
      * "pre_adam": the gradients entering the Adam moments (full: the equivalent gradients; efficient: the
        adjusted factor gradients; others: their gradients) are scaled by min(1, max_norm / global norm of them
        all), as full fine-tuning AdamW with clipping would do;
      * "official": the norm of the raw gradients scales the final update of the pairs (the patched DeepSpeed's
        behaviour) and the others' gradients.
    Weight decay (default 0, as in the paper) is decoupled: mode "full" multiplies A_k and B_k by sqrt(1 - lr wd)
    so that dW_k decays by (1 - lr wd) (the shared frozen W0 is not decayed); "efficient" decays A and B like AdamW.
    """

    def __init__(self, pairs: list[LoRAPair], other_groups: list[dict] | None = None, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 mode: str = "full", x_mode: str = "sylvester", delta: float = 1e-8, max_grad_norm: float = 0.0,
                 clip_mode: str = "pre_adam"):
        if mode not in MODES:
            raise ValueError(f"mode = {mode!r}: choose from {', '.join(MODES)}")
        if x_mode not in X_MODES:
            raise ValueError(f"x_mode = {x_mode!r}: choose from {', '.join(X_MODES)}")
        if clip_mode not in CLIP_MODES:
            raise ValueError(f"clip_mode = {clip_mode!r}: choose from {', '.join(CLIP_MODES)}")
        if lr < 0 or eps < 0 or weight_decay < 0 or delta < 0 or max_grad_norm < 0:
            raise ValueError("lr, eps, weight_decay, delta and max_grad_norm must be >= 0")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"betas = {betas}: must be in [0, 1)")
        names = [p.name for p in pairs]
        if len(set(names)) != len(names):
            raise ValueError("two LoRA-Pro pairs share a name")
        groups = [{"params": [p.A, p.B], "pair": p.name, "scaling": float(p.scaling)} for p in pairs]
        groups += [{**g, "pair": None, "scaling": None} for g in (other_groups or []) if len(list(g["params"]))]
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(groups, defaults)
        self.mode, self.x_mode, self.delta = mode, x_mode, delta
        self.max_grad_norm, self.clip_mode = max_grad_norm, clip_mode
        self.last_grad_norm: float | None = None           # the norm clipping used at the last step

    # -------------------------------------------------------------------------------------- helpers
    @staticmethod
    def _grad32(p: Tensor, dtype: torch.dtype) -> Tensor:
        return torch.zeros_like(p, dtype=dtype) if p.grad is None else p.grad.detach().to(dtype)

    @staticmethod
    def _moments(state: dict, grad: Tensor, betas: tuple[float, float], eps: float) -> tuple[Tensor, float]:
        """Advance Adam's moments with ``grad`` (standard t = 1, 2, ...); return (denominator, 1 - beta1^t)."""
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(grad)
            state["exp_avg_sq"] = torch.zeros_like(grad)
        beta1, beta2 = betas
        state["step"] += 1
        t = state["step"].item()
        state["exp_avg"].lerp_(grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2 ** t)).add_(eps)
        return denom, 1 - beta1 ** t

    def _adamw_param(self, p: Tensor, grad: Tensor, group: dict) -> None:
        """torch.optim.AdamW's update (non-amsgrad) of one tensor with the given gradient."""
        state = self.state[p]
        denom, bc1 = self._moments(state, grad, group["betas"], group["eps"])
        if group["weight_decay"]:
            p.mul_(1 - group["lr"] * group["weight_decay"])
        p.addcdiv_(state["exp_avg"].to(p.dtype), denom.to(p.dtype), value=-group["lr"] / bc1)

    # ------------------------------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        pair_work = []                          # (group, factors, raw gA, raw gB, payload)
        sq_terms: list[Tensor] = []
        clip = self.max_grad_norm > 0
        for group in self.param_groups:
            if group["pair"] is None:
                continue
            A, B = group["params"]
            if A.grad is None and B.grad is None:
                continue
            f = factorize(A, B, group["scaling"], self.delta)
            gA, gB = self._grad32(A, f.A.dtype), self._grad32(B, f.A.dtype)
            if self.mode == "full":
                payload = equivalent_parts(f, gA, gB)                       # (Y, Z): g~ = s (B Y + Z A)
                if clip and self.clip_mode == "pre_adam":
                    sq_terms.append(equivalent_sqnorm(f, *payload))
            else:
                payload = adjust_with(f, gA, gB, self.x_mode)              # adjusted (gA', gB')
                if clip and self.clip_mode == "pre_adam":
                    sq_terms += [payload[0].square().sum(), payload[1].square().sum()]
            if clip and self.clip_mode == "official":
                sq_terms += [gA.square().sum(), gB.square().sum()]
            pair_work.append((group, f, payload))
        others = [(group, p) for group in self.param_groups if group["pair"] is None
                  for p in group["params"] if p.grad is not None]
        coef = 1.0
        if clip:
            sq_terms += [p.grad.detach().float().square().sum() for _, p in others]
            total = torch.stack([t.double() for t in sq_terms]).sum().sqrt().item() if sq_terms else 0.0
            self.last_grad_norm = total
            coef = min(1.0, self.max_grad_norm / (total + 1e-6))

        for group, f, payload in pair_work:
            if self.mode == "full":
                self._step_full(group, f, payload, coef)
            else:
                self._step_efficient(group, payload, coef)
        for group, p in others:
            grad = p.grad.detach().float()
            self._adamw_param(p, grad * coef if coef != 1.0 else grad, group)
        return loss

    def _step_full(self, group: dict, f: PairFactors, parts: tuple[Tensor, Tensor], coef: float) -> None:
        A, B = group["params"]
        s = f.scaling
        Y, Z = parts
        g_equiv = s * (f.B @ Y + Z @ f.A)                                   # [K, m, n]
        if coef != 1.0 and self.clip_mode == "pre_adam":
            g_equiv.mul_(coef)
        state = self.state[A]
        denom, bc1 = self._moments(state, g_equiv, group["betas"], group["eps"])
        del g_equiv
        g_hat = denom.reciprocal_().mul_(state["exp_avg"]).div_(bc1)       # reuses the denominator buffer
        # back to LoRA space, then the same projection (and X) as for raw gradients
        ga, gb = adjust_with(f, s * (_t(f.B) @ g_hat), s * (g_hat @ _t(f.A)), self.x_mode)
        del g_hat
        if coef != 1.0 and self.clip_mode == "official":
            ga, gb = ga * coef, gb * coef
        lr, wd = group["lr"], group["weight_decay"]
        if wd:
            shrink = math.sqrt(1 - lr * wd)
            A.mul_(shrink)
            B.mul_(shrink)
        A.add_(ga.to(A.dtype), alpha=-lr)
        B.add_(gb.to(B.dtype), alpha=-lr)

    def _step_efficient(self, group: dict, adjusted: tuple[Tensor, Tensor], coef: float) -> None:
        for p, grad in zip(group["params"], adjusted):
            self._adamw_param(p, grad * coef if coef != 1.0 else grad, group)


# ---------------------------------------------------------------------------------------------- the method
def _zero_stage(ds_config: dict) -> int:
    return int((ds_config.get("zero_optimization") or {}).get("stage", 0) or 0)


class LoRAProMethod(AdapterMethod):
    """LoRA-Pro per component (K = 1: LoRA-Pro; K > 1: ComLoRA x LoRA-Pro, each component its own pair).

    Two DeepSpeed paths:
      * ZeRO stage 0 with DeepSpeed bf16 off: ``LoRAProAdamW`` (mode full or efficient) is the client optimizer and
        sees the real tensors with their full all-reduced gradients; it also does the clipping.
      * ZeRO stage 1/2/3 or DeepSpeed bf16 (mode efficient): ``before_optimizer_step`` replaces
        each pair's accumulated, reduced gradients by the LoRA-Pro ones through DeepSpeed's public full-gradient API
        (``safe_get_full_grad`` / ``safe_set_full_grad``), then DeepSpeed clips them (with the other parameters'
        gradients) and its own AdamW runs on its partitions. Needs the trainer to call the hook; a run where it was
        not called stops at the first optimizer step instead of silently training plain LoRA.
    """

    name = "lora_pro"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.partitioned = False            # True: the gradient path through DeepSpeed (ZeRO >= 1 or bf16)
        self._adjusted_step = 0

    @property
    def mode(self) -> str:
        mode = self.cfg.lora_pro.mode
        if mode == "auto":
            return "full" if self.cfg.adapter.num_components == 1 else "efficient"
        return mode

    def check_ds_config(self, ds_config: dict) -> None:
        """Raises ConfigError (a ValueError) for what is not supported.

        ZeRO stage 0 without DeepSpeed bf16: any mode; takes over gradient clipping (sets the config's
        ``gradient_clipping`` to 0 in place; our optimizer clips with train.max_grad_norm and lora_pro.clip_mode)
        and refuses a DeepSpeed "optimizer" section. ZeRO stage >= 1 or DeepSpeed bf16: mode efficient only;
        DeepSpeed clips and steps, so clip_mode must be what DeepSpeed does (pre_adam; official with optimizer
        offload)."""
        stage = _zero_stage(ds_config)
        bf16 = (ds_config.get("bf16") or {}).get("enabled") is True
        self.partitioned = stage >= 1 or bf16
        if self.partitioned:
            where = f"ZeRO stage {stage}" + (" with bf16" if bf16 else "")
            if self.mode != "efficient":
                raise ConfigError(
                    f"adapter.method = lora_pro with lora_pro.mode = {self.mode} is not supported under DeepSpeed "
                    f"{where}: the full mode keeps Adam moments of the d_out x d_in equivalent gradient in its own "
                    f"optimizer, which needs the real (A, B) tensors, and DeepSpeed hands optimizers flat partitions "
                    f"except with ZeRO stage 0 and bf16 off. Use lora_pro.mode=efficient (LoRA-Pro gradients, then "
                    f"DeepSpeed's AdamW; works with ZeRO stage 0-3 and bf16), or ZeRO stage 0 (set "
                    f"zero_optimization.stage to 0) with train.bf16=false for the full mode.")
            # DeepSpeed clips, and what it clips is fixed by the config: without optimizer offload the norm is
            # taken in step() over the gradients we wrote (= pre_adam); with offload it is accumulated during the
            # backward from the raw gradients (= official). Both checked against LoRAProAdamW at stage 0.
            offload = ((ds_config.get("zero_optimization") or {}).get("offload_optimizer") or {}).get("device")
            deepspeed_clip = "official" if offload not in (None, "none") else "pre_adam"
            clip_mode = self.cfg.lora_pro.clip_mode
            if self.cfg.train.max_grad_norm > 0 and clip_mode != deepspeed_clip:
                why = ("with offload_optimizer DeepSpeed computes the clipping norm from the raw gradients during "
                       "the backward" if deepspeed_clip == "official" else
                       "DeepSpeed clips the LoRA-Pro gradients together with the other gradients")
                raise ConfigError(f"lora_pro.clip_mode = {clip_mode} is not what DeepSpeed does under {where}: {why}, "
                                  f"which is clip_mode = {deepspeed_clip}. Set lora_pro.clip_mode={deepspeed_clip} (or "
                                  f"train.max_grad_norm=0), or use ZeRO stage 0 with train.bf16=false, where "
                                  f"LoRA-Pro's optimizer clips either way.")
            return
        if "optimizer" in ds_config:
            raise ConfigError("adapter.method = lora_pro with ZeRO stage 0 brings its own optimizer (LoRAProAdamW); "
                             "remove the \"optimizer\" section from the DeepSpeed config")
        ds_config["gradient_clipping"] = 0.0

    def build_optimizer(self, model: nn.Module, param_groups: list[dict]) -> torch.optim.Optimizer | None:
        pairs = lora_pairs(model)
        if not pairs:
            raise ConfigError("adapter.method = lora_pro found no adapter layers to optimise")
        if self.partitioned:
            return None
        pair_ids = {id(t) for p in pairs for t in (p.A, p.B)}
        decay = {}
        others = []
        for group in param_groups:
            params = list(group["params"])
            for p in params:
                if id(p) in pair_ids:
                    decay[id(p)] = group.get("weight_decay", 0.0)
            rest = [p for p in params if id(p) not in pair_ids]
            if rest:
                others.append({**group, "params": rest})
        missing = [p.name for p in pairs if id(p.A) not in decay or id(p.B) not in decay]
        if missing:
            raise RuntimeError(f"LoRA-Pro pairs {missing[:3]} are not among the trainable parameter groups")
        t, pro = self.cfg.train, self.cfg.lora_pro
        opt = LoRAProAdamW(pairs, others, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2),
                           eps=t.adam_epsilon, weight_decay=t.weight_decay, mode=self.mode, x_mode=pro.x_mode,
                           delta=pro.delta, max_grad_norm=t.max_grad_norm, clip_mode=pro.clip_mode)
        for group in opt.param_groups:                     # the pair's weight decay follows its engine group
            if group["pair"] is not None:
                group["weight_decay"] = decay[id(group["params"][0])]
        return opt

    @torch.no_grad()
    def before_optimizer_step(self, engine, step: int) -> None:
        """Partitioned path: every pair's full gradients -> LoRA-Pro gradients, written back (collective)."""
        if not self.partitioned:
            return
        from deepspeed.utils import safe_get_full_grad, safe_set_full_grad

        pro = self.cfg.lora_pro
        for pair in lora_pairs(engine.module):
            gA, gB = safe_get_full_grad(pair.A), safe_get_full_grad(pair.B)
            if gA is None or gB is None:
                raise RuntimeError(f"LoRA-Pro: no gradient for {pair.name}; before_optimizer_step must run after "
                                   f"the step's last backward and before engine.step()")
            with gathered([pair.A, pair.B]):
                ga, gb = lorapro_adjust(pair.A, pair.B, gA, gB, pair.scaling, pro.x_mode, pro.delta)
            safe_set_full_grad(pair.A, ga.to(gA.dtype))
            safe_set_full_grad(pair.B, gb.to(gB.dtype))
        self._adjusted_step = step

    def on_optimizer_step(self, model: nn.Module, step: int) -> None:
        if self.partitioned and self._adjusted_step != step:
            raise RuntimeError(
                f"LoRA-Pro under ZeRO stage >= 1 / bf16 adjusts the gradients in before_optimizer_step(engine, step), "
                f"but the trainer did not call it before optimizer step {step}, which was therefore a plain LoRA "
                f"step. Use a trainer that calls the hook, or ZeRO stage 0 with train.bf16=false.")
