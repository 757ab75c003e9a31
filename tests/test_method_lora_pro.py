"""LoRA-Pro: the equivalent gradient, the Sylvester X, the AdamW variant (methods.md section 1.5), the method.

The maths is checked in float64 on random matrices (tolerance 1e-10, as in methods.md) against independent
references: autograd, a dense least-squares solve, scipy's Sylvester solver, full-matrix AdamW, a port of the
official DeepSpeed function, and a loop over K single-component optimizers.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from comlora_ds.comlora.inject import adapter_layers
from comlora_ds.config import load_config
from comlora_ds.methods import get_method
from comlora_ds.methods.lora_pro import (LoRAPair, LoRAProAdamW, equivalent_gradient, equivalent_parts,
                                         equivalent_sqnorm, factorize, lora_pairs, lorapro_adjust, solve_x)
from comlora_ds.comlora.model import build_model

from conftest import make_batch, tiny_llama

F64 = 1e-10


pytestmark = pytest.mark.usefixtures("one_thread")


def _rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _problem(m=7, n=5, r=2, seed=0, scaling=2.0, k=None):
    """A [.., r, n], B [.., m, r], G [.., m, n] and the LoRA gradients gA = s B^T G, gB = s G A^T."""
    lead = () if k is None else (k,)
    A, B, G = _rand(*lead, r, n, seed=seed), _rand(*lead, m, r, seed=seed + 1), _rand(*lead, m, n, seed=seed + 2)
    return A, B, G, scaling * B.transpose(-1, -2) @ G, scaling * G @ A.transpose(-1, -2)


def _projectors(A, B):
    P_B = B @ torch.linalg.inv(B.T @ B) @ B.T
    P_A = A.T @ torch.linalg.inv(A @ A.T) @ A
    return P_B, P_A


def _objective(gA_new, gB_new, gA, gB):
    return (gA_new - gA).square().sum() + (gB_new - gB).square().sum()


# ------------------------------------------------------------------------------------- 1.5.1 autograd
def test_lora_gradients_are_s_bt_g_and_s_g_at():
    A, B, G, _, _ = _problem()
    A.requires_grad_(True)
    B.requires_grad_(True)
    s = 2.0
    W0 = _rand(7, 5, seed=9)
    loss = ((W0 + s * B @ A) * G).sum()           # L = <W, G>, so dL/dW = G
    loss.backward()
    torch.testing.assert_close(A.grad, s * B.detach().T @ G, atol=F64, rtol=0)
    torch.testing.assert_close(B.grad, s * G @ A.detach().T, atol=F64, rtol=0)


# ------------------------------------------------------------------------- 1.5.2 the best approximation
@pytest.mark.parametrize("scaling", [2.0, 16 / math.sqrt(8)])
def test_equivalent_gradient_is_the_least_squares_optimum(scaling):
    m, n, r = 7, 5, 2
    A, B, G, gA, gB = _problem(m, n, r, scaling=scaling)
    g_eq = equivalent_gradient(A, B, gA, gB, scaling, delta=0.0)      # from the LoRA gradients only
    P_B, P_A = _projectors(A, B)
    torch.testing.assert_close(g_eq, P_B @ G + (torch.eye(m, dtype=G.dtype) - P_B) @ G @ P_A, atol=F64, rtol=0)
    eye_m, eye_n = torch.eye(m, dtype=G.dtype), torch.eye(n, dtype=G.dtype)
    torch.testing.assert_close(G - g_eq, (eye_m - P_B) @ G @ (eye_n - P_A), atol=F64, rtol=0)
    # min || s (I_n kron B) vec(gA) + s (A^T kron I_m) vec(gB) - vec(G) || over all mr + rn unknowns
    # (column-major vec: vec(B X) = (I kron B) vec(X), vec(Y A) = (A^T kron I) vec(Y))
    design = scaling * torch.cat([torch.kron(eye_n, B), torch.kron(A.T.contiguous(), eye_m)], 1)
    target = G.T.reshape(-1)
    solution = torch.linalg.lstsq(design, target.unsqueeze(1), driver="gelsd").solution
    lstsq_residual = (design @ solution - target.unsqueeze(1)).norm()
    assert abs((g_eq - G).norm().item() - lstsq_residual.item()) < F64
    # and the adjusted pair realises it: s (B gA' + gB' A) == g~
    ga, gb = lorapro_adjust(A, B, gA, gB, scaling, delta=0.0)
    torch.testing.assert_close(scaling * (B @ ga + gb @ A), g_eq, atol=F64, rtol=0)


def test_batched_over_k_equals_each_component():
    A, B, G, gA, gB = _problem(k=3, seed=4)
    ga, gb = lorapro_adjust(A, B, gA, gB, 2.0)
    g_eq = equivalent_gradient(A, B, gA, gB, 2.0)
    for k in range(3):
        ga_k, gb_k = lorapro_adjust(A[k], B[k], gA[k], gB[k], 2.0)
        torch.testing.assert_close(ga[k], ga_k, atol=F64, rtol=0)
        torch.testing.assert_close(gb[k], gb_k, atol=F64, rtol=0)
        torch.testing.assert_close(g_eq[k], equivalent_gradient(A[k], B[k], gA[k], gB[k], 2.0), atol=F64, rtol=0)


def test_equivalent_sqnorm_without_the_full_matrix():
    A, B, G, gA, gB = _problem(k=2, seed=5)
    f = factorize(A, B, 1.5, 1e-8)
    Y, Z = equivalent_parts(f, gA, gB)
    want = equivalent_gradient(A, B, gA, gB, 1.5).square().sum()
    assert equivalent_sqnorm(f, Y, Z).item() == pytest.approx(want.item(), rel=1e-10)


def test_transform_is_linear_so_accumulating_first_is_exact():
    """Gradient accumulation: transforming the summed micro-batch gradients == summing the transforms."""
    A, B, _, gA1, gB1 = _problem(seed=1)
    _, _, _, gA2, gB2 = _problem(seed=11)
    ga, gb = lorapro_adjust(A, B, gA1 + gA2, gB1 + gB2, 2.0)
    ga1, gb1 = lorapro_adjust(A, B, gA1, gB1, 2.0)
    ga2, gb2 = lorapro_adjust(A, B, gA2, gB2, 2.0)
    torch.testing.assert_close(ga, ga1 + ga2, atol=F64, rtol=0)
    torch.testing.assert_close(gb, gb1 + gb2, atol=F64, rtol=0)


# ------------------------------------------------------------------------------------- 1.5.3 Sylvester
def test_sylvester_x_residual_scipy_and_optimality():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    s = 2.0
    A, B, G, gA, gB = _problem(k=3, seed=7)
    f = factorize(A, B, s, delta=0.0)
    X = solve_x(f, gA, gB, "sylvester")
    btb, aat = B.transpose(1, 2) @ B, A @ A.transpose(1, 2)
    rhs = -(1 / s ** 2) * torch.linalg.inv(btb) @ gA @ A.transpose(1, 2)
    torch.testing.assert_close(btb @ X + X @ aat, rhs, atol=F64, rtol=0)
    for k in range(3):
        ref = scipy_linalg.solve_sylvester(btb[k].numpy(), aat[k].numpy(), rhs[k].numpy())
        torch.testing.assert_close(X[k], torch.from_numpy(ref), atol=1e-9, rtol=1e-9)
    ga, gb = lorapro_adjust(A, B, gA, gB, s, "sylvester", delta=0.0)
    best = _objective(ga, gb, gA, gB)
    for trial in range(20):                     # any other X is farther from the raw gradients
        dX = 1e-3 * _rand(3, 2, 2, seed=100 + trial)
        worse = _objective(ga + dX @ A, gb - B @ dX, gA, gB)
        assert worse >= best
    g_eq = s * (B @ ga + gb @ A)
    for mode in ("zero", "symmetry"):          # the equivalent gradient does not depend on X
        ga_m, gb_m = lorapro_adjust(A, B, gA, gB, s, mode, delta=0.0)
        torch.testing.assert_close(s * (B @ ga_m + gb_m @ A), g_eq, atol=F64, rtol=0)
        assert _objective(ga_m, gb_m, gA, gB) >= best


# ------------------------------------------------------------------------------------ 1.5.4 one SGD step
def test_one_sgd_step_moves_w_by_minus_lr_equivalent_gradient_to_first_order():
    s = 2.0
    A, B, G, gA, gB = _problem(seed=3)
    ga, gb = lorapro_adjust(A, B, gA, gB, s, delta=0.0)
    g_eq = equivalent_gradient(A, B, gA, gB, s, delta=0.0)
    errors = []
    for lr in (1e-2, 1e-3, 1e-4):
        dW = s * (B - lr * gb) @ (A - lr * ga) - s * B @ A
        errors.append(((dW + lr * g_eq).norm() / lr).item())
    assert errors[0] / errors[1] == pytest.approx(10, rel=1e-6)
    assert errors[1] / errors[2] == pytest.approx(10, rel=1e-6)


def test_first_step_with_b_zero_gives_no_nan():
    """B = 0: (B^T B)^-1 does not exist; the delta-regularised inverse gives gA' = 0 and g~ = G P_A."""
    s = 2.0
    A, _, G, _, _ = _problem(seed=8)
    B = torch.zeros(7, 2, dtype=torch.float64)
    gA, gB = s * B.T @ G, s * G @ A.T
    ga, gb = lorapro_adjust(A, B, gA, gB, s)
    assert torch.isfinite(ga).all() and torch.isfinite(gb).all()
    assert torch.count_nonzero(ga) == 0
    P_A = A.T @ torch.linalg.inv(A @ A.T) @ A
    torch.testing.assert_close(s * (B @ ga + gb @ A), G @ P_A, atol=1e-6, rtol=1e-6)
    # in fp32, through the optimizer, the first step is finite too
    pair = LoRAPair("w", nn.Parameter(A.float()[None]), nn.Parameter(B.float()[None]), s)
    pair.A.grad, pair.B.grad = gA.float()[None], gB.float()[None]
    LoRAProAdamW([pair], lr=1e-3, mode="full").step()
    assert torch.isfinite(pair.A).all() and torch.isfinite(pair.B).all() and pair.B.abs().sum() > 0


