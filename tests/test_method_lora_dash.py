"""LoRA-Dash: selection, continuity, gradient, timing, frozen directions, merge, export (methods.md 2.4).

In-process, on bare layers and the tiny LLaMA; the DeepSpeed runs (ZeRO-2/3, resume across the switch,
1 vs 2 ranks) are in test_method_engine.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from comlora_ds.comlora.inject import adapter_layers, merge_component
from comlora_ds.config import load_config
from comlora_ds.methods import get_method
from comlora_ds.methods.lora_dash import (DashLinear, change_rates, dash_layers,
                                          select_directions, switch_to_dash)
from comlora_ds.comlora.model import build_model, build_objective
from comlora_ds.training.step import forward_backward

from conftest import make_batch, tiny_llama

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _orthonormal(n, seed):
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


def _layer(K=2, d_in=12, d_out=10, r=3, s_d=4, seed=0, dtype=torch.float32) -> DashLinear:
    torch.manual_seed(seed)
    layer = DashLinear(nn.Linear(d_in, d_out, bias=False).to(dtype), K, r, alpha=2 * r, num_directions=s_d)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.3)
        layer.lora_A.normal_(0, 0.3)
    return layer


# --------------------------------------------------------------------------------------- 2.4.1 selection
def test_selection_picks_the_top_change_rates_of_a_constructed_update():
    """W0 = U diag(sigma) V^T with known factors; dW_k = sum_i c_ki sigma_i u_i v_i^T (so the change rate of
    direction i is |c_ki|): the selected indices are top-s_d(c_k), per component."""
    m, n, q, s_d = 9, 7, 7, 3
    U, V = _orthonormal(m, 0)[:, :q], _orthonormal(n, 1)
    sigma = torch.linspace(5.0, 0.5, q, dtype=torch.float64)
    W0 = U @ torch.diag(sigma) @ V.T
    c = torch.stack([torch.tensor([0.1, 3.0, 0.2, 2.0, 0.01, 5.0, 0.3]),
                     torch.tensor([4.0, 0.1, 0.2, 0.3, 6.0, 0.05, 1.0])]).double()
    B = U[None] * (c * sigma)[:, None, :]            # s B_k A_k = U diag(c_k sigma) V^T with A = V^T, s = 1
    A = V.T[None].expand(2, q, n)
    idx, U_sel, V_sel = select_directions(W0, A, B, 1.0, s_d)
    assert idx.tolist() == [[5, 1, 3], [4, 0, 6]]
    for k in range(2):                                # the chosen singular vectors, up to a joint sign
        for j, i in enumerate(idx[k].tolist()):
            sign = torch.sign(U_sel[k, :, j] @ U[:, i].float())
            torch.testing.assert_close(U_sel[k, :, j] * sign, U[:, i].float(), atol=1e-5, rtol=0)
            torch.testing.assert_close(V_sel[k, :, j] * sign, V[:, i].float(), atol=1e-5, rtol=0)
    # the projection without forming dW equals diag(U^T dW V)
    dW = torch.stack([B[k] @ A[k] for k in range(2)])
    Uf, S, Vh = torch.linalg.svd(W0, full_matrices=False)
    rates = change_rates(Uf, S, Vh, A, B, 1.0, sigma_eps=0.0)
    want = torch.diagonal(Uf.T @ dW @ Vh.T, dim1=-2, dim2=-1).abs() / S
    torch.testing.assert_close(rates, want, atol=1e-10, rtol=0)


def test_rank_deficient_w0_gives_finite_rates():
    W0 = torch.zeros(6, 5)
    W0[0, 0] = 1.0
    A, B = torch.randn(1, 2, 5), torch.randn(1, 6, 2)
    U, S, Vh = torch.linalg.svd(W0, full_matrices=False)
    assert torch.isfinite(change_rates(U, S, Vh, A, B, 1.0, sigma_eps=1e-12)).all()


# ----------------------------------------------------------------------------- 2.4.2 continuity, 2.4.3 grad
def test_output_is_bit_identical_across_the_switch():
    layer = _layer()
    x = torch.randn(2 * 5, 12)
    with torch.no_grad():
        before = layer(x)
        switch_to_dash(layer, step=7)
        after = layer(x)
    assert bool(layer.dash_active) and int(layer.dash_step) == 7
    assert layer.dash_U.abs().sum() > 0 and (layer.dash_idx >= 0).all()
    assert torch.equal(before, after)


def test_gradient_of_d_is_u_t_g_v():
    layer = _layer(K=2)
    switch_to_dash(layer, step=1)
    with torch.no_grad():
        layer.dash_d.normal_()
    x, R = torch.randn(2 * 4, 12), torch.randn(2 * 4, 10)
    (layer(x) * R).sum().backward()                         # dL/dW_k = R_k^T x_k
    for k in range(2):
        rows = slice(4 * k, 4 * (k + 1))
        G = R[rows].T @ x[rows]
        want = torch.einsum("mi,mn,ni->i", layer.dash_U[k], G, layer.dash_V[k])
        torch.testing.assert_close(layer.dash_d.grad[k], want, atol=1e-5, rtol=1e-5)


def test_before_the_switch_the_dash_term_and_its_gradient_are_zero():
    layer = _layer()
    x = torch.randn(2 * 3, 12)
    layer(x).sum().backward()
    assert layer.dash_d.grad is not None and torch.count_nonzero(layer.dash_d.grad) == 0


# ------------------------------------------------------------------------- K-batched == loop, merge, export
def test_k_batched_equals_each_component_and_the_explicit_formula():
    layer = _layer(K=3)
    switch_to_dash(layer, step=1)
    with torch.no_grad():
        layer.dash_d.normal_()
    x = torch.randn(3 * 4, 5, 12)
    batched = layer(x)
    for k in range(3):
        rows = slice(4 * k, 4 * (k + 1))
        layer.active_component = k
        torch.testing.assert_close(layer(x[rows]), batched[rows], atol=1e-6, rtol=1e-6)
        W_k = layer.base.weight + layer.delta_weight(k)
        torch.testing.assert_close(batched[rows], x[rows] @ W_k.T, atol=1e-5, rtol=1e-5)
    layer.active_component = None


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_merged_equals_unmerged(dtype, tol):
    """bf16: one rounding of the merged weight to 8 mantissa bits."""
    layer = _layer(K=2, dtype=dtype)
    switch_to_dash(layer, step=1)
    with torch.no_grad():
        layer.dash_d.normal_()
    x = torch.randn(6, 12, dtype=dtype)
    layer.active_component = 1
    unmerged = layer(x)
    layer.merge(1)
    torch.testing.assert_close(layer(x).float(), unmerged.float(), atol=tol, rtol=tol)
    layer.unmerge()


def test_export_factors_are_an_exact_peft_lora_of_rank_r_plus_s_d():
    """B' A' == the merged delta, and stock PEFT LoRA with r = lora_alpha = r + s_d, loaded with (A', B'),
    reproduces our component's logits."""
    r, s_d = 4, 3
    cfg = load_config(overrides=["adapter.method=lora_dash", "adapter.num_components=2", f"adapter.rank={r}",
                                 "adapter.dropout=0.0", f"lora_dash.num_directions={s_d}", "lora_dash.t_steps=1",
                                 "adapter.use_rslora=true"])
    base = tiny_llama(seed=0)
    ours = build_model(cfg, copy.deepcopy(base))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in adapter_layers(ours.llm).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.05)
    switch_to_dash(ours, step=1)
    with torch.no_grad():
        for layer in adapter_layers(ours.llm).values():
            layer.dash_d.copy_(torch.randn(layer.dash_d.shape, generator=g))
    k = 1
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=r + s_d, lora_alpha=r + s_d,
                                                                target_modules=TARGETS, lora_dropout=0.0))
    with torch.no_grad():
        for name, layer in adapter_layers(ours.llm).items():
            tensors = {n: t for n, t in layer.state_dict().items() if n.startswith(("lora_", "dash_"))}
            f = DashLinear.factors_of(tensors, k, layer.scaling)
            A, B, scaling = f.A, f.B, f.scaling
            assert scaling == 1.0 and A.shape == (r + s_d, layer.in_features)
            want = layer.scaling * layer.lora_B[k] @ layer.lora_A[k] \
                + layer.dash_U[k] @ torch.diag(layer.dash_d[k]) @ layer.dash_V[k].T   # s B A + U diag(d) V^T
            torch.testing.assert_close(B @ A, want, atol=1e-6, rtol=1e-5)
            assert torch.equal(layer.delta_weight(k), f.delta())          # merge uses the same factors
            peft_layer = peft_model.base_model.model.get_submodule(name)
            peft_layer.lora_A["default"].weight.copy_(A)
            peft_layer.lora_B["default"].weight.copy_(B)
    ids = make_batch()["input_ids"]
    with torch.no_grad():
        for layer in adapter_layers(ours.llm).values():
            layer.active_component = k
        want = ours.llm(ids).logits
        torch.testing.assert_close(peft_model(ids).logits, want, atol=1e-5, rtol=1e-5)
        merge_component(ours.llm, k)
        torch.testing.assert_close(ours.llm(ids).logits, want, atol=1e-5, rtol=1e-5)


