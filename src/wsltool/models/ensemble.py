"""Averaged localizations: seed ensembles and test-time augmentation, behind the same ``localize`` interface.

Both wrap models that have ``localize(x, size, autocast)`` (see :mod:`wsltool.models.minmax`) and return the
same dictionary, so inference, evaluation, the cohort runner and the napari plugin use them unchanged:

- ``probs``: the mean of the members' (or views') class probabilities;
- ``mplus``: the mean of the per-image normalised M+, normalised per image again;
- ``class_maps``: the mean of the class maps.

Why (README, "GlaS"): with 67 training images the seed decides much of the localization (pixel AUC 60.6-75.5
over eight seeds of the default, mean 70.7); four seeds averaged score 74.7 on average, and averaging the eight
dihedral views of each image adds 0.2-3.5 points per model (four seeds with both: 75.7).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from wsltool.models.minmax import normalize_per_image

#: Test-time augmentation modes: the (quarter turns, horizontal flip) views averaged by each.
TTA_VIEWS: dict[str, tuple[tuple[int, bool], ...]] = {
    "none": ((0, False),),
    "flips": ((0, False), (0, True), (2, False), (2, True)),  # identity, h-flip, 180 degrees, v-flip
    "d4": tuple((k, f) for k in range(4) for f in (False, True)),  # the 8 symmetries of the square
}


def average_outputs(outs: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Average several ``localize`` outputs of the same batch (probabilities, M+ renormalised, class maps).

    Parameters
    ----------
    outs
        ``localize`` outputs with equal shapes.

    Returns
    -------
    dict
        ``probs`` (B, C), ``mplus`` (B, h, w) in [0, 1] per image, ``class_maps`` (B, C, h, w).
    """
    if len(outs) == 1:
        return dict(outs[0])
    n = float(len(outs))
    probs = torch.stack([o["probs"].float() for o in outs]).sum(0) / n
    mplus = torch.stack([o["mplus"].float() for o in outs]).sum(0) / n
    cmaps = torch.stack([o["class_maps"].float() for o in outs]).sum(0) / n
    return {"probs": probs, "mplus": normalize_per_image(mplus), "class_maps": cmaps}


class Ensemble(nn.Module):
    """Several trained models whose localizations are averaged (e.g. the same recipe with different seeds).

    Parameters
    ----------
    members
        Models with ``localize``; they must share the class list (checked where checkpoints are combined).
    """

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        if not members:
            msg = "an ensemble needs at least one member"
            raise ValueError(msg)
        self.members = nn.ModuleList(members)

    @property
    def cfg(self) -> Any:
        """The first member's ModelConfig (threshold, method, ...)."""
        return self.members[0].cfg

    def localize(self, x: torch.Tensor, size: tuple[int, int] | None = None, **kwargs: Any) -> dict[str, torch.Tensor]:
        """The members' ``localize`` outputs averaged (see :func:`average_outputs`); ``kwargs`` go to each."""
        members: list[Any] = list(self.members)
        return average_outputs([m.localize(x, size=size, **kwargs) for m in members])


class TestTimeAugmentation(nn.Module):
    """Average a model's localization over flipped / rotated views of each input, mapped back.

    Parameters
    ----------
    model
        A model with ``localize``.
    mode
        ``"flips"`` (4 views: identity, horizontal and vertical flips, 180 degrees) or ``"d4"`` (8 views: every
        quarter turn, with and without a flip); ``"none"`` is the model alone.  Cost: that many forward passes.
    """

    __test__ = False  # not a pytest test class despite its name

    def __init__(self, model: nn.Module, mode: str = "d4") -> None:
        super().__init__()
        if mode not in TTA_VIEWS:
            msg = f"test-time augmentation must be one of {sorted(TTA_VIEWS)}, got {mode!r}"
            raise ValueError(msg)
        self.model = model
        self.mode = mode

    @property
    def cfg(self) -> Any:
        """The wrapped model's ModelConfig."""
        return self.model.cfg

    def localize(self, x: torch.Tensor, size: tuple[int, int] | None = None, **kwargs: Any) -> dict[str, torch.Tensor]:
        """``localize`` on every view (``kwargs`` passed on); the maps are turned back before averaging."""
        if size is None:
            size = (int(x.shape[-2]), int(x.shape[-1]))
        model: Any = self.model
        outs = []
        for k, flip in TTA_VIEWS[self.mode]:
            xv = torch.rot90(x, k, dims=(-2, -1)) if k else x
            if flip:
                xv = xv.flip(-1)
            sv = (size[1], size[0]) if k % 2 else size
            o = model.localize(xv, size=sv, **kwargs)
            back: dict[str, torch.Tensor] = {"probs": o["probs"]}
            for key in ("mplus", "class_maps"):
                m = o[key].flip(-1) if flip else o[key]
                back[key] = torch.rot90(m, -k, dims=(-2, -1)) if k else m
            outs.append(back)
        return average_outputs(outs)


def with_tta(model: Any, mode: str = "none") -> Any:
    """``model`` wrapped in :class:`TestTimeAugmentation` (``mode`` ``"none"``: the model itself)."""
    return model if mode == "none" else TestTimeAugmentation(model, mode)
