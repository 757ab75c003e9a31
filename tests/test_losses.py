"""Every loss term against a hand computation on small tensors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from comlora_ds.losses import ComLoRAObjective, annealing_eta, response_nll, response_nll_full_logits

# L[k, b] for K = 3 components, B = 2 samples; sims [B, K].
LOSSES = torch.tensor([[1.0, 2.0], [3.0, 0.5], [2.0, 1.5]])
SIMS = torch.tensor([[0.2, 1.0, -0.5], [2.0, 0.0, 1.0]])


@pytest.mark.parametrize("schedule,expected", [
    ("constant", (1.0, 1.0, 1.0)),
    ("linear", (0.0, 0.5, 1.0)),
    ("cosine", (0.0, 0.5, 1.0)),
    ("exponential", (0.0, 1 - math.exp(-2.5), 1 - math.exp(-5.0))),
])
def test_annealing_at_start_middle_end(schedule, expected):
    got = tuple(annealing_eta(schedule, t, 100, rate=5.0) for t in (0, 50, 100))
    assert got == pytest.approx(expected, abs=1e-12)


def test_annealing_quarter_points_and_clamping():
    assert annealing_eta("cosine", 25, 100) == pytest.approx(0.5 * (1 - math.cos(math.pi / 4)))
    assert annealing_eta("exponential", 25, 100, rate=2.0) == pytest.approx(1 - math.exp(-0.5))
    assert annealing_eta("linear", 150, 100) == 1.0
    with pytest.raises(ValueError, match="unknown annealing"):
        annealing_eta("sigmoid", 1, 10)


def test_lm_loss_is_mean_over_components_and_samples():
    objective = ComLoRAObjective(3)
    assert objective.lm_loss(LOSSES).item() == pytest.approx((1 + 2 + 3 + 0.5 + 2 + 1.5) / 6)


def test_align_loss_top_n_by_hand():
    # Sample 0: top-2 sims are k=1 (1.0) and k=0 (0.2); sample 1: k=0 (2.0) and k=2 (1.0).
    p0 = torch.softmax(torch.tensor([1.0, 0.2]), 0)
    p1 = torch.softmax(torch.tensor([2.0, 1.0]), 0)
    sample0 = p0[0] * 3.0 + p0[1] * 1.0           # L[1,0] = 3.0, L[0,0] = 1.0
    sample1 = p1[0] * 2.0 + p1[1] * 1.5           # L[0,1] = 2.0, L[2,1] = 1.5
    eta = 0.7
    expected = eta * (sample0 + sample1) / 2
    got = ComLoRAObjective(3, top_n=2).align_loss(LOSSES, SIMS, eta)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    # top-1 keeps only the argmax with weight 1.
    got1 = ComLoRAObjective(3, top_n=1).align_loss(LOSSES, SIMS, 1.0)
    assert got1.item() == pytest.approx((3.0 + 2.0) / 2)


def test_align_sign_reinforces_preferred_component():
    """d L_align / d L[k, b] >= 0: a gradient step lowers the preferred components' losses."""
    losses = LOSSES.clone().requires_grad_()
    ComLoRAObjective(3, top_n=2).align_loss(losses, SIMS, 1.0).backward()
    assert (losses.grad >= 0).all() and losses.grad[1, 0] > 0 and losses.grad[2, 0] == 0


def test_pairwise_by_hand_without_noise():
    sims = torch.tensor([[0.3, -0.1]])
    losses = torch.tensor([[2.0], [1.0]])         # component 1 is better on the one sample
    d_sim = torch.tensor([0.0, 0.4, -0.4, 0.0])   # [s0-s0, s0-s1, s1-s0, s1-s1]
    d_lm = torch.tensor([0.0, -1.0, 1.0, 0.0])    # [L0-L0, L1-L0, L0-L1, L1-L1]
    expected = (F.log_softmax(d_sim, 0) - F.log_softmax(d_lm, 0)).abs().sum()
    got = ComLoRAObjective(2, noise=0.0).pairwise_loss(losses, sims)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)


def test_pairwise_noise_is_gaussian_with_given_std():
    torch.manual_seed(0)
    sims = torch.zeros(4000, 2)
    losses = torch.zeros(2, 4000)
    objective = ComLoRAObjective(2, noise=0.1)
    torch.manual_seed(1)
    noisy = objective.pairwise_loss(losses, sims)
    # With sims = 0, each sample's loss is sum |log_softmax(0) - log_softmax(d_lm)| where d_lm = +-(e1-e0)*0.1.
    torch.manual_seed(1)
    eps = 0.1 * torch.randn(4000, 2)
    d = eps[:, 1] - eps[:, 0]
    d_lm = torch.stack([torch.zeros_like(d), d, -d, torch.zeros_like(d)], 1)
    expected = (math.log(0.25) - d_lm.log_softmax(1)).abs().sum(1).mean()
    assert noisy.item() == pytest.approx(expected.item(), rel=1e-5)


