"""The drift statistics lmops computes itself (PSI, MMD and its permutation test, AUC) against
independent computations written out the long way; the others are scipy's."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from lmops.monitor import stats


def test_psi_matches_the_textbook_formula_over_quantile_bins():
    rng = np.random.default_rng(0)
    ref, win = rng.normal(0, 1, 2000), rng.normal(0.5, 1.2, 1500)
    edges = np.quantile(ref, [i / 10 for i in range(1, 10)])
    expected = 0.0
    for lo, hi in zip([-math.inf, *edges], [*edges, math.inf]):
        r = max(np.mean((ref >= lo) & (ref < hi)), 1e-4)
        w = max(np.mean((win >= lo) & (win < hi)), 1e-4)
        expected += (w - r) * math.log(w / r)
    assert stats.psi(ref, win) == pytest.approx(expected, rel=1e-9)
    assert stats.psi(ref, ref) == pytest.approx(0.0, abs=1e-12)
    # a discrete variable: tied quantiles merge into fewer bins, PSI stays finite
    assert math.isfinite(stats.psi(np.array([3] * 50 + [4] * 50), np.array([4] * 90 + [9] * 10)))


def _mmd2_naive(x: np.ndarray, y: np.ndarray, bw: float) -> float:
    def k(a, b):
        return math.exp(-float(np.sum((a - b) ** 2)) / bw)
    n, m = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i, j in itertools.permutations(range(n), 2)) / (n * (n - 1))
    yy = sum(k(y[i], y[j]) for i, j in itertools.permutations(range(m), 2)) / (m * (m - 1))
    xy = sum(k(a, b) for a in x for b in y) / (n * m)
    return xx + yy - 2 * xy


def test_mmd_matches_the_unbiased_estimator_written_out():
    rng = np.random.default_rng(1)
    x, y = rng.normal(0, 1, (30, 4)), rng.normal(0.3, 1, (25, 4))
    bw = 3.0
    value, _ = stats.mmd_test(torch.tensor(x), torch.tensor(y), bw, 50, torch.Generator().manual_seed(0))
    assert value == pytest.approx(_mmd2_naive(x, y, bw), rel=1e-9)
    # the batched splits: each row a different pair of disjoint subsets of one pool
    pool = np.concatenate([x, y])
    k = stats.kernel(torch.tensor(pool), bw)
    a, b = torch.zeros(2, len(pool)), torch.zeros(2, len(pool))
    a[0, :10], b[0, 10:30] = 1, 1
    a[1, 40:], b[1, :5] = 1, 1
    got = stats.mmd2_splits(k, a, b)
    assert float(got[0]) == pytest.approx(_mmd2_naive(pool[:10], pool[10:30], bw), rel=1e-9)
    assert float(got[1]) == pytest.approx(_mmd2_naive(pool[40:], pool[:5], bw), rel=1e-9)


def test_the_permutation_test_is_uniform_under_the_null_and_small_under_a_shift():
    gen = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(2)
    ps = []
    for _ in range(40):
        x, y = torch.tensor(rng.normal(0, 1, (40, 3))), torch.tensor(rng.normal(0, 1, (40, 3)))
        ps.append(stats.mmd_test(x, y, stats.rbf_bandwidth(x), 100, gen)[1])
    assert 0.3 < np.mean(ps) < 0.7 and np.mean(np.array(ps) < 0.05) <= 0.15
    x, y = torch.tensor(rng.normal(0, 1, (40, 3))), torch.tensor(rng.normal(1, 1, (40, 3)))
    assert stats.mmd_test(x, y, stats.rbf_bandwidth(x), 100, gen)[1] < 0.02


def test_auc_equals_the_share_of_correctly_ordered_pairs():
    rng = np.random.default_rng(3)
    scores, labels = rng.normal(size=60).round(1), rng.integers(0, 2, 60)  # rounded: ties count half
    pos, neg = scores[labels == 1], scores[labels == 0]
    pairs = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p in pos for q in neg) / (len(pos) * len(neg))
    assert stats.auc(scores, labels) == pytest.approx(pairs, rel=1e-12)


def test_the_domain_classifier_tells_shifted_embeddings_apart_and_not_equal_ones():
    rng = np.random.default_rng(4)
    same = stats.domain_auc(torch.tensor(rng.normal(0, 1, (200, 16))), torch.tensor(rng.normal(0, 1, (200, 16))))
    shifted = stats.domain_auc(torch.tensor(rng.normal(0, 1, (200, 16))),
                               torch.tensor(rng.normal(0, 1, (200, 16)) + np.eye(16)[0] * 1.5))
    threshold = stats.auc_threshold(200, 200, 0.01)
    assert same[0] < threshold < shifted[0] and shifted[1] < 1e-6
    assert 0.55 < threshold < 0.6


def test_wasserstein_is_over_the_reference_sd_and_js_is_a_distance():
    ref = np.array([1.0, 2, 3, 4, 5] * 20)
    assert stats.wasserstein(ref, ref + 2 * ref.std()) == pytest.approx(2.0)
    assert stats.js([1, 0], [0, 1]) == pytest.approx(1.0)
    assert stats.js([5, 5], [1, 1]) == pytest.approx(0.0)
