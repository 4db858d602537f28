"""Recursive erasing (training only), exactly as method.md describes it.

Per minibatch: history ``h = 1``, accumulated mask ``A = 0``.  For ``t = 0 .. u-1`` while any ``h > 0``:
run the localizer on the current (partly erased) X -> mask ``m_t`` and scores; its cross-entropy counts in
the loss (gradients accumulate over passes);
``trust_i = exp(-t / sigma_e) * [correct] * [loss_t <= loss_0] * p_max``; ``h_i = min(h_i, [correct])``;
``trust_i *= h_i``; ``A = max(A, trust * m_t)``; ``X_i <- X_i * (1 - A_i)`` where ``trust_i > 0``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class ErasingResult:
    """What :func:`recursive_erase` returns.

    Attributes
    ----------
    accumulated
        ``A``: ``(B, 1, H, W)``, the pixel-wise max of ``trust_t * m_t`` over the passes.
    loc_losses
        Mean localizer cross-entropy of each pass (to be summed into the loss).
    trusts
        ``trust`` of each pass, ``(B,)`` each (detached).
    passes
        Number of passes run.
    first_scores
        Localizer scores of pass 0.
    """

    accumulated: torch.Tensor
    loc_losses: list[torch.Tensor] = field(default_factory=list)
    trusts: list[torch.Tensor] = field(default_factory=list)
    passes: int = 0
    first_scores: torch.Tensor | None = None


def recursive_erase(
    x: torch.Tensor,
    y: torch.Tensor,
    step: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    passes: int,
    sigma_e: float = 10.0,
) -> ErasingResult:
    """Run up to ``passes`` localizer passes with recursive erasing.

    Parameters
    ----------
    x
        Normalised images ``(B, 3, H, W)``.
    y
        Labels ``(B,)``.
    step
        ``step(x) -> (scores (B, C), mask (B, 1, H, W) in [0, 1])``: one localizer pass.
    passes
        u, the maximum number of passes (>= 1).
    sigma_e
        Decay of the trust with the pass index: ``exp(-t / sigma_e)``.

    Returns
    -------
    ErasingResult
        ``A`` keeps the gradient of the masks (when ``step`` gives masks with one); the erased inputs
        of later passes do not carry gradient back through ``A``.
    """
    b = x.shape[0]
    hist = torch.ones(b, device=x.device)
    acc: torch.Tensor | None = None
    res = ErasingResult(accumulated=torch.zeros(0))
    loss0: torch.Tensor | None = None
    cur = x
    for t in range(max(1, passes)):
        if not bool((hist > 0).any()):
            break
        scores, m = step(cur)
        losses = F.cross_entropy(scores.float(), y, reduction="none")
        res.loc_losses.append(losses.mean())
        with torch.no_grad():
            prob = scores.float().softmax(dim=1)
            pmax, pred = prob.max(dim=1)
            correct = (pred == y).float()
            if loss0 is None:
                loss0 = losses.detach()
                res.first_scores = scores
            not_worse = (losses.detach() <= loss0).float()
            trust = math.exp(-t / sigma_e) * correct * not_worse * pmax
            hist = torch.minimum(hist, correct)
            trust = trust * hist
        res.trusts.append(trust)
        tm = trust.view(-1, *([1] * (m.dim() - 1))).to(m.dtype) * m
        acc = tm if acc is None else torch.maximum(acc, tm)
        res.passes = t + 1
        erase = (trust > 0).view(-1, 1, 1, 1)
        cur = torch.where(erase, cur * (1 - acc.detach()), cur)
    assert acc is not None
    res.accumulated = acc
    return res
