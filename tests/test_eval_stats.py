"""comlora_ds.evaluation.stats against hand-computed values and scipy's own tests."""

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from comlora_ds.evaluation.stats import cohen_kappa, majority_label, paired_comparison


def test_cohen_kappa_by_hand():
    assert cohen_kappa(["a", "a", "a"], ["a", "b", "b"]) == 0.0          # one answer to everything
    assert cohen_kappa(["a", "b"], ["a", "b"]) == 1.0
    # observed 3/4; predicted a, b 1/2 each, gold a 1/4, b 3/4: expected 1/8 + 3/8 = 1/2; (3/4 - 1/2) / (1/2)
    assert cohen_kappa(["a", "a", "b", "b"], ["a", "b", "b", "b"]) == 0.5
    # no keyword is an answer of its own: observed 1/2, expected 0 * 1/2 + 1/2 * 1/2 = 1/4; (1/2 - 1/4) / (3/4)
    assert cohen_kappa([None, "b"], ["a", "b"]) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="same non-zero length"):
        cohen_kappa(["a"], ["a", "b"])


def test_paired_comparison_by_hand():
    a = [1, 1, 1, 0, 1, 0]
    b = [0, 1, 0, 0, 0, 1]
    got = paired_comparison(a, b, resamples=2000)
    d = np.array(a) - np.array(b)                              # [1, 0, 1, 0, 1, -1]: mean 1/3
    assert got.difference == pytest.approx(1 / 3)
    assert got.standard_error == pytest.approx(np.std(d, ddof=1) / math.sqrt(6))
    assert (got.a_better, got.b_better, got.n) == (3, 1, 6)
    assert got.sign_test_p == pytest.approx(scipy_stats.binomtest(3, 4).pvalue)   # 0.625
    assert got.standard_errors == pytest.approx(got.difference / got.standard_error)
    assert 0.1 < got.bootstrap_p < 0.7
    assert (got.mean_a, got.mean_b) == (pytest.approx(4 / 6), pytest.approx(2 / 6))


def test_paired_comparison_separates_a_real_difference_from_noise():
    rng = np.random.default_rng(3)
    base = rng.normal(size=400)
    shifted = paired_comparison(base + 0.3 + rng.normal(scale=0.5, size=400), base)
    assert shifted.bootstrap_p < 1e-3 and shifted.sign_test_p < 1e-3 and shifted.standard_errors > 5
    noise = paired_comparison(base + rng.normal(scale=0.5, size=400), base)
    assert noise.bootstrap_p > 0.05 and abs(noise.standard_errors) < 2.5
    same = paired_comparison(base, base)
    assert same.difference == 0 and same.sign_test_p == 1.0 and same.standard_errors == 0.0
    with pytest.raises(ValueError, match="same length >= 2"):
        paired_comparison([1.0, 2.0], [1.0])


def test_majority_label():
    assert majority_label(["pos", "neg", "pos"]) == "pos"
    assert majority_label(["neg", "pos"]) == "neg"           # a tie goes to the first seen
    with pytest.raises(ValueError):
        majority_label([])
