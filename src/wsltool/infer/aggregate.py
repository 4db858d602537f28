"""Slide-level scores from region scores (no torch)."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray


def topk_mean(region_probs: NDArray[np.floating], top_k: int) -> NDArray[np.float64]:
    """Slide class probabilities: per class, the mean of its ``top_k`` highest region probabilities, renormalised.

    For two classes this is "the mean malignant probability of the ``top_k`` most malignant regions"
    (and its complement), the aggregate Campanella et al. use; a single suspicious region is enough to
    raise the slide score, while one noisy region among thousands is damped by the mean.

    Parameters
    ----------
    region_probs
        ``(N, C)`` class probabilities of the N regions.
    top_k
        How many regions to average per class (all regions when fewer).

    Returns
    -------
    numpy.ndarray
        ``(C,)`` probabilities summing to 1 (uniform when there are no regions).
    """
    p = np.asarray(region_probs, dtype=np.float64)
    if p.ndim != 2:
        msg = f"region_probs must be (N, C), got shape {p.shape}"
        raise ValueError(msg)
    n, c = p.shape
    if n == 0:
        return np.full(c, 1.0 / c)
    k = max(1, min(top_k, n))
    top = -np.sort(-p, axis=0)[:k]
    s = top.mean(axis=0)
    if c == 2:
        # binary: the score of the positive class decides; keep it and its complement
        return np.array([1.0 - s[1], s[1]])
    return s / s.sum()
