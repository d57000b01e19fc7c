"""Two-sample statistics of drift, each between a reference sample and a window sample.

From scipy where it has them (Wasserstein distance, Jensen-Shannon distance, Mann-Whitney U); written
here where it does not: PSI (a formula over binned shares) and MMD with its permutation test (on one
kernel matrix, all permutations in one matrix product), each compared with an independent
computation in tests/monitor/test_stats.py. The domain classifier is an L2 logistic regression fitted
by L-BFGS (PyTorch), cross-validated, scored by AUC.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import stats as sps
from scipy.spatial.distance import jensenshannon

PSI_BINS = 10
PSI_EPS = 1e-4  # share given to an empty bin, so one empty bin does not make PSI infinite


def psi(reference: np.ndarray, window: np.ndarray, bins: int = PSI_BINS) -> float:
    """Population stability index: sum over bins of (w - r) * ln(w / r), bins at the reference's
    quantiles (ties merged, so a discrete variable gets fewer, wider bins)."""
    reference, window = np.asarray(reference, float), np.asarray(window, float)
    edges = np.unique(np.quantile(reference, np.linspace(0, 1, bins + 1)[1:-1]))
    r = np.bincount(np.searchsorted(edges, reference, side="right"), minlength=len(edges) + 1) / len(reference)
    w = np.bincount(np.searchsorted(edges, window, side="right"), minlength=len(edges) + 1) / len(window)
    r, w = np.maximum(r, PSI_EPS), np.maximum(w, PSI_EPS)
    return float(np.sum((w - r) * np.log(w / r)))


def wasserstein(reference: np.ndarray, window: np.ndarray) -> float:
    """Wasserstein-1 distance over the reference's standard deviation: scale-free, 1 = shifted by a sd."""
    sd = float(np.std(reference))
    return float(sps.wasserstein_distance(reference, window)) / (sd if sd > 0 else 1.0)


def js(reference_counts: np.ndarray, window_counts: np.ndarray) -> float:
    """Jensen-Shannon distance (base 2: 0 alike, 1 disjoint) of two count vectors over the same categories."""
    r, w = np.asarray(reference_counts, float), np.asarray(window_counts, float)
    if r.sum() == 0 or w.sum() == 0:
        return 0.0 if r.sum() == w.sum() else 1.0
    return float(jensenshannon(r, w, base=2))


def mean_diff_p(reference: np.ndarray, window: np.ndarray, alternative: str = "greater") -> float:
    """One-sided p-value that the window's values are larger (Mann-Whitney U, as scipy computes it)."""
    if len(reference) < 2 or len(window) < 2:
        return float("nan")
    return float(sps.mannwhitneyu(window, reference, alternative=alternative).pvalue)


# ---------------------------------------------------------------------------------------------- MMD


def rbf_bandwidth(x: torch.Tensor) -> float:
    """The median heuristic: the median pairwise squared distance (of at most 1000 points)."""
    x = x[:1000]
    d = torch.cdist(x, x).pow(2)
    upper = d[torch.triu(torch.ones_like(d, dtype=torch.bool), diagonal=1)]
    med = float(upper.median()) if upper.numel() else 1.0
    return med if med > 0 else 1.0


def kernel(x: torch.Tensor, bandwidth: float) -> torch.Tensor:
    return torch.exp(-torch.cdist(x, x).pow(2) / bandwidth)


def mmd2_splits(k: torch.Tensor, a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """Unbiased MMD^2 between two sides of the points of kernel matrix k (N, N), for P splits at once:
    a (P, N) is 1 for the points on the first side, b (P, N) for those on the second (default: all
    the others). Returns (P,)."""
    a = a.to(k.dtype)
    b = 1 - a if b is None else b.to(k.dtype)
    n, m = a.sum(1), b.sum(1)
    k0 = k - torch.diag(torch.diag(k))
    xx = ((a @ k0) * a).sum(1) / (n * (n - 1))
    yy = ((b @ k0) * b).sum(1) / (m * (m - 1))
    xy = ((a @ k) * b).sum(1) / (n * m)
    return xx + yy - 2 * xy


def mmd_test(reference: torch.Tensor, window: torch.Tensor, bandwidth: float, permutations: int,
             generator: torch.Generator) -> tuple[float, float]:
    """(unbiased MMD^2, permutation p-value) of window against reference under an RBF kernel."""
    pooled = torch.cat([reference, window]).double()
    k = kernel(pooled, bandwidth)
    n = len(reference)
    observed = torch.zeros(1, len(pooled), dtype=torch.float64)
    observed[0, :n] = 1
    value = float(mmd2_splits(k, observed)[0])
    perm = torch.argsort(torch.rand(permutations, len(pooled), generator=generator), dim=1)
    assign = (perm < n).double()
    null = mmd2_splits(k, assign)
    return value, float((1 + (null >= value).sum()) / (1 + permutations))


# ---------------------------------------------------------------------------------- domain classifier


def _fit_predict(x: torch.Tensor, y: torch.Tensor, test: torch.Tensor, l2: float = 1e-2) -> torch.Tensor:
    w = torch.zeros(x.shape[1], dtype=x.dtype, requires_grad=True)
    b = torch.zeros(1, dtype=x.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return test @ w + b


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve, from ranks (Mann-Whitney's U over n1 * n2)."""
    ranks = sps.rankdata(scores)
    pos = labels == 1
    n1, n0 = int(pos.sum()), int((~pos).sum())
    return float((ranks[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def domain_auc(reference: torch.Tensor, window: torch.Tensor, folds: int = 5, seed: int = 0) -> tuple[float, float]:
    """(cross-validated AUC of a logistic regression telling window (1) from reference (0), the mean over
    the folds, and the one-sided p-value that it is above 0.5 by Mann-Whitney's normal approximation)."""
    x = torch.cat([reference, window]).double()
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    y = torch.cat([torch.zeros(len(reference)), torch.ones(len(window))]).double()
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    aucs = []
    for f in range(folds):  # each fold's AUC from its own model's scores (scores of two models do not compare)
        test = order[f::folds]
        train = torch.cat([order[g::folds] for g in range(folds) if g != f])
        aucs.append(auc(_fit_predict(x[train], y[train], x[test]).numpy(), y[test].numpy()))
    value = float(np.mean(aucs))
    n1, n0 = len(window), len(reference)
    sd = math.sqrt((n1 + n0 + 1) / (12 * n1 * n0))  # the mean of the folds' AUCs: about the pooled one's spread
    return value, float(sps.norm.sf((value - 0.5) / sd))


def auc_threshold(n_reference: int, n_window: int, false_alarm_rate: float) -> float:
    """The AUC a classifier of two same-distribution samples passes with probability false_alarm_rate
    (the Mann-Whitney null: normal, mean 0.5, sd sqrt((n1 + n0 + 1) / (12 n1 n0)))."""
    sd = math.sqrt((n_reference + n_window + 1) / (12 * n_reference * n_window))
    return 0.5 + float(sps.norm.isf(false_alarm_rate)) * sd
