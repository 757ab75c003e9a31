"""Statistics for comparing models on the same test examples: Cohen's kappa, paired standard errors, paired tests.

Two models scored on the same examples are compared through the per-example differences d_i = a_i - b_i:
the standard error of their mean is sd(d) / sqrt(n), smaller than that of either accuracy when the models
agree on most examples. The tests are the sign test (scipy's exact binomial test on the examples where they
differ) and a paired bootstrap of the mean difference. Written here rather than taken from a package because
each is a few lines over numpy/scipy and the reports need them on per-example arrays we already have.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def cohen_kappa(predicted: Sequence[object], gold: Sequence[object]) -> float:
    """Cohen's kappa of predicted vs gold labels: 0 for a constant answer (or any answer chosen without regard to
    the example), 1 for all correct."""
    n = len(gold)
    if n == 0 or len(predicted) != n:
        raise ValueError(f"cohen_kappa needs two label lists of the same non-zero length, got {len(predicted)} "
                         f"and {n}")
    observed = sum(p == g for p, g in zip(predicted, gold)) / n
    counts_p, counts_g = Counter(predicted), Counter(gold)
    expected = sum(counts_p[label] * counts_g[label] for label in counts_g) / n ** 2
    return (observed - expected) / (1 - expected) if expected < 1 else 0.0


@dataclass(frozen=True)
class PairedComparison:
    """a minus b on the same n examples: mean difference, its standard error, and two-sided p-values."""

    n: int
    mean_a: float
    mean_b: float
    difference: float
    standard_error: float
    a_better: int
    b_better: int
    sign_test_p: float
    bootstrap_p: float

    @property
    def standard_errors(self) -> float:
        """The difference in units of its standard error (inf when every example differs by the same amount)."""
        if self.standard_error == 0:
            return 0.0 if self.difference == 0 else float("inf")
        return self.difference / self.standard_error


def paired_comparison(a: Sequence[float], b: Sequence[float], *, resamples: int = 10000,
                      seed: int = 0) -> PairedComparison:
    """Compare per-example scores ``a`` and ``b`` (higher or lower better, the caller reads the sign)."""
    from scipy.stats import binomtest

    a_arr, b_arr = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a_arr.shape != b_arr.shape or a_arr.ndim != 1 or len(a_arr) < 2:
        raise ValueError(f"paired_comparison needs two score lists of the same length >= 2, got {a_arr.shape} "
                         f"and {b_arr.shape}")
    d = a_arr - b_arr
    n = len(d)
    a_better, b_better = int((d > 0).sum()), int((d < 0).sum())
    sign_p = binomtest(a_better, a_better + b_better).pvalue if a_better + b_better else 1.0
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, n, size=(resamples, n))].mean(axis=1)
    # two-sided: how often the resampled mean lands on the other side of 0 (or on it), doubled
    tail = min((means <= 0).mean(), (means >= 0).mean())
    return PairedComparison(n=n, mean_a=float(a_arr.mean()), mean_b=float(b_arr.mean()), difference=float(d.mean()),
                            standard_error=float(d.std(ddof=1) / np.sqrt(n)), a_better=a_better,
                            b_better=b_better, sign_test_p=float(sign_p), bootstrap_p=float(min(1.0, 2 * tail)))


def majority_label(labels: Sequence[object]) -> object:
    """The most frequent label (ties: the first seen), the constant predictor's answer."""
    if not labels:
        raise ValueError("majority_label needs at least one label")
    return Counter(labels).most_common(1)[0][0]
