"""Tissue detection on a low-resolution overview of a slide, robust to background, borders and pen ink.

The method works on an RGB overview at a few microns per pixel (default 8 um/px) and needs no per-slide
tuning; every size is given in micrometres, so the same defaults hold at any resolution.

Method (:func:`tissue_mask_rgb`)
-------------------------------
1. **Smooth and white-balance.**  The image is smoothed with a Gaussian of ``smooth_um`` (2 um, at least
   one pixel) and scaled, channel by channel, so that the glass colour (the median of the bright, neutral
   pixels) becomes neutral grey 240: white, grey (e.g. 200-215) and tinted backgrounds all look alike.
2. **Colour features.**  Chroma ``C = max(R, G, B) - min(R, G, B)`` (0-255), HSV saturation ``C / max`` and
   HSV hue.  Glass, dust, shadows and scanner borders are neutral (low ``C``); haematoxylin and eosin are
   both chromatic and lie in the pink-purple-red hue range (green is the weakest channel: hue 240-360 deg,
   up to ~60 deg for red cells and brown pigment).
3. **Chromatic pixels.**  ``C >= t`` where ``t`` is Otsu's threshold of the chroma histogram, clamped to
   ``chroma_range`` (default 12-25): Otsu adapts to faint or strong staining, the clamp keeps it from
   chasing noise on an empty slide or from cutting pale tissue on a heavily stained one.
4. **Artefacts (pen ink, black borders).**
   * coloured ink: chromatic pixels whose hue is outside H&E, in ``ink_hue_range`` (60-240 deg: yellow,
     green, cyan, blue);
   * black ink, dark slide edges and scanner borders: pixels darker than ``dark_value`` (max channel < 40),
     or dark (max channel < ``black_value`` = 130) and unsaturated (saturation < ``black_saturation`` =
     0.25; dense haematoxylin is dark but saturated, >= 0.35 in the slides we measured).
   Artefact components smaller than ``min_artefact_um2`` (2,000 um^2) are dropped (isolated dark-blue
   nuclei are not ink).  Ink over pink tissue mixes into blue-purple, the hue of dense haematoxylin, so
   saturated (>= 0.4) pixels with a hue up to ``ink_blend_hue`` (255 deg) count as ink only when they are
   connected to ink or black (hysteresis; this also takes dark borders with a blue cast).  Artefacts are
   grown by ``artefact_margin_um`` (16 um) to take the ink's soft edge.
5. **Tissue.**  Chromatic pixels that are not artefacts; morphological closing with a disk of
   ``closing_um`` (24 um) joins fragmented tissue; holes smaller than ``max_hole_um2`` (50,000 um^2, e.g.
   gland lumina and fat cells) are filled; artefacts are removed again (ink is never tissue, see below);
   objects smaller than ``min_tissue_um2`` (10,000 um^2, about a 110 um disc) are dropped.

**Ink drawn over tissue is not tissue**: the ink hides the stain and a model reading that region sees ink,
so pixels covered by ink (a stroke crossing tissue included) are excluded from the mask; the tissue on either
side of a stroke is kept.  Thin, faint ink whose colour has mixed with the tissue under it into a
pink-purple hue cannot be told from stain and stays in the mask.  Red ink is indistinguishable from eosin
by colour and is not rejected.

Limitations: a haematoxylin so blue that large areas of tissue have a hue below 240 deg at low resolution
(rare; dense nuclei measured 240-300 deg, eosin 300-350 deg) would be taken for blue ink; pass
``exclude_ink=False`` for such stains, and for stains other than H&E.

:func:`detect_tissue` reads a slide at ``mpp`` (8 um/px by default) and returns a :class:`TissueMask`,
which knows its own mpp and answers tissue fractions of level-0 boxes in constant time (summed-area table).
This module imports neither torch nor Qt.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import ndimage as ndi

from wsltool.errors import DataError

if TYPE_CHECKING:
    from wsltool.slide.base import Slide

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_MPP", "TissueMask", "detect_tissue", "tissue_mask_rgb"]

#: Default resolution (um/px) of tissue detection, and the resolution assumed by
#: :func:`tissue_mask_rgb` when it is given no ``mpp``.
DEFAULT_MPP = 8.0
#: Grey level the glass is mapped to by the white balance.
_GLASS = 240.0
_STRIPE_PX = 1 << 20  # overview pixels per stripe of the pixel-wise pass (bounds its float working set)


def _disk_radius(um: float, mpp: float) -> float:
    return max(0.0, um / mpp)


def _area_px(um2: float, mpp: float) -> int:
    return max(0, math.ceil(um2 / (mpp * mpp)))


def _drop_small(mask: NDArray[np.bool_], min_px: int) -> NDArray[np.bool_]:
    """Remove 8-connected components with fewer than ``min_px`` pixels."""
    if min_px <= 1 or not mask.any():
        return mask
    labels, n = ndi.label(mask, structure=np.ones((3, 3), bool))
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes >= min_px
    keep[0] = False
    return keep[labels]


def _fill_small_holes(mask: NDArray[np.bool_], max_px: int) -> NDArray[np.bool_]:
    """Fill 4-connected holes (background not connected to the image border) of at most ``max_px`` pixels."""
    if max_px <= 0 or not mask.any():
        return mask
    holes = ndi.binary_fill_holes(mask) & ~mask
    if not holes.any():
        return mask
    labels, n = ndi.label(holes)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    small = sizes <= max_px
    small[0] = False
    return mask | small[labels]


def _reconstruct(seed: NDArray[np.bool_], allowed: NDArray[np.bool_]) -> NDArray[np.bool_]:
    """``seed`` plus the 8-connected components of ``allowed`` that touch it (hysteresis)."""
    if not seed.any() or not allowed.any():
        return seed
    labels, n = ndi.label(seed | allowed, structure=np.ones((3, 3), bool))
    hit = np.zeros(n + 1, bool)
    hit[labels[seed]] = True
    hit[0] = False
    return hit[labels]


def _disk(radius: float) -> NDArray[np.bool_]:
    k = int(math.floor(radius))
    yy, xx = np.mgrid[-k : k + 1, -k : k + 1]
    return np.asarray(yy * yy + xx * xx <= radius * radius)


#: Above this radius (px) morphology uses distance transforms instead of a structuring element.
_EDT_RADIUS = 6.0


def _dilate(mask: NDArray[np.bool_], radius: float) -> NDArray[np.bool_]:
    """Dilate by a Euclidean disk of ``radius`` pixels."""
    if radius < 1.0 or not mask.any():
        return mask
    if radius <= _EDT_RADIUS:
        return np.asarray(ndi.binary_dilation(mask, structure=_disk(radius)))
    return np.asarray(ndi.distance_transform_edt(~mask) <= radius)


def _erode(mask: NDArray[np.bool_], radius: float) -> NDArray[np.bool_]:
    """Erode by a Euclidean disk of ``radius`` pixels (outside the image counts as foreground)."""
    if radius <= _EDT_RADIUS:
        return np.asarray(ndi.binary_erosion(mask, structure=_disk(radius), border_value=1))
    return np.asarray(ndi.distance_transform_edt(mask) > radius)


def _close(mask: NDArray[np.bool_], radius: float) -> NDArray[np.bool_]:
    """Closing by a Euclidean disk; the image is padded so that the border does not erode tissue."""
    if radius < 1.0 or not mask.any():
        return mask
    p = math.ceil(radius) + 1
    closed = _erode(_dilate(np.pad(mask, p), radius), radius)
    return np.asarray(closed[p:-p, p:-p] | mask)


def _glass_colour(
    r: NDArray[np.float32], g: NDArray[np.float32], b: NDArray[np.float32], k: int | None = None
) -> NDArray[np.float32]:
    """Median colour of bright neutral pixels (the glass); white when there are too few of them."""
    if k is None:
        k = max(1, math.isqrt(r.size // 250_000))  # a regular subsample of ~250k pixels is plenty
    r, g, b = r[::k, ::k], g[::k, ::k], b[::k, ::k]
    vmax = np.maximum(np.maximum(r, g), b)
    sel = (vmax - np.minimum(np.minimum(r, g), b) < 10) & (vmax > 150)
    if sel.sum() < max(50, 0.005 * sel.size):
        return np.full(3, _GLASS, np.float32)
    return np.array([np.median(ch[sel]) for ch in (r, g, b)], np.float32)


def _otsu(values: NDArray[np.float32]) -> float:
    from skimage.filters import threshold_otsu

    if values.size == 0 or float(values.max() - values.min()) < 1e-3:
        return math.inf
    return float(threshold_otsu(values, nbins=256))


def tissue_mask_rgb(
    rgb: ArrayLike,
    *,
    mpp: float | None = None,
    chroma_threshold: float | None = None,
    chroma_range: tuple[float, float] = (12.0, 25.0),
    ink_hue_range: tuple[float, float] = (60.0, 240.0),
    ink_blend_hue: float = 255.0,
    ink_blend_saturation: float = 0.4,
    dark_value: float = 40.0,
    black_value: float = 130.0,
    black_saturation: float = 0.25,
    min_artefact_um2: float = 2_000.0,
    artefact_margin_um: float = 16.0,
    smooth_um: float = 2.0,
    closing_um: float = 24.0,
    max_hole_um2: float = 50_000.0,
    min_tissue_um2: float = 10_000.0,
    exclude_ink: bool = True,
) -> NDArray[np.bool_]:
    """Tissue mask of a low-resolution RGB overview of an H&E slide.

    See the module docstring for the method; the defaults need no per-slide tuning.

    Parameters
    ----------
    rgb
        ``(H, W, 3)`` uint8 RGB image (an alpha channel, if any, is ignored), typically 2-16 um/px.
    mpp
        Microns per pixel of ``rgb``; all sizes below are converted with it.  ``None`` assumes
        :data:`DEFAULT_MPP` (8 um/px).
    chroma_threshold
        Fixed chroma threshold (0-255); ``None`` uses Otsu's threshold clamped to ``chroma_range``.
    chroma_range
        Bounds of the automatic chroma threshold.
    ink_hue_range
        HSV hue interval (degrees, ``[lo, hi)``) of coloured pen ink; H&E lies outside it.
    ink_blend_hue, ink_blend_saturation
        Saturated pixels with a hue from ``ink_hue_range[0]`` up to ``ink_blend_hue`` (blue ink over pink
        tissue turns blue-purple) are ink when they are connected to ink or black areas.
    dark_value
        Pixels whose brightest channel is below this are black (ink, scanner border).
    black_value, black_saturation
        Pixels darker than ``black_value`` (brightest channel) and less saturated than
        ``black_saturation`` are black ink or slide edge.
    min_artefact_um2
        Ink/black components smaller than this are ignored (dense nuclei can look dark blue).
    artefact_margin_um
        Ink/black areas are grown by this much to take their soft edges.
    smooth_um
        Sigma of the Gaussian smoothing applied before the colour features (at least one pixel).
    closing_um
        Radius of the closing that joins tissue fragments.
    max_hole_um2
        Holes in the tissue up to this area are filled (lumina, fat); larger ones are kept as background.
    min_tissue_um2
        Tissue objects smaller than this are dropped (debris, dust).
    exclude_ink
        ``False`` skips step 4, the rejection of ink and black areas (for stains other than H&E); neutral
        borders and glass are still not tissue, since they are not chromatic.

    Returns
    -------
    numpy.ndarray
        ``(H, W)`` bool, True where tissue is.

    Raises
    ------
    DataError
        When ``rgb`` is not an ``(H, W, 3|4)`` image or ``mpp`` is not positive.
    """
    arr = np.asarray(rgb)
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4) or arr.shape[0] == 0 or arr.shape[1] == 0:
        msg = f"tissue detection needs an (H, W, 3) RGB image, got shape {arr.shape}"
        raise DataError(msg)
    res = DEFAULT_MPP if mpp is None else float(mpp)
    if not math.isfinite(res) or res <= 0:
        msg = f"mpp must be a positive number, got {mpp}"
        raise DataError(msg)
    scale = 255.0 if arr.dtype != np.uint8 and float(arr[..., :3].max()) <= 1.0 else 1.0
    sigma = max(1.0, smooth_um / res)
    # Pixel-wise work runs in row stripes (with a halo for the smoothing), so the float working set is a
    # few stripes rather than ~50 bytes per overview pixel; only 10 bytes per pixel are kept whole-image.
    # Results are identical to a whole-image pass: the halo covers the Gaussian's support.
    h_img, w_img = arr.shape[:2]
    halo = int(2.5 * sigma + 0.5) + 1
    step = max(64, _STRIPE_PX // max(1, w_img))

    def smoothed(y0: int, y1: int) -> tuple[NDArray[np.float32], ...]:
        a0, a1 = max(0, y0 - halo), min(h_img, y1 + halo)
        planes = []
        for c in range(3):
            ch = arr[a0:a1, :, c].astype(np.float32) * np.float32(scale)
            ch = ndi.gaussian_filter(ch, sigma, mode="nearest", truncate=2.5)
            planes.append(np.ascontiguousarray(ch[y0 - a0 : y0 - a0 + (y1 - y0)]))
        return tuple(planes)

    # 1. white balance on the glass colour (a regular subsample of the smoothed image)
    k = max(1, math.isqrt((h_img * w_img) // 250_000))
    sub = [np.empty(((h_img + k - 1) // k, (w_img + k - 1) // k), np.float32) for _ in range(3)]
    for y0 in range(0, h_img, step):
        y1 = min(h_img, y0 + step)
        first = -(-y0 // k) * k  # first subsampled row in this stripe
        if first >= y1:
            continue
        for dst, ch in zip(sub, smoothed(y0, y1), strict=True):
            dst[first // k : (y1 - 1) // k + 1] = ch[first - y0 :: k, ::k]
    glass = _glass_colour(sub[0], sub[1], sub[2], k=1)
    del sub
    gain = np.clip(_GLASS / np.maximum(glass, 1.0), 0.7, 1.6).astype(np.float32)

    # 2. colour features, stripe by stripe
    chroma = np.empty((h_img, w_img), np.float32)
    hue = np.empty((h_img, w_img), np.float32)  # HSV hue; used only where the pixel turns out chromatic
    dark = np.empty((h_img, w_img), bool)
    saturated = np.empty((h_img, w_img), bool)
    for y0 in range(0, h_img, step):
        y1 = min(h_img, y0 + step)
        r, g, b = smoothed(y0, y1)
        for ch, gk in zip((r, g, b), gain, strict=True):
            ch *= gk
            np.minimum(ch, np.float32(255.0), out=ch)
        vmax = np.maximum(np.maximum(r, g), b)
        c = vmax - np.minimum(np.minimum(r, g), b)
        sat = c / np.maximum(vmax, np.float32(1.0))
        chroma[y0:y1] = c
        dark[y0:y1] = (vmax < dark_value) | ((vmax < black_value) & (sat < black_saturation))
        saturated[y0:y1] = sat >= ink_blend_saturation
        hue[y0:y1] = _hue_degrees(r, g, b, vmax, c)

    # 3. chromatic threshold (Otsu on the chroma of non-dark pixels, clamped)
    if chroma_threshold is None:
        lo, hi = chroma_range
        thr = float(np.clip(_otsu(chroma[~dark]), lo, hi))
    else:
        thr = float(chroma_threshold)
    chromatic = chroma >= thr
    del chroma
    hue[~chromatic] = 0.0
    ink_hue = (hue >= ink_hue_range[0]) & (hue < ink_hue_range[1])

    # 4. artefacts: coloured ink and black (ink, borders, slide edges)
    if exclude_ink:
        min_px = _area_px(min_artefact_um2, res)
        artefact = _drop_small((chromatic & ink_hue) | dark, min_px)
        # ink over pink tissue (or a dark border with a colour cast) is blue-purple, like dense
        # haematoxylin: such pixels are artefact only when connected to ink or black
        weak = chromatic & (hue >= ink_hue_range[0]) & (hue < ink_blend_hue) & saturated
        artefact = _reconstruct(artefact, weak)
        artefact = _dilate(artefact, _disk_radius(artefact_margin_um, res))
    else:
        artefact = np.zeros(chromatic.shape, bool)

    # 5. tissue
    mask = chromatic & ~artefact
    mask = _close(mask, _disk_radius(closing_um, res))
    mask = _fill_small_holes(mask, _area_px(max_hole_um2, res))
    mask &= ~artefact
    mask = _drop_small(mask, _area_px(min_tissue_um2, res))
    log.debug(
        "tissue: glass %s, chroma threshold %.1f, artefacts %.2f%%, tissue %.2f%%",
        np.round(glass).astype(int).tolist(),
        thr,
        100 * artefact.mean(),
        100 * mask.mean(),
    )
    return np.ascontiguousarray(mask, dtype=bool)


def _hue_degrees(
    r: NDArray[np.float32],
    g: NDArray[np.float32],
    b: NDArray[np.float32],
    vmax: NDArray[np.float32],
    chroma: NDArray[np.float32],
) -> NDArray[np.float32]:
    """HSV hue in degrees ``[0, 360)`` (0 where the pixel is neutral), as :func:`skimage.color.rgb2hsv`."""
    c = np.where(chroma > 0, chroma, np.float32(1.0))
    h = np.where(vmax == b, 4.0 + (r - g) / c, 0.0)
    h = np.where(vmax == g, 2.0 + (b - r) / c, h)
    h = np.where(vmax == r, (g - b) / c, h)
    h = np.where(chroma > 0, (h / 6.0) % 1.0, 0.0)
    return (h * 360.0).astype(np.float32)


@dataclass(frozen=True, eq=False)
class TissueMask:
    """A tissue mask with its resolution, answering tissue fractions of level-0 boxes.

    Pixel ``(row, col)`` of :attr:`mask` covers the level-0 box
    ``[col * s, (col + 1) * s) x [row * s, (row + 1) * s)`` with ``s = mpp / base_mpp``; fractions are
    exact area-weighted fractions of such pixels (bilinear interpolation of a summed-area table), and
    anything outside the mask counts as background.

    Parameters
    ----------
    mask
        ``(H, W)`` bool, True where tissue is (stored read-only).
    mpp
        Microns per pixel of ``mask``.
    slide_dimensions
        Level-0 ``(width, height)`` of the slide, when known.
    base_mpp
        Level-0 microns per pixel of the slide, when known.
    source
        Name of the slide (for messages and provenance).
    """

    mask: NDArray[np.bool_]
    mpp: float
    slide_dimensions: tuple[int, int] | None = None
    base_mpp: float | None = None
    source: str | None = None
    _sat: NDArray[np.int64] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        m = np.asarray(self.mask)
        if m.ndim != 2:
            msg = f"a tissue mask must be 2-D, got shape {m.shape}"
            raise DataError(msg)
        if not (math.isfinite(self.mpp) and self.mpp > 0):
            msg = f"tissue mask mpp must be positive, got {self.mpp}"
            raise DataError(msg)
        m = np.array(m, dtype=bool, copy=True)
        m.flags.writeable = False
        object.__setattr__(self, "mask", m)
        object.__setattr__(self, "mpp", float(self.mpp))
        dtype = np.int32 if m.size < 2**31 - 1 else np.int64
        sat = np.zeros((m.shape[0] + 1, m.shape[1] + 1), dtype)
        np.cumsum(m, axis=0, dtype=dtype, out=sat[1:, 1:])
        np.cumsum(sat[1:, 1:], axis=1, dtype=dtype, out=sat[1:, 1:])
        sat.flags.writeable = False
        object.__setattr__(self, "_sat", sat)

    def __repr__(self) -> str:
        h, w = self.shape
        return (
            f"TissueMask({w}x{h} px at {self.mpp:g} um/px, {100 * self.fraction:.1f}% tissue, "
            f"{self.area_mm2:.2f} mm^2, source={self.source!r})"
        )

    @property
    def shape(self) -> tuple[int, int]:
        """``(height, width)`` of the mask in pixels."""
        h, w = self.mask.shape
        return int(h), int(w)

    @property
    def empty(self) -> bool:
        """True when no tissue was found."""
        return not bool(self._sat[-1, -1])

    @property
    def tissue_pixels(self) -> int:
        """Number of tissue pixels in the mask."""
        return int(self._sat[-1, -1])

    @property
    def area_mm2(self) -> float:
        """Tissue area in square millimetres."""
        return self.tissue_pixels * (self.mpp / 1000.0) ** 2

    @property
    def fraction(self) -> float:
        """Tissue fraction of the slide (of the level-0 area when the slide size is known, else of the mask)."""
        if self.slide_dimensions is not None and self.base_mpp is not None:
            w, h = self.slide_dimensions
            return self.fraction_in(0, 0, w, h, self.base_mpp)
        return self.tissue_pixels / max(1, self.mask.size)

    def _integral(self, x: float, y: float) -> float:
        """Tissue area (in mask pixels) of ``[0, x) x [0, y)`` in mask coordinates."""
        h, w = self.mask.shape
        x = min(max(x, 0.0), float(w))
        y = min(max(y, 0.0), float(h))
        i = min(int(x), w - 1) if w else 0
        j = min(int(y), h - 1) if h else 0
        fx, fy = x - i, y - j
        s = self._sat
        s00, s01 = float(s[j, i]), float(s[j, i + 1])
        s10, s11 = float(s[j + 1, i]), float(s[j + 1, i + 1])
        return (s00 * (1 - fx) + s01 * fx) * (1 - fy) + (s10 * (1 - fx) + s11 * fx) * fy

    def fraction_in(self, x0: float, y0: float, x1: float, y1: float, base_mpp: float) -> float:
        """Tissue fraction inside a box given in level-0 pixels.

        Parameters
        ----------
        x0, y0, x1, y1
            The box ``[x0, x1) x [y0, y1)`` in level-0 pixels of a slide whose level 0 has ``base_mpp``.
        base_mpp
            Level-0 microns per pixel.

        Returns
        -------
        float
            Area-weighted tissue fraction in ``[0, 1]``; parts of the box outside the mask count as
            background, and an empty box gives 0.
        """
        s = base_mpp / self.mpp
        ax0, ay0, ax1, ay1 = x0 * s, y0 * s, x1 * s, y1 * s
        area = (ax1 - ax0) * (ay1 - ay0)
        if area <= 0:
            return 0.0
        t = self._integral(ax1, ay1) - self._integral(ax0, ay1) - self._integral(ax1, ay0) + self._integral(ax0, ay0)
        return min(max(t / area, 0.0), 1.0)

    def fractions_in(self, boxes: ArrayLike, base_mpp: float) -> NDArray[np.float64]:
        """Vectorised :meth:`fraction_in` for an ``(N, 4)`` array of ``x0, y0, x1, y1`` level-0 boxes."""
        b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4) * (base_mpp / self.mpp)
        h, w = self.mask.shape
        sat = self._sat

        def integral(x: NDArray[np.float64], y: NDArray[np.float64]) -> NDArray[np.float64]:
            x = np.clip(x, 0.0, w)
            y = np.clip(y, 0.0, h)
            i = np.minimum(x.astype(np.int64), w - 1)
            j = np.minimum(y.astype(np.int64), h - 1)
            fx, fy = x - i, y - j
            top = sat[j, i] * (1 - fx) + sat[j, i + 1] * fx
            bottom = sat[j + 1, i] * (1 - fx) + sat[j + 1, i + 1] * fx
            return np.asarray(top * (1 - fy) + bottom * fy, dtype=np.float64)

        x0, y0, x1, y1 = b.T
        area = (x1 - x0) * (y1 - y0)
        t = integral(x1, y1) - integral(x0, y1) - integral(x1, y0) + integral(x0, y0)
        out = np.zeros(len(b), np.float64)
        ok = area > 0
        out[ok] = np.clip(t[ok] / area[ok], 0.0, 1.0)
        return out


def detect_tissue(slide: Slide, mpp: float = DEFAULT_MPP, **kwargs: Any) -> TissueMask:
    """Detect tissue on a slide at low resolution.

    Parameters
    ----------
    slide
        An opened slide (:func:`wsltool.slide.open_slide`); it needs a usable mpp (or an override).
    mpp
        Resolution of the detection in um/px (default 8); a slide coarser than that is used at its own mpp.
    **kwargs
        Passed to :func:`tissue_mask_rgb` (thresholds and sizes in micrometres).

    Returns
    -------
    TissueMask
        The mask at its own mpp, with the slide's level-0 size and mpp.  A slide without tissue gives an
        empty mask and a logged warning naming the slide.

    Raises
    ------
    MppError
        When the slide has no usable mpp.
    """
    base = slide.mpp
    res = max(float(mpp), base)
    rgb = slide.read_at_mpp(res)
    mask = tissue_mask_rgb(rgb, mpp=res, **kwargs)
    tm = TissueMask(mask=mask, mpp=res, slide_dimensions=slide.dimensions, base_mpp=base, source=str(slide.path))
    if tm.empty:
        log.warning("%s: no tissue detected (at %g um/px); the slide looks empty", slide.path, res)
    else:
        log.debug("%s: %.1f%% tissue, %.2f mm^2", slide.path, 100 * tm.fraction, tm.area_mm2)
    return tm