def test_num_directions_larger_than_the_layer_is_refused():
    with pytest.raises(ValueError, match="num_directions = 9 must be between 1 and min"):
        DashLinear(nn.Linear(8, 16), 1, 2, 4.0, num_directions=9)


# ---------------------------------------------------------------- 2.4.4 timing, 2.4.5 frozen directions
def _dash_model(t_steps=3, overrides=()):
    cfg = load_config(overrides=["adapter.method=lora_dash", "adapter.num_components=2", "adapter.rank=4",
                                 "adapter.dropout=0.0", "comlora.noise=0.0", f"lora_dash.t_steps={t_steps}",
                                 "lora_dash.num_directions=4", *overrides])
    torch.manual_seed(0)
    model = build_model(cfg, tiny_llama())
    return cfg, model


def test_switch_after_exactly_t_optimizer_steps_with_accumulation_checkpointing_and_eval():
    """Gradient accumulation 4, activation checkpointing (forwards re-run in backward) and evaluation forwards
    between steps do not move the switch: it follows optimizer step t, then U_S, V_S stay frozen while A, B
    and d train."""
    t, accumulation = 3, 4
    cfg, model = _dash_model(t, ["model.gradient_checkpointing=true"])
    method = get_method(cfg)
    objective = build_objective(cfg)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    layers = list(dash_layers(model).values())
    snapshots = {}
    for step in range(1, 7):
        for micro in range(accumulation):
            model.train()
            forward_backward(model, make_batch(batch_size=2, seed=10 * step + micro), objective, eta=1.0,
                             backward=lambda loss: (loss / accumulation).backward())
            model.eval()
            with torch.no_grad():                                   # "periodic evaluation"
                model(**make_batch(batch_size=2, seed=99))
        opt.step()
        opt.zero_grad()
        method.on_optimizer_step(model, step)
        assert all(bool(layer.dash_active) == (step >= t) for layer in layers), step
        if step == t:
            snapshots = {n: t_.detach().clone() for n, t_ in model.state_dict().items()
                         if any(key in n for key in ("dash_U", "dash_V", "dash_idx", "lora_A", "lora_B", "dash_d"))}
    assert {int(layer.dash_step) for layer in layers} == {t}
    state = model.state_dict()
    for name, before in snapshots.items():
        if any(key in name for key in ("dash_U", "dash_V", "dash_idx")):
            assert torch.equal(state[name], before), name
        else:
            assert not torch.equal(state[name], before), name