# -------------------------------------------------------------------------------------- 1.5.5 AdamW
def _quadratic_pair(m, n, r, seed=0, dtype=torch.float64):
    W0, target = _rand(m, n, seed=seed, dtype=dtype), _rand(m, n, seed=seed + 1, dtype=dtype)
    A = nn.Parameter(_rand(1, r, n, seed=seed + 2, dtype=dtype))
    B = nn.Parameter(_rand(1, m, r, seed=seed + 3, dtype=dtype) * 0.1)
    return W0, target, A, B


def _weights_after(opt_factory, W0, target, A, B, s, steps):
    opt = opt_factory()
    for _ in range(steps):
        opt.zero_grad()
        W = W0 + s * B[0] @ A[0]
        (0.5 * (W - target).square().sum()).backward()
        opt.step()
    return (W0 + s * B[0] @ A[0]).detach()


def test_full_rank_lora_pro_adamw_tracks_full_matrix_adamw():
    """r = n (A square, invertible): g~ = G and LoRA-Pro-AdamW follows AdamW on W itself (methods.md: 0.7%)."""
    m, n, s, lr, steps = 6, 4, 2.0, 1e-4, 50
    W0, target, A, B = _quadratic_pair(m, n, n)
    start = W0 + s * B[0].detach() @ A[0].detach()
    got = _weights_after(lambda: LoRAProAdamW([LoRAPair("w", A, B, s)], lr=lr, mode="full", delta=0.0),
                         W0, target, A, B, s, steps)
    W = nn.Parameter(start.clone())
    full = torch.optim.AdamW([W], lr=lr, weight_decay=0.0)
    for _ in range(steps):
        full.zero_grad()
        (0.5 * (W - target).square().sum()).backward()
        full.step()
    deviation = ((got - start) - (W.detach() - start)).norm() / (W.detach() - start).norm()
    assert deviation < 0.01


