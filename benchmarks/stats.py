"""Aggregate statistics as in rliable (Agarwal et al. 2021): interquartile mean and stratified bootstrap CIs."""

from __future__ import annotations

import numpy as np


def iqm(x: np.ndarray) -> float:
    """Interquartile mean: the mean of the middle 50% of the scores (rliable's trimmed mean, 25% each side).

    Scores are sorted and each one weighted by how much of it lies inside the quantile range
    [n/4, 3n/4], so that n need not be a multiple of 4 (as scipy.stats.trim_mean would round).
    """
    x = np.sort(np.asarray(x, np.float64).ravel())
    n = len(x)
    if n == 0:
        return float("nan")
    lo, hi = n / 4, 3 * n / 4
    w = np.clip(np.minimum(np.arange(1, n + 1), hi) - np.maximum(np.arange(n), lo), 0, 1)
    return float((w * x).sum() / w.sum())


def stratified_bootstrap_ci(scores: list[np.ndarray], stat=iqm, reps: int = 2000, alpha: float = 0.05,
                            seed: int = 0) -> tuple[float, float, float]:
    """Point estimate and (1 - alpha) percentile CI of `stat` over all runs pooled.

    `scores` holds one array of run scores (seeds) per task; each bootstrap replicate resamples
    the runs within every task with replacement (rliable's stratified bootstrap).
    """
    rng = np.random.default_rng(seed)
    point = stat(np.concatenate(scores))
    reps_out = np.empty(reps)
    for r in range(reps):
        reps_out[r] = stat(np.concatenate([s[rng.integers(0, len(s), len(s))] for s in scores]))
    lo, hi = np.percentile(reps_out, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return point, float(lo), float(hi)
