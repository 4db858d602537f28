"""Loss terms of the min-max entropy model (method.md, "Losses").

- ``L_loc``: cross-entropy of the localizer scores with the image label;
- ``L_pos``: cross-entropy of the classifier on X+ (min entropy on the relevant region);
- ``L_neg``: cross-entropy of the classifier on X- to the uniform distribution (max entropy);
- optional size terms through the extended log-barrier (Kervadec et al. 2019, used by the TMI follow-up).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def ce_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``logits (B, C)`` with integer labels ``y (B,)``."""
    return F.cross_entropy(logits.float(), y)


def uniform_ce_loss(logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy to the uniform distribution: mean over classes and samples of ``-log softmax``.

    Minimising it maximises the entropy of the prediction; its minimum, ``log C``, is reached by a
    uniform prediction.
    """
    return -F.log_softmax(logits.float(), dim=1).mean()


def log_barrier(z: torch.Tensor, t: float) -> torch.Tensor:
    """Extended log-barrier for a constraint ``z <= 0``.

    ``-(1/t) log(-z)`` when ``z <= -1/t**2``, else the linear extension
    ``t z - (1/t) log(1/t**2) + 1/t`` (continuous, with a continuous derivative).
    """
    thr = -1.0 / t**2
    inside = -torch.log((-z).clamp_min(1.0 / t**2)) / t
    outside = t * z - math.log(1.0 / t**2) / t + 1.0 / t
    return torch.where(z <= thr, inside, outside)


def size_loss(
    mask: torch.Tensor, t: float, mode: str = "absolute", area_min: float = 0.0, area_max: float = 1.0
) -> torch.Tensor:
    """Size prior on a soft mask through the extended log-barrier, averaged over the batch.

    Parameters
    ----------
    mask
        Soft mask ``(B, 1, H, W)`` or ``(B, H, W)`` in [0, 1].
    t
        Barrier parameter (grows during training).
    mode
        ``"absolute"`` (TMI: both regions non-empty, constraints ``-s+ <= 0`` and ``-s- <= 0`` with ``s``
        the area fractions of m and 1 - m: TMI's sums divided by the pixel count, the same gradient wherever
        the log branch applies; see ``ModelConfig.size_prior``), ``"range"`` (the area fraction of m kept in
        ``[area_min, area_max]`` in every image) or ``"batch_range"`` (the batch's mean area in
        ``[area_min, area_max]``, each image only non-empty and non-full as ``"absolute"``: a prior on the
        data set's area that lets a crop with few or many glands have a small or large mask).
    area_min, area_max
        Bounds of ``"range"`` and ``"batch_range"``.

    Returns
    -------
    torch.Tensor
        Scalar loss.
    """
    a = mask.float().flatten(1).mean(dim=1)
    if mode == "range":
        return (log_barrier(a - area_max, t) + log_barrier(area_min - a, t)).mean()
    nonempty = (log_barrier(-a, t) + log_barrier(-(1 - a), t)).mean()
    if mode == "absolute":
        return nonempty
    if mode == "batch_range":
        m = a.mean()
        return nonempty + log_barrier(m - area_max, t) + log_barrier(area_min - m, t)
    msg = f"unknown size prior mode {mode!r}"
    raise ValueError(msg)