def test_full_mode_first_step_is_the_projected_adam_step():
    """r < n: dW = -lr (P_B g^ + (I - P_B) g^ P_A) + O(lr^2) with g^ the standard t = 1 Adam direction."""
    m, n, r, s = 7, 5, 2, 2.0
    errors = []
    for lr in (1e-4, 1e-5):
        W0, target, A, B = _quadratic_pair(m, n, r, seed=2)
        A0, B0 = A.detach()[0].clone(), B.detach()[0].clone()
        W_before = W0 + s * B0 @ A0
        G = W_before - target
        W_after = _weights_after(lambda: LoRAProAdamW([LoRAPair("w", A, B, s)], lr=lr, eps=1e-8, delta=0.0),
                                 W0, target, A, B, s, 1)
        g_eq = equivalent_gradient(A0, B0, s * B0.T @ G, s * G @ A0.T, s, delta=0.0)
        g_hat = g_eq / (g_eq.abs() + 1e-8)                 # t = 1: m^ / (sqrt(v^) + eps)
        P_B, P_A = _projectors(A0, B0)
        expected = -lr * (P_B @ g_hat + (torch.eye(m, dtype=G.dtype) - P_B) @ g_hat @ P_A)
        errors.append(((W_after - W_before) - expected).norm().item() / lr)
    assert errors[1] < errors[0] / 5                       # the error is O(lr)
    assert errors[1] < 1e-3