def test_pairwise_trains_selector_towards_lowest_loss():
    """A selector trained only by L_pairwise on fixed losses ends with argmax sim = argmin loss."""
    torch.manual_seed(0)
    losses = torch.tensor([[2.0, 0.3, 1.0], [1.0, 1.2, 0.2], [0.5, 2.0, 3.0]])   # [K=3, B=3]
    scores = nn.Parameter(torch.zeros(3, 3))                                       # sims [B, K]
    objective = ComLoRAObjective(3, noise=0.1)
    opt = torch.optim.Adam([scores], lr=0.05)
    for _ in range(300):
        opt.zero_grad()
        objective.pairwise_loss(losses, scores).backward()
        opt.step()
    assert scores.argmax(1).tolist() == losses.argmin(0).tolist()


def test_total_and_ablation_switches():
    torch.manual_seed(0)
    full = ComLoRAObjective(3, top_n=2, noise=0.0)
    terms = full(LOSSES, SIMS, eta=0.5)
    assert terms.total.item() == pytest.approx((terms.lm + terms.align + terms.pairwise).item())
    assert terms.align.item() > 0 and terms.pairwise.item() > 0
    no_lm = ComLoRAObjective(3, top_n=2, noise=0.0, use_lm=False)(LOSSES, SIMS, 0.5)
    assert no_lm.lm.item() == 0 and no_lm.total.item() == pytest.approx((terms.align + terms.pairwise).item())
    no_align = ComLoRAObjective(3, top_n=2, noise=0.0, use_align=False)(LOSSES, SIMS, 0.5)
    assert no_align.align.item() == 0
    no_pair = ComLoRAObjective(3, top_n=2, noise=0.0, use_pairwise=False)(LOSSES, SIMS, 0.5)
    assert no_pair.pairwise.item() == 0
    no_selector = full(LOSSES, None, 0.5)
    assert no_selector.total.item() == pytest.approx(terms.lm.item())


def test_component_weights_are_the_gradient_of_lm_plus_align():
    losses = LOSSES.clone().requires_grad_()
    objective = ComLoRAObjective(3, top_n=2, noise=0.0)
    terms = objective(losses, SIMS, eta=0.8, with_pairwise=False)
    terms.total.backward()
    torch.testing.assert_close(objective.component_weights(SIMS, 0.8, batch_size=2), losses.grad)
    torch.testing.assert_close(objective.component_weights(None, 0.8, batch_size=2),
                               torch.full((3, 2), 1 / 6))


@pytest.mark.parametrize("frozen_head", [True, False], ids=["frozen-head-grad-in-forward", "trainable-head-checkpoint"])
def test_chunked_response_nll_equals_full_logits_values_and_gradients(frozen_head):
    torch.manual_seed(0)
    head = nn.Linear(16, 50, bias=False).requires_grad_(not frozen_head)
    hidden = torch.randn(4, 9, 16, requires_grad=True)
    labels = torch.randint(0, 50, (4, 9))
    labels[:, :3] = -100
    labels[2, 7:] = -100
    row_weights = torch.tensor([0.5, -1.0, 2.0, 0.25])          # an uneven upstream gradient per row
    chunked = response_nll(hidden, labels, head, chunk_size=5)
    (g_chunked,) = torch.autograd.grad((chunked * row_weights).sum(), hidden)
    full = response_nll_full_logits(head(hidden), labels)
    (g_full,) = torch.autograd.grad((full * row_weights).sum(), hidden)
    torch.testing.assert_close(chunked, full, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(g_chunked, g_full, atol=1e-6, rtol=1e-6)
    # By hand for row 2: mean NLL of positions 3..6 predicting tokens 3..6 (shifted).
    logp = head(hidden[2]).log_softmax(-1)
    by_hand = -torch.stack([logp[t - 1, labels[2, t]] for t in range(3, 7)]).mean()
    assert chunked[2].item() == pytest.approx(by_hand.item(), rel=1e-6)


def test_response_nll_refuses_rows_without_response_tokens():
    head = nn.Linear(4, 10, bias=False)
    labels = torch.full((2, 5), -100)
    labels[0, 3] = 1
    with pytest.raises(ValueError, match=r"rows \[1\] of the batch have no supervised"):
        response_nll(torch.randn(2, 5, 4), labels, head)
