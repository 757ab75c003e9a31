"""Every loss term against a hand computation on small tensors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from comlora_ds.comlora.losses import (ComLoRAObjective, annealing_eta, reduce_losses, response_nll,
                                response_nll_full_logits, response_token_counts)

# L[k, b] (per-token means) for K = 3 components, B = 2 samples; sims [B, K]; response tokens per sample.
LOSSES = torch.tensor([[1.0, 2.0], [3.0, 0.5], [2.0, 1.5]])
SIMS = torch.tensor([[0.2, 1.0, -0.5], [2.0, 0.0, 1.0]])
NUM_TOKENS = torch.tensor([4, 10])


def _pairwise(objective, losses, sims, num_tokens=None):
    return objective.pairwise_loss(objective.pair_target(losses, num_tokens), sims)


@pytest.mark.parametrize("schedule,expected", [
    ("constant", (1.0, 1.0, 1.0)),
    ("linear", (0.0, 0.5, 1.0)),
    ("cosine", (0.0, 0.5, 1.0)),
    ("exponential", (0.0, 1 - math.exp(-2.5), 1 - math.exp(-5.0))),
])
def test_annealing_at_start_middle_end(schedule, expected):
    got = tuple(annealing_eta(schedule, t, 100, rate=5.0) for t in (0, 50, 100))
    assert got == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("schedule,first,last", [
    ("constant", 1.0, 1.0),
    ("linear", 0.1, 1.0),
    ("cosine", 0.5 * (1 - math.cos(math.pi / 10)), 1.0),
    ("exponential", 1 - math.exp(-0.5), 1 - math.exp(-5.0)),
])
def test_annealing_clock_first_and_last_step(schedule, first, last):
    """t counts the step being taken (1..T): the first step already anneals, the last one is the end value."""
    assert annealing_eta(schedule, 1, 10, rate=5.0) == pytest.approx(first, abs=1e-12)
    assert annealing_eta(schedule, 10, 10, rate=5.0) == pytest.approx(last, abs=1e-12)


def test_annealing_quarter_points_and_clamping():
    assert annealing_eta("cosine", 25, 100) == pytest.approx(0.5 * (1 - math.cos(math.pi / 4)))
    assert annealing_eta("exponential", 25, 100, rate=2.0) == pytest.approx(1 - math.exp(-0.5))
    assert annealing_eta("linear", 150, 100) == 1.0
    with pytest.raises(ValueError, match="unknown annealing"):
        annealing_eta("sigmoid", 1, 10)


def test_lm_loss_is_mean_over_components_and_samples():
    objective = ComLoRAObjective(3)
    assert objective.lm_loss(LOSSES).item() == pytest.approx((1 + 2 + 3 + 0.5 + 2 + 1.5) / 6)
    # lm_reduction = sum: each sample's mean times its 4 or 10 response tokens.
    summed = ComLoRAObjective(3, lm_reduction="sum").lm_loss(LOSSES, NUM_TOKENS)
    assert summed.item() == pytest.approx((4 * (1 + 3 + 2) + 10 * (2 + 0.5 + 1.5)) / 6)


def test_response_token_counts_and_summed_loss_by_hand():
    labels = torch.tensor([[-100, -100, 5, 6, 7], [-100, 3, 4, -100, -100]])
    assert response_token_counts(labels).tolist() == [3, 2]           # position t predicts t + 1
    head = nn.Linear(4, 10, bias=False)
    hidden = torch.randn(2, 5, 4)
    mean = response_nll(hidden, labels, head)
    logp = head(hidden).log_softmax(-1)
    by_hand = torch.stack([-(logp[0, 1, 5] + logp[0, 2, 6] + logp[0, 3, 7]), -(logp[1, 0, 3] + logp[1, 1, 4])])
    summed = reduce_losses(mean[None], response_token_counts(labels), "sum")[0]
    torch.testing.assert_close(summed, by_hand, rtol=1e-6, atol=1e-6)
    assert reduce_losses(mean[None], None, "mean") is not None
    with pytest.raises(ValueError, match="needs the response token counts"):
        reduce_losses(mean[None], None, "sum")
    with pytest.raises(ValueError, match="loss_reduction = 'median'"):
        ComLoRAObjective(2, loss_reduction="median")


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
    summed = ComLoRAObjective(3, top_n=2, lm_reduction="sum").align_loss(LOSSES, SIMS, eta, NUM_TOKENS)
    assert summed.item() == pytest.approx((eta * (4 * sample0 + 10 * sample1) / 2).item(), rel=1e-6)
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
    got = _pairwise(ComLoRAObjective(2, noise=0.0, loss_reduction="mean"), losses, sims)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    # sum (the default): the same sample with 6 response tokens has loss gaps of 6.
    d_lm_sum = 6 * d_lm
    expected_sum = (F.log_softmax(d_sim, 0) - F.log_softmax(d_lm_sum, 0)).abs().sum()
    got_sum = _pairwise(ComLoRAObjective(2, noise=0.0), losses, sims, torch.tensor([6]))
    assert got_sum.item() == pytest.approx(expected_sum.item(), rel=1e-6)


def test_pairwise_gradient_sum_vs_mean_by_hand():
    """K = 2: the loss is |a - p| + |b - q| over the four log-probs; d/dsim follows from the softmaxes. The summed
    target (gap 6) is sharper than the mean one (gap 1), so the selector gradient is larger."""
    losses = torch.tensor([[2.0], [1.0]])
    for reduction, gap in (("mean", 1.0), ("sum", 6.0)):
        sims = torch.tensor([[0.3, -0.1]], requires_grad=True)
        _pairwise(ComLoRAObjective(2, noise=0.0, loss_reduction=reduction), losses, sims, torch.tensor([6])).backward()
        d = 0.4
        z_sim = 2 + math.exp(d) + math.exp(-d)
        z_lm = 2 + math.exp(-gap) + math.exp(gap)
        log_sim = [math.log(1 / z_sim), d - math.log(z_sim), -d - math.log(z_sim), math.log(1 / z_sim)]
        log_lm = [math.log(1 / z_lm), -gap - math.log(z_lm), gap - math.log(z_lm), math.log(1 / z_lm)]
        sign = [math.copysign(1.0, a - b) for a, b in zip(log_sim, log_lm)]
        p = [math.exp(v) for v in log_sim]
        # d log_softmax_i / d x_j = [i == j] - p_j, with x = (0, d, -d, 0) and dd/dsim0 = 1, dd/dsim1 = -1.
        dx = [sum(sign[i] * ((i == j) - p[j]) for i in range(4)) for j in range(4)]
        d_sim0 = dx[1] - dx[2]
        torch.testing.assert_close(sims.grad, torch.tensor([[d_sim0, -d_sim0]]), rtol=1e-5, atol=1e-6)


def test_pairwise_noise_is_gaussian_with_given_std():
    torch.manual_seed(0)
    sims = torch.zeros(4000, 2)
    losses = torch.zeros(2, 4000)
    objective = ComLoRAObjective(2, noise=0.1, loss_reduction="mean")
    torch.manual_seed(1)
    noisy = _pairwise(objective, losses, sims)
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
        _pairwise(objective, losses, scores, torch.tensor([5, 5, 5])).backward()
        opt.step()
    assert scores.argmax(1).tolist() == losses.argmin(0).tolist()


def test_total_and_ablation_switches():
    torch.manual_seed(0)
    full = ComLoRAObjective(3, top_n=2, noise=0.0, loss_reduction="mean")
    terms = full(LOSSES, SIMS, eta=0.5)
    assert terms.total.item() == pytest.approx((terms.lm + terms.align + terms.pairwise).item())
    assert terms.align.item() > 0 and terms.pairwise.item() > 0
    no_lm = ComLoRAObjective(3, top_n=2, noise=0.0, loss_reduction="mean", use_lm=False)(LOSSES, SIMS, 0.5)
    assert no_lm.lm.item() == 0 and no_lm.total.item() == pytest.approx((terms.align + terms.pairwise).item())
    no_align = ComLoRAObjective(3, top_n=2, noise=0.0, loss_reduction="mean", use_align=False)(LOSSES, SIMS, 0.5)
    assert no_align.align.item() == 0
    no_pair = ComLoRAObjective(3, top_n=2, noise=0.0, loss_reduction="mean", use_pairwise=False)(LOSSES, SIMS, 0.5)
    assert no_pair.pairwise.item() == 0
    no_selector = full(LOSSES, None, 0.5)
    assert no_selector.total.item() == pytest.approx(terms.lm.item())


@pytest.mark.parametrize("lm_reduction", ["mean", "sum"])
def test_component_weights_are_the_gradient_of_lm_plus_align(lm_reduction):
    losses = LOSSES.clone().requires_grad_()
    objective = ComLoRAObjective(3, top_n=2, noise=0.0, lm_reduction=lm_reduction)
    terms = objective(losses, SIMS, eta=0.8, num_tokens=NUM_TOKENS, with_pairwise=False)
    terms.total.backward()
    torch.testing.assert_close(objective.component_weights(SIMS, 0.8, batch_size=2, num_tokens=NUM_TOKENS),
                               losses.grad)
    per_sample = NUM_TOKENS.float() if lm_reduction == "sum" else torch.ones(2)
    torch.testing.assert_close(objective.component_weights(None, 0.8, batch_size=2, num_tokens=NUM_TOKENS),
                               torch.full((3, 2), 1 / 6) * per_sample)


def test_default_pairwise_target_is_the_summed_loss_plus_noise():
    """The paper's eq. 6: Lt = sum_t NLL + noise * eps; the noise is the same size whatever the reduction."""
    objective = ComLoRAObjective(3, noise=0.1)
    torch.manual_seed(3)
    target = objective.pair_target(LOSSES, NUM_TOKENS)
    torch.manual_seed(3)
    eps = torch.randn(2, 3)
    clean = (LOSSES * NUM_TOKENS[None, :].float()).t()
    torch.testing.assert_close(target.clean, clean)
    torch.testing.assert_close(target.noisy, clean + 0.1 * eps)


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
