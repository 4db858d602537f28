"""WILDCAT head: class-wise pooling over M modalities and top-kmax + alpha * bottom-kmin spatial pooling.

Durand et al., "WILDCAT: Weakly Supervised Learning of Deep ConvNets for Image Classification, Pointwise
Localization and Segmentation", CVPR 2017.  Unlike the min-max authors' public code, the kmin term here
really counts (it is added to the score, not computed out of place and thrown away).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _count(k: float, n: int) -> int:
    """Number of positions for a fraction ``k`` (<= 1; 1.0 = all) or an absolute count ``k`` (> 1) of ``n``."""
    if k <= 0:
        return 0
    c = round(k * n) if k <= 1 else int(k)
    return max(1, min(n, c))


def wildcat_pool(
    maps: torch.Tensor,
    kmax: float,
    kmin: float = 0.0,
    alpha: float = 0.0,
    dropout: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """Spatial WILDCAT pooling of class maps.

    Parameters
    ----------
    maps
        Class maps ``(B, C, H, W)``.
    kmax, kmin
        Fraction (<= 1, 1.0 = all) or number (> 1) of the highest / lowest positions pooled.
    alpha
        Weight of the bottom-kmin mean.
    dropout
        Dropout probability on the sorted selected activations (training only).
    training
        Whether dropout applies.

    Returns
    -------
    torch.Tensor
        Scores ``(B, C)``: mean of the top kmax values + alpha * mean of the bottom kmin values.
    """
    b, c = maps.shape[:2]
    flat = maps.reshape(b, c, -1)
    n = flat.shape[-1]
    srt = flat.sort(dim=-1, descending=True).values
    top = srt[..., : _count(kmax, n)]
    if dropout > 0 and training:
        top = F.dropout(top, p=dropout, training=True)
    score = top.mean(dim=-1)
    nmin = _count(kmin, n)
    if alpha != 0 and nmin > 0:
        bottom = srt[..., n - nmin :]
        if dropout > 0 and training:
            bottom = F.dropout(bottom, p=dropout, training=True)
        score = score + alpha * bottom.mean(dim=-1)
    return score


class WildcatHead(nn.Module):
    """1x1 convolution to ``C * M`` maps, mean over the M modalities of each class, WILDCAT pooling.

    Parameters
    ----------
    in_channels
        Feature channels.
    num_classes
        C.
    modalities
        M (maps per class).
    kmax, kmin, alpha, dropout
        See :func:`wildcat_pool`.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        modalities: int = 5,
        kmax: float = 0.09,
        kmin: float = 0.09,
        alpha: float = 0.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.modalities = modalities
        self.kmax, self.kmin, self.alpha, self.dropout = kmax, kmin, alpha, dropout
        self.conv = nn.Conv2d(in_channels, num_classes * modalities, kernel_size=1)

    def class_maps(self, features: torch.Tensor) -> torch.Tensor:
        """Class maps ``(B, C, h, w)`` (mean over the M modalities of each class)."""
        m = self.conv(features)
        b, _, h, w = m.shape
        return m.view(b, self.num_classes, self.modalities, h, w).mean(dim=2)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(scores (B, C), class maps (B, C, h, w))``."""
        maps = self.class_maps(features)
        scores = wildcat_pool(maps, self.kmax, self.kmin, self.alpha, self.dropout, self.training)
        return scores, maps


class CamHead(nn.Module):
    """CAM head: global average pooling + linear layer; the class maps are the linear layer applied per position.

    Parameters
    ----------
    in_channels
        Feature channels.
    num_classes
        C.
    """

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(scores (B, C), class activation maps (B, C, h, w))``; scores = spatial mean of the maps."""
        maps = torch.einsum("bkhw,ck->bchw", features, self.fc.weight) + self.fc.bias.view(1, -1, 1, 1)
        return maps.mean(dim=(2, 3)), maps