def test_sequential_execution_gives_the_batched_gradients_after_the_switch():
    cfg, model = _dash_model(1)
    switch_to_dash(model, step=1)
    with torch.no_grad():
        for layer in dash_layers(model).values():
            layer.dash_d.normal_(0, 0.1)
    objective = build_objective(cfg)
    batch = make_batch(pad_tail=(0, 2, 0))
    forward_backward(model, batch, objective, eta=0.6, backward=torch.Tensor.backward)
    batched = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    forward_backward(model, batch, objective, eta=0.6, backward=torch.Tensor.backward, execution="sequential")
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, batched[name], atol=1e-6, rtol=1e-4, msg=name)
    assert any("dash_d" in n for n in batched) and all(batched[n].abs().sum() > 0 for n in batched if "dash_d" in n)


def test_config_validation():
    from comlora_ds.config import ConfigError

    with pytest.raises(ConfigError, match="lora_dash.t_steps = 0: must be > 0"):
        load_config(overrides=["lora_dash.t_steps=0"])
    with pytest.raises(ConfigError, match="the switch would never happen"):
        load_config(overrides=["adapter.method=lora_dash", "train.max_steps=50"])
    with pytest.raises(ConfigError, match="lora_pro.mode = 'fast': must be one of auto, full, efficient"):
        load_config(overrides=["lora_pro.mode=fast"])
