"""comlora_ds.comlora.divergence against dense references: the components' weight-space distance and their
validation-loss difference."""

from __future__ import annotations

import math

import pytest
import torch

from comlora_ds.comlora.layer import LoRAFactors
from comlora_ds.comlora.divergence import frobenius_inner, loss_difference, update_divergence, verdict


def _factors(seed: int, rank: int = 3, d_in: int = 7, d_out: int = 5, scaling: float = 2.0) -> LoRAFactors:
    g = torch.Generator().manual_seed(seed)
    return LoRAFactors(torch.randn(rank, d_in, generator=g), torch.randn(d_out, rank, generator=g), scaling)


def test_frobenius_inner_equals_the_dense_product_also_for_other_ranks():
    f, g = _factors(0), _factors(1, rank=5, scaling=0.5)
    assert frobenius_inner(f, g) == pytest.approx(float((f.delta() * g.delta()).sum()), rel=1e-5)


def test_distance_and_cosine_per_module_type_and_overall_equal_dense_ones():
    layers = [("q_proj", [_factors(0), _factors(1)]), ("v_proj", [_factors(2), _factors(3)]),
              ("q_proj", [_factors(4), _factors(5)])]
    got = update_divergence(layers)["0-1"]
    for module, selected in (("all", layers), ("q_proj", [l for l in layers if l[0] == "q_proj"])):
        a = torch.cat([f[0].delta().flatten() for _, f in selected])
        b = torch.cat([f[1].delta().flatten() for _, f in selected])
        want_distance = float((a - b).norm() / ((a.norm() + b.norm()) / 2))
        want_cosine = float(a @ b / (a.norm() * b.norm()))
        pair = got if module == "all" else got["by_module"][module]
        assert pair["relative_distance"] == pytest.approx(want_distance, rel=1e-5)
        assert pair["cosine"] == pytest.approx(want_cosine, rel=1e-5, abs=1e-6)


def test_twins_are_at_distance_zero_and_opposites_at_two():
    f = _factors(0)
    twins = update_divergence([("o_proj", [f, LoRAFactors(f.A.clone(), f.B.clone(), f.scaling)])])["0-1"]
    assert twins["relative_distance"] == pytest.approx(0, abs=1e-6) and twins["cosine"] == pytest.approx(1)
    opposite = update_divergence([("o_proj", [f, LoRAFactors(f.A, -f.B, f.scaling)])])["0-1"]
    assert opposite["relative_distance"] == pytest.approx(2) and opposite["cosine"] == pytest.approx(-1)
    zero = update_divergence([("o_proj", [f, LoRAFactors(f.A, torch.zeros_like(f.B), 1.0)])])["0-1"]
    assert zero["cosine"] is None                       # LoRA's B starts at zero: no direction yet


def test_loss_difference_mean_paired_se_wins_and_verdict_by_hand():
    losses = torch.tensor([[1.0, 1.5], [2.0, 2.25], [0.5, 0.25], [3.0, 3.0]])
    d = [-0.5, -0.25, 0.25, 0.0]
    mean = sum(d) / 4
    se = math.sqrt(sum((x - mean) ** 2 for x in d) / 3) / 2
    got = loss_difference(losses)["0-1"]
    assert got["mean"] == pytest.approx(mean) and got["paired_se"] == pytest.approx(se)
    assert got["wins"] == [0.5, 0.25] and got["distinguishable"] is False and got["num_rows"] == 4
    clear = loss_difference(torch.stack([torch.arange(20.0), torch.arange(20.0) + 1 + 0.01 * torch.randn(20)], 1))
    assert clear["0-1"]["distinguishable"] is True
    assert "components 0 and 1 distinguishable on validation" in verdict(clear)
    assert "NOT distinguishable" in verdict(loss_difference(losses))
