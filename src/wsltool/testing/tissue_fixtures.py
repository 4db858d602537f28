"""Synthetic scenes with known tissue masks for tissue-detection tests and benchmarks.

* :func:`tissue_scene`: H&E-like tissue (:func:`wsltool.testing.he_tissue`) on white or grey glass, with
  an optional near-black scanner border and pen-ink strokes (blue, green, black) drawn over glass and
  tissue.  Ink is drawn like real ink, by multiplying the transmittance of the ink with what is under it,
  with a soft edge.  The known tissue mask excludes the border and the ink (ink over tissue is not tissue;
  see :mod:`wsltool.tissue`).
* gigapixel slides for benchmarks are written tile by tile by :func:`wsltool.testing.big.write_large_svs`.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage as ndi

from wsltool.testing.slides import he_tissue

__all__ = ["INK_TRANSMITTANCE", "TissueScene", "draw_ink", "tissue_scene"]

#: RGB transmittance of pen inks (the blue is measured over glass on a real biopsy overview with blue ink).
INK_TRANSMITTANCE: dict[str, tuple[float, float, float]] = {
    "blue": (0.136, 0.239, 0.527),
    "green": (0.22, 0.55, 0.32),
    "black": (0.10, 0.10, 0.12),
}


@dataclass
class TissueScene:
    """A synthetic overview with its ground truth.

    Attributes
    ----------
    rgb
        ``(H, W, 3)`` uint8.
    tissue
        Known tissue mask: stained tissue that is neither under ink nor under the border.
    ink
        Where ink was drawn (ink density at least one half).
    border
        Where the scanner border is.
    stained
        All the tissue, under ink and border included.
    """

    rgb: NDArray[np.uint8]
    tissue: NDArray[np.bool_]
    ink: NDArray[np.bool_]
    border: NDArray[np.bool_]
    stained: NDArray[np.bool_]


def draw_ink(
    rgb: NDArray[np.uint8],
    colour: str | tuple[float, float, float],
    *,
    seed: int = 0,
    n_strokes: int = 2,
    width_px: float = 24.0,
    through: Sequence[tuple[int, int]] = (),
) -> tuple[NDArray[np.uint8], NDArray[np.bool_]]:
    """Draw pen strokes (random polylines with a soft edge) over an image.

    Parameters
    ----------
    rgb
        ``(H, W, 3)`` uint8 image; not modified.
    colour
        A name of :data:`INK_TRANSMITTANCE` or an RGB transmittance in ``(0, 1]``.
    seed
        Random seed of the stroke paths.
    n_strokes
        Number of strokes.
    width_px
        Stroke width in pixels.
    through
        ``(row, col)`` points the strokes must pass through, one per stroke (the others are random).

    Returns
    -------
    tuple
        The inked image and the ink mask (density >= 0.5).
    """
    h, w = rgb.shape[:2]
    rng = np.random.default_rng(seed)
    t = np.asarray(INK_TRANSMITTANCE[colour] if isinstance(colour, str) else colour, np.float32)
    from skimage.draw import line

    centre = np.zeros((h, w), bool)
    for k in range(n_strokes):
        n_pts = 3
        pts = np.stack([rng.uniform(0, h - 1, n_pts), rng.uniform(0, w - 1, n_pts)], axis=1)
        if k < len(through):
            pts[1] = through[k]
        for (r0, c0), (r1, c1) in itertools.pairwise(pts):
            rr, cc = line(int(r0), int(c0), int(r1), int(c1))
            centre[rr, cc] = True
    dist = ndi.distance_transform_edt(~centre)
    alpha = np.clip(width_px / 2 + 0.5 - dist, 0.0, 1.0).astype(np.float32)
    # uneven pressure: density 0.85-1 along the stroke
    step = max(1, int(width_px))
    coarse = rng.uniform(-1, 1, (h // step + 2, w // step + 2)).astype(np.float32)
    noise = ndi.zoom(coarse, step, order=1)[:h, :w]
    alpha *= 0.925 + 0.075 * noise
    out = rgb.astype(np.float32) * (1.0 - alpha[..., None] * (1.0 - t))
    return np.clip(out + 0.5, 0, 255).astype(np.uint8), alpha >= 0.5


def tissue_scene(
    height: int,
    width: int,
    *,
    seed: int = 0,
    background: int | tuple[int, int, int] = 242,
    n_blobs: int = 3,
    border_px: int = 0,
    border_value: int = 22,
    inks: Sequence[str] = (),
    stroke_px: float | None = None,
) -> TissueScene:
    """H&E-like tissue with a known mask, on white or grey glass, with optional border and ink.

    Parameters
    ----------
    height, width
        Image size in pixels.
    seed
        Random seed (content and strokes).
    background
        Glass colour (grey level or RGB), e.g. 242 (white) or 208 (grey).
    n_blobs
        Number of tissue pieces.
    border_px
        Width of a near-black scanner border around the image (0: none).
    border_value
        Mean grey level of the border (it gets noise and a slight blue cast, like real borders).
    inks
        Pen colours to draw, one stroke each (names of :data:`INK_TRANSMITTANCE`); each stroke passes
        through tissue and usually over glass too.
    stroke_px
        Pen stroke width (default: 4% of the shorter side).

    Returns
    -------
    TissueScene
        Image and ground truth.
    """
    c = he_tissue(height, width, seed=seed, n_blobs=n_blobs, background=background)
    rgb = c.rgb
    rng = np.random.default_rng(seed + 1000)
    ink = np.zeros((height, width), bool)
    sw = stroke_px if stroke_px is not None else 0.04 * min(height, width)
    ty, tx = np.nonzero(c.tissue)
    for k, colour in enumerate(inks):
        through = [(int(ty[i]), int(tx[i])) for i in rng.integers(0, len(ty), 1)] if len(ty) else []
        rgb, m = draw_ink(rgb, colour, seed=seed * 31 + k, n_strokes=1, width_px=sw, through=through)
        ink |= m
    border = np.zeros((height, width), bool)
    if border_px > 0:
        b = border_px
        border[:b] = border[-b:] = True
        border[:, :b] = border[:, -b:] = True
        dark = rng.normal(border_value, 6, (height, width, 1)) + np.array([-3.0, -2.0, 6.0])
        rgb = np.where(border[..., None], np.clip(dark, 0, 255), rgb).astype(np.uint8)
    tissue = c.tissue & ~ink & ~border
    return TissueScene(rgb=rgb, tissue=tissue, ink=ink, border=border, stained=c.tissue)