def test_efficient_mode_is_adjusted_gradients_then_adamw_on_the_factors():
    s, lr = 2.0, 1e-2
    A, B, _, gA, gB = _problem(k=2, seed=6)
    pA, pB = nn.Parameter(A.float().clone()), nn.Parameter(B.float().clone())
    rA, rB = nn.Parameter(A.float().clone()), nn.Parameter(B.float().clone())
    opt = LoRAProAdamW([LoRAPair("w", pA, pB, s)], lr=lr, mode="efficient", weight_decay=0.1)
    ref = torch.optim.AdamW([rA, rB], lr=lr, weight_decay=0.1)
    for step in range(3):
        gA_t, gB_t = (gA * (1 + step)).float(), (gB * (1 - 0.3 * step)).float()
        pA.grad, pB.grad = gA_t.clone(), gB_t.clone()
        ga, gb = lorapro_adjust(rA.detach(), rB.detach(), gA_t, gB_t, s)
        rA.grad, rB.grad = ga.float(), gb.float()
        opt.step()
        ref.step()
        torch.testing.assert_close(pA, rA, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(pB, rB, atol=1e-6, rtol=1e-5)


def test_other_parameters_get_torch_adamw():
    torch.manual_seed(0)
    w, w_ref = nn.Parameter(torch.randn(4, 3)), None
    w_ref = nn.Parameter(w.detach().clone())
    A, B = nn.Parameter(torch.randn(1, 2, 3)), nn.Parameter(torch.randn(1, 4, 2))
    opt = LoRAProAdamW([LoRAPair("w", A, B, 1.0)], [{"params": [w], "weight_decay": 0.05}], lr=1e-2)
    ref = torch.optim.AdamW([w_ref], lr=1e-2, weight_decay=0.05)
    for step in range(3):
        g = torch.randn(4, 3)
        w.grad, w_ref.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    torch.testing.assert_close(w, w_ref, atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------- 1.5.6 parity with the official function
def _official_full_adjustment(A, B, gA, gB, s, state, global_step, off_by_one):
    """Port of DeepSpeed-0.15.1 stage_1_and_2.py ``lorapro_full_adjustment`` (lines 1827-1895), in float64
    (no bf16 casts): X = 0 pass, full-matrix Adam, map back, Sylvester X via scipy. ``off_by_one`` reproduces
    t = global_step + 1 with global_step already incremented."""
    from scipy.linalg import solve_sylvester

    delta = 1e-8
    r = A.shape[0]
    eye_r = torch.eye(r, dtype=A.dtype)
    AA_T, B_TB = A @ A.T, B.T @ B
    AA_T_inv, B_TB_inv = torch.linalg.pinv(AA_T + delta * eye_r), torch.linalg.pinv(B_TB + delta * eye_r)
    grad_A = (1 / s ** 2) * B_TB_inv @ gA
    grad_B = (1 / s ** 2) * (torch.eye(B.shape[0], dtype=A.dtype) - B @ B_TB_inv @ B.T) @ gB @ AA_T_inv
    equiv = s * B @ grad_A + s * grad_B @ A
    if "m" not in state:
        state["m"], state["v"] = (1 - 0.9) * equiv, (1 - 0.999) * equiv * equiv
    else:
        state["m"] = 0.9 * state["m"] + (1 - 0.9) * equiv
        state["v"] = 0.999 * state["v"] + (1 - 0.999) * equiv * equiv
    step = global_step + 1 if off_by_one else global_step
    g = (state["m"] / (1 - 0.9 ** step)) / ((state["v"] / (1 - 0.999 ** step)).sqrt() + 1e-8)
    gA2, gB2 = s * B.T @ g, s * g @ A.T
    X = torch.from_numpy(solve_sylvester(B_TB.numpy(), AA_T.numpy(), (-(1 / s ** 2) * B_TB_inv @ gA2 @ A.T).numpy()))
    grad_A = (1 / s ** 2) * B_TB_inv @ gA2 + X @ A
    grad_B = (1 / s ** 2) * (torch.eye(B.shape[0], dtype=A.dtype) - B @ B_TB_inv @ B.T) @ gB2 @ AA_T_inv - B @ X
    return grad_A, grad_B


@pytest.mark.parametrize("off_by_one", [False, True])
def test_full_mode_matches_the_official_function_with_the_standard_step_count(off_by_one):
    pytest.importorskip("scipy")
    s, lr, m, n, r = 2.0, 1e-3, 7, 5, 2
    W0, target, A, B = _quadratic_pair(m, n, r, seed=12)
    A_off, B_off = A.detach()[0].clone(), B.detach()[0].clone()
    opt = LoRAProAdamW([LoRAPair("w", A, B, s)], lr=lr, mode="full")
    state, first_ratio = {}, None
    for step in range(1, 4):
        opt.zero_grad()
        (0.5 * (W0 + s * B[0] @ A[0] - target).square().sum()).backward()
        before = A.detach().clone()
        opt.step()
        G = W0 + s * B_off @ A_off - target
        ga, gb = _official_full_adjustment(A_off, B_off, s * B_off.T @ G, s * G @ A_off.T, s, state, step, off_by_one)
        if step == 1:
            first_ratio = (lr * ga).norm() / (before[0] - A.detach()[0]).norm()
        A_off, B_off = A_off - lr * ga, B_off - lr * gb        # the official inner optimizer: plain SGD
    if off_by_one:      # t starts at 2: the first update is ~0.74x a standard Adam step (methods.md 1.2)
        official_first = (0.1 / (1 - 0.9 ** 2)) / math.sqrt(0.001 / (1 - 0.999 ** 2))   # = 0.744
        assert first_ratio.item() == pytest.approx(official_first, rel=1e-3)
    else:
        torch.testing.assert_close(A.detach()[0], A_off, atol=1e-10, rtol=0)
        torch.testing.assert_close(B.detach()[0], B_off, atol=1e-10, rtol=0)


# ------------------------------------------------------------------------------- 1.5.8 K-stacked parity
@pytest.mark.parametrize("mode", ["full", "efficient"])
@pytest.mark.parametrize("clip", [0.0, 0.5])
def test_k_batched_optimizer_equals_a_loop_over_k(mode, clip):
    """K components in one [K, ...] pair == K single-component optimizers (clipping couples the components
    through the global norm, so the loop gets the batched run's norm: K = 1 runs with the same coefficient)."""
    K, m, n, r, s = 3, 6, 5, 2, 1.5
    A = nn.Parameter(_rand(K, r, n, seed=1, dtype=torch.float32))
    B = nn.Parameter(_rand(K, m, r, seed=2, dtype=torch.float32) * 0.2)
    singles = [(nn.Parameter(A.detach()[k:k + 1].clone()), nn.Parameter(B.detach()[k:k + 1].clone()))
               for k in range(K)]
    batched = LoRAProAdamW([LoRAPair("w", A, B, s)], lr=1e-2, mode=mode)
    loop = [LoRAProAdamW([LoRAPair("w", a, b, s)], lr=1e-2, mode=mode) for a, b in singles]
    for step in range(3):
        gA = _rand(K, r, n, seed=10 + step, dtype=torch.float32)
        gB = _rand(K, m, r, seed=20 + step, dtype=torch.float32)
        A.grad, B.grad = gA.clone(), gB.clone()
        if clip:
            batched.max_grad_norm = clip
        batched.step()
        for k, (opt, (a, b)) in enumerate(zip(loop, singles)):
            a.grad, b.grad = gA[k:k + 1].clone(), gB[k:k + 1].clone()
            if clip:   # same clipping coefficient as the batched optimizer's global norm
                coef = min(1.0, clip / (batched.last_grad_norm + 1e-6))
                a.grad.mul_(coef) if mode == "efficient" else None
                b.grad.mul_(coef) if mode == "efficient" else None
                if mode == "full":
                    opt.max_grad_norm = 0.0
                    a.grad.mul_(coef)           # full mode: g~ is linear in the raw gradients
                    b.grad.mul_(coef)
            opt.step()
        for k, (a, b) in enumerate(singles):
            torch.testing.assert_close(A.detach()[k:k + 1], a.detach(), atol=2e-6, rtol=1e-5)
            torch.testing.assert_close(B.detach()[k:k + 1], b.detach(), atol=2e-6, rtol=1e-5)


def test_clip_modes():
    """official: the raw-gradient norm scales the final full-mode update; pre_adam: the equivalent gradients'
    norm is the one reported (and Adam's first step is scale-invariant)."""
    s = 2.0
    A0, B0 = _rand(1, 2, 5, seed=1, dtype=torch.float32), _rand(1, 7, 2, seed=2, dtype=torch.float32)
    gA, gB = _rand(1, 2, 5, seed=3, dtype=torch.float32), _rand(1, 7, 2, seed=4, dtype=torch.float32)
    updates, norms = {}, {}
    for clip_mode, max_norm in (("none", 0.0), ("official", 0.1), ("pre_adam", 0.1)):
        A, B = nn.Parameter(A0.clone()), nn.Parameter(B0.clone())
        A.grad, B.grad = gA.clone(), gB.clone()
        opt = LoRAProAdamW([LoRAPair("w", A, B, s)], lr=1e-3, mode="full", max_grad_norm=max_norm,
                           clip_mode="pre_adam" if clip_mode == "none" else clip_mode)
        opt.step()
        updates[clip_mode], norms[clip_mode] = (A.detach() - A0, B.detach() - B0), opt.last_grad_norm
    raw_norm = math.sqrt(gA.square().sum().item() + gB.square().sum().item())
    assert norms["official"] == pytest.approx(raw_norm, rel=1e-5)
    f = factorize(A0, B0, s)
    assert norms["pre_adam"] == pytest.approx(equivalent_sqnorm(f, *equivalent_parts(f, gA, gB)).sqrt().item(),
                                              rel=1e-5)
    coef = 0.1 / (raw_norm + 1e-6)
    for got, want in zip(updates["official"], updates["none"]):
        torch.testing.assert_close(got, coef * want, atol=1e-7, rtol=1e-4)
    for got, want in zip(updates["pre_adam"], updates["none"]):     # m^/sqrt(v^) at t = 1 ignores the scale
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-3)


# --------------------------------------------------------------------------------------------- the method
def _cfg(*overrides):
    return load_config(overrides=["adapter.method=lora_pro", "adapter.rank=4", "adapter.dropout=0.0",
                                  *overrides])


def test_pairs_are_registered_by_name_with_the_layers_real_scaling():
    cfg = _cfg("adapter.num_components=2", "adapter.use_rslora=true", "adapter.alpha=16")
    model = build_model(cfg, tiny_llama())
    pairs = lora_pairs(model)
    layers = adapter_layers(model)
    assert [p.name for p in pairs] == sorted(layers) and len(pairs) == 14
    for p in pairs:
        assert p.A is layers[p.name].lora_A and p.B is layers[p.name].lora_B
        assert p.scaling == pytest.approx(16 / math.sqrt(4))
    opt = get_method(cfg).build_optimizer(model, [{"params": model.trainable_parameters(), "weight_decay": 0.0}])
    assert isinstance(opt, LoRAProAdamW) and opt.mode == "efficient"      # auto: K > 1
    pair_groups = [g for g in opt.param_groups if g["pair"] is not None]
    assert [g["pair"] for g in pair_groups] == [p.name for p in pairs]
    others = {id(p) for g in opt.param_groups if g["pair"] is None for p in g["params"]}
    selector = {id(p) for p in model.selector.parameters()}
    assert others == selector                      # the selector never enters LoRA-Pro pairing


def test_mode_auto_is_full_for_k1():
    assert get_method(_cfg("adapter.num_components=1")).mode == "full"
    assert get_method(_cfg("adapter.num_components=3")).mode == "efficient"
    assert get_method(_cfg("adapter.num_components=3", "lora_pro.mode=full")).mode == "full"


@pytest.mark.parametrize("ds,overrides,message", [
    ({"zero_optimization": {"stage": 2}}, ["lora_pro.mode=full"],
     "lora_pro.mode = full is not supported under DeepSpeed ZeRO stage 2"),
    ({"zero_optimization": {"stage": 3}}, ["adapter.num_components=1"],        # auto -> full for K = 1
     "lora_pro.mode = full is not supported under DeepSpeed ZeRO stage 3"),
    ({"zero_optimization": {"stage": 0}, "bf16": {"enabled": True}}, ["lora_pro.mode=full"],
     "not supported under DeepSpeed ZeRO stage 0 with bf16"),
    ({"zero_optimization": {"stage": 2}}, ["lora_pro.clip_mode=official"],
     "clip_mode = official is not what DeepSpeed does under ZeRO stage 2: DeepSpeed clips the LoRA-Pro gradients"),
    ({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}, [],
     "clip_mode = pre_adam is not what DeepSpeed does under ZeRO stage 3: with offload_optimizer"),
    ({"optimizer": {"type": "AdamW"}}, [], "remove the \"optimizer\" section"),
])
def test_unsupported_deepspeed_settings_are_refused_clearly(ds, overrides, message):
    with pytest.raises(ValueError, match=message):
        get_method(_cfg(*overrides)).check_ds_config(ds)


def test_stage_0_hands_clipping_to_the_optimizer():
    ds = {"zero_optimization": {"stage": 0}, "bf16": {"enabled": False}, "gradient_clipping": 1.0}
    method = get_method(_cfg("lora_pro.mode=full"))
    method.check_ds_config(ds)
    assert ds["gradient_clipping"] == 0.0 and not method.partitioned


@pytest.mark.parametrize("ds,overrides", [
    ({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}, ["lora_pro.clip_mode=official"]),
    ({"zero_optimization": {"stage": 2}}, ["lora_pro.clip_mode=official", "train.max_grad_norm=0"]),
    ({"zero_optimization": {"stage": 0}, "bf16": {"enabled": True}}, []),
])
def test_supported_partitioned_settings(ds, overrides):
    method = get_method(_cfg(*overrides))
    method.check_ds_config(ds)
    assert method.partitioned


def test_zero_stages_run_the_efficient_mode_as_a_gradient_transform():
    """ZeRO >= 1: no client optimizer (DeepSpeed's AdamW, DeepSpeed's clipping), and a trainer that never calls
    before_optimizer_step is stopped at the first step instead of silently training plain LoRA."""
    ds = {"zero_optimization": {"stage": 2}, "gradient_clipping": 1.0}
    cfg = _cfg("lora_pro.mode=efficient")
    method = get_method(cfg)
    method.check_ds_config(ds)
    assert ds["gradient_clipping"] == 1.0 and method.partitioned
    model = build_model(cfg, tiny_llama())
    assert method.build_optimizer(model, [{"params": model.trainable_parameters()}]) is None
    with pytest.raises(RuntimeError, match="did not call it before optimizer step 1"):
        method.on_optimizer_step(model, 1)


def test_training_steps_on_a_tiny_llama_reduce_the_loss():
    """The whole path on a model: ComLoRA K = 2, LoRA-Pro full and efficient, loss goes down, state is kept
    per pair ([K, d_out, d_in] moments in full mode, LoRA-sized in efficient mode)."""
    from comlora_ds.comlora.model import build_objective
    from comlora_ds.training.step import forward_backward

    for mode in ("full", "efficient"):
        cfg = _cfg("adapter.num_components=2", f"lora_pro.mode={mode}", "comlora.noise=0.0")
        torch.manual_seed(0)
        model = build_model(cfg, tiny_llama())
        opt = get_method(cfg).build_optimizer(model, [{"params": model.trainable_parameters(), "weight_decay": 0.0}])
        for g in opt.param_groups:
            g["lr"] = 1e-2
        objective = build_objective(cfg)
        batch = make_batch(batch_size=4, seq_len=16)
        losses = []
        for _ in range(5):
            opt.zero_grad()
            out = forward_backward(model, batch, objective, eta=1.0, backward=torch.Tensor.backward)
            losses.append(out.losses.mean().item())
            opt.step()
        assert losses[-1] < losses[0]
        name, layer = sorted(model.adapter_layers().items())[0]
        state = opt.state[layer.lora_A]
        if mode == "full":
            assert state["exp_avg"].shape == (2, layer.out_features, layer.in_features)
            assert not opt.state[layer.lora_B]
        else:
            assert state["exp_avg"].shape == layer.lora_A.shape
            assert opt.state[layer.lora_B]["exp_avg"].shape == layer.lora_B.shape
        assert state["step"].item() == 5
        reloaded = copy.deepcopy(opt.state_dict())
        opt.load_state_dict(reloaded)
