"""Selector diagnostics: the training-window counts and the validation agreement / rank correlation, by hand."""

from __future__ import annotations

import pytest
import torch

from comlora_ds.data import ResponseCollator
from comlora_ds.comlora.losses import PairTarget
from comlora_ds.training.tracking import DIAGNOSTICS, RunLogger, diagnostic_rates, selector_diagnostics
from comlora_ds.comlora.validation import centred_rank_correlation, score_validation
from conftest import make_batch
from helpers import comlora_model


def test_window_counts_by_hand():
    # 3 samples, K = 2. Noise-free: sample 0 prefers comp 1, sample 1 comp 0, sample 2 comp 1.
    clean = torch.tensor([[5.0, 3.0], [2.0, 4.0], [7.0, 6.5]])
    noisy = torch.tensor([[5.1, 2.9], [4.2, 4.0], [6.4, 6.6]])    # sample 1 and 2 flipped by the noise
    sims = torch.tensor([[0.1, 0.4], [0.3, -0.2], [1.0, 0.0]])      # top: 1 (right), 0 (right), 0 (wrong)
    counts = selector_diagnostics(PairTarget(clean, noisy), sims).tolist()
    assert counts == pytest.approx([1, 3, 2, 0.3 + 0.5 + 1.0, 3])
    rates = diagnostic_rates(counts)
    assert rates == pytest.approx({"target_order_rate": 1 / 3, "top_is_lowest_loss_rate": 2 / 3, "sim_spread": 0.6})


def test_window_counts_k3_count_every_pair():
    clean = torch.tensor([[1.0, 2.0, 3.0]])
    noisy = torch.tensor([[1.0, 3.5, 3.0]])                            # pair (1, 2) flips, (0, 1), (0, 2) do not
    counts = selector_diagnostics(PairTarget(clean, noisy), torch.tensor([[0.0, 1.0, 2.0]])).tolist()
    assert counts[:3] == [2, 3, 0] and counts[3] == pytest.approx(2.0)
    assert diagnostic_rates([0.0] * len(DIAGNOSTICS)) == {"target_order_rate": None, "top_is_lowest_loss_rate": None,
                                                           "sim_spread": None}


def test_logger_writes_window_rates_and_resets_and_keeps_the_window_across_resume(tmp_path):
    from comlora_ds.config import load_config

    cfg = load_config(overrides=["logging.winner_window=2", "logging.wandb_mode=disabled"])
    metrics = {"loss": 1.0, "lm_loss": 1.0, "align_loss": 0.0, "pairwise_loss": 0.0, "stop_requested": False,
               "samples": 4, "tokens": 40, "component_loss": [1.0, 1.1], "selector_score": [0.0, 0.0],
               "selector_argmax": [3, 1], "selector_diagnostics": [3.0, 4.0, 2.0, 0.8, 4.0]}
    logger = RunLogger(cfg, tmp_path, total_steps=4, start_step=0, enabled=True)
    logger.log_step(1, metrics, lr=1e-3, eta=0.5)
    state = logger.window_state()
    logger.close()
    resumed = RunLogger(cfg, tmp_path, total_steps=4, start_step=1, enabled=True)
    resumed.load_window_state(state)
    resumed.log_step(2, metrics, lr=1e-3, eta=0.5)
    assert resumed.window_state() == {"winner_window": [0, 0], "diagnostics_window": [0.0] * len(DIAGNOSTICS)}
    resumed.close()
    import json

    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    window = records[-1]
    assert window["winner_counts"] == [6, 2]
    assert window["selector_diagnostics"] == pytest.approx({"target_order_rate": 0.75, "top_is_lowest_loss_rate": 0.5,
                                                            "sim_spread": 0.2})
    assert "selector_diagnostics" not in records[0]


def test_centred_rank_correlation_by_hand():
    sims = torch.tensor([[0.0, 1.0], [0.0, 3.0], [2.0, 0.0], [0.0, 0.5]])
    losses = torch.tensor([[2.0, 1.0], [5.0, 1.0], [1.0, 4.0], [1.0, 1.2]])
    # Centred sims: +-0.5, +-1.5, +-1.0, +-0.25; centred -losses: +-0.5, +-2.0, +-1.5, -+0.1 (row 3 disagrees).
    x = torch.tensor([-0.5, 0.5, -1.5, 1.5, 1.0, -1.0, -0.25, 0.25])
    y = torch.tensor([-0.5, 0.5, -2.0, 2.0, 1.5, -1.5, 0.1, -0.1])
    rank = lambda v: v.argsort().argsort().double()                      # no ties here
    rx, ry = rank(x), rank(y)
    pearson = ((rx - rx.mean()) * (ry - ry.mean())).sum() / ((rx - rx.mean()).norm() * (ry - ry.mean()).norm())
    assert centred_rank_correlation(sims, losses) == pytest.approx(pearson.item())
    assert centred_rank_correlation(sims[:1], losses[:1]) is None


def test_validation_agreement_counts_rows_whose_top_component_has_the_lowest_loss():
    model, _ = comlora_model(num_components=2)
    batch = make_batch(batch_size=5, seed=3)
    rows = [{key: batch[key][i].tolist() for key in ("input_ids", "attention_mask", "labels")} for i in range(5)]
    scores = score_validation(model.eval(), rows, ResponseCollator(pad_token_id=0), num_components=2, batch_size=2)
    with torch.no_grad():
        out = model(**batch)
    agree = int((out.sims.argmax(1) == out.losses.argmin(0)).sum())
    assert scores.agreement == agree
    result = scores.as_dict()
    assert result["selector_agreement_rate"] == pytest.approx(agree / 5)
    assert result["selector_rank_correlation"] == pytest.approx(centred_rank_correlation(out.sims, out.losses.t()),
                                                                abs=1e-6)


def test_scoring_longest_rows_first_gives_the_scores_of_the_split_order():
    """score_validation's length ordering: the same per-row losses and sims in the split's order, the same counts,
    totals within fp32 rounding, on rows of different lengths."""
    model, _ = comlora_model(num_components=2)
    batch = make_batch(batch_size=6, seq_len=24, seed=4)
    rows = [{key: batch[key][i][:keep].tolist() for key in ("input_ids", "attention_mask", "labels")}
            for i, keep in enumerate((9, 20, 12, 24, 7, 16))]     # rows of different lengths, unsorted    model.eval()
    plain, ordered = (score_validation(model, rows, ResponseCollator(pad_token_id=0), num_components=2, batch_size=2,
                                       by_length=by_length) for by_length in (False, True))
    torch.testing.assert_close(ordered.row_losses, plain.row_losses, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(ordered.row_sims, plain.row_sims, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(ordered.loss_sum, plain.loss_sum, atol=1e-5, rtol=1e-6)
    assert torch.equal(ordered.selector_argmax, plain.selector_argmax) and ordered.num_samples == plain.num_samples
