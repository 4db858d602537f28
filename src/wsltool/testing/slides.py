"""Writers of real pyramidal slide files (Aperio SVS, generic tiled TIFF, OME-TIFF with SubIFDs).

The SVS layout follows what OpenSlide's Aperio detector requires: every pyramid level is a
top-level tiled page with ``subfiletype=0`` and page 0's description starts with
``Aperio Image Library`` and carries ``|MPP = ...``; page 1 is a stripped thumbnail.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

_HDR = "Aperio Image Library v12.0.15\r\n"


def downsample(img: NDArray[np.uint8], f: int) -> NDArray[np.uint8]:
    """Box-downsample an ``(H, W[, C])`` image by an integer factor (edges cropped)."""
    if f == 1:
        return img
    h, w = img.shape[0] // f * f, img.shape[1] // f * f
    a = img[:h, :w].astype(np.float32)
    shape = (h // f, f, w // f, f, *img.shape[2:])
    return (a.reshape(shape).mean(axis=(1, 3)) + 0.5).astype(img.dtype)


@dataclass
class SyntheticContent:
    """An RGB image with its ground-truth masks.

    Attributes
    ----------
    rgb
        ``(H, W, 3)`` uint8.
    tissue
        ``(H, W)`` bool, where tissue is.
    lesion
        ``(H, W)`` bool, where the "malignant" texture is (all False for benign content).
    """

    rgb: NDArray[np.uint8]
    tissue: NDArray[np.bool_]
    lesion: NDArray[np.bool_]


def _blobs(h: int, w: int, rng: np.random.Generator, n: int, scale: float) -> NDArray[np.bool_]:
    """A mask of ``n`` smooth random blobs whose radius is about ``scale`` pixels."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    mask = np.zeros((h, w), bool)
    for _ in range(n):
        cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
        ry, rx = scale * rng.uniform(0.7, 1.3), scale * rng.uniform(0.7, 1.3)
        ang = rng.uniform(0, np.pi)
        dy, dx = yy - cy, xx - cx
        u = (dx * np.cos(ang) + dy * np.sin(ang)) / rx
        v = (-dx * np.sin(ang) + dy * np.cos(ang)) / ry
        theta = np.arctan2(v, u)
        wobble = 1 + 0.15 * np.sin(3 * theta + rng.uniform(0, 6.28)) + 0.08 * np.sin(5 * theta)
        mask |= (u * u + v * v) < wobble**2
    return mask


def he_tissue(
    height: int,
    width: int,
    *,
    seed: int = 0,
    n_blobs: int = 3,
    blob_scale: float | None = None,
    lesion_fraction: float = 0.0,
    background: int | tuple[int, int, int] = 242,
) -> SyntheticContent:
    """H&E-like synthetic tissue on a glass background, with optional "malignant" lesions.

    Benign tissue is pink stroma with regularly spaced round, evenly sized purple nuclei; lesions are
    crowded, larger, darker and irregular nuclei (a texture and colour a model can learn). All
    randomness comes from ``seed``.

    Parameters
    ----------
    height, width
        Image size in pixels.
    seed
        Random seed; the same seed gives the same image.
    n_blobs
        Number of tissue pieces.
    blob_scale
        Typical radius of a tissue piece in pixels (default: 0.22 x the shorter side).
    lesion_fraction
        Approximate fraction of the tissue covered by lesions (0 for a benign slide).
    background
        Glass colour (grey level or RGB).

    Returns
    -------
    SyntheticContent
        Image and masks.
    """
    rng = np.random.default_rng(seed)
    scale = blob_scale if blob_scale is not None else 0.22 * min(height, width)
    tissue = _blobs(height, width, rng, n_blobs, scale)
    bg = np.array(background if isinstance(background, tuple) else (background,) * 3, np.float32)
    img = np.empty((height, width, 3), np.float32)
    img[:] = bg
    # stroma: pink with low-frequency variation
    noise = rng.normal(0, 1, (height // 16 + 2, width // 16 + 2)).astype(np.float32)
    from PIL import Image

    low = np.asarray(Image.fromarray(noise).resize((width, height), Image.Resampling.BICUBIC))
    stroma = np.stack([225 + 8 * low, 150 + 10 * low, 190 + 8 * low], axis=-1)
    img[tissue] = stroma[tissue]
    lesion = np.zeros((height, width), bool)
    if lesion_fraction > 0:
        t_area = tissue.sum()
        target = lesion_fraction * t_area
        tries = 0
        while lesion.sum() < target and tries < 50:
            tries += 1
            ys, xs = np.nonzero(tissue)
            i = rng.integers(len(ys))
            r = np.sqrt(max(target - lesion.sum(), target * 0.3) / np.pi) * rng.uniform(0.7, 1.0)
            yy, xx = np.ogrid[0:height, 0:width]
            lesion |= ((yy - ys[i]) ** 2 + (xx - xs[i]) ** 2 < r * r) & tissue
    # nuclei
    yy, xx = np.mgrid[0:height, 0:width]

    def stamp(
        mask_region: NDArray[np.bool_],
        spacing: float,
        radius: tuple[float, float],
        color: tuple[float, float, float],
        jitter: float,
    ) -> None:
        gy = np.arange(spacing / 2, height, spacing)
        gx = np.arange(spacing / 2, width, spacing)
        cy, cx = np.meshgrid(gy, gx, indexing="ij")
        cy = cy + rng.uniform(-jitter, jitter, cy.shape) * spacing
        cx = cx + rng.uniform(-jitter, jitter, cx.shape) * spacing
        iy = np.clip(cy.astype(int), 0, height - 1)
        ix = np.clip(cx.astype(int), 0, width - 1)
        keep = mask_region[iy, ix]
        rr = rng.uniform(radius[0], radius[1], cy.shape)
        for y0, x0, r in zip(cy[keep], cx[keep], rr[keep], strict=True):
            y_lo, y_hi = int(max(y0 - r - 1, 0)), int(min(y0 + r + 2, height))
            x_lo, x_hi = int(max(x0 - r - 1, 0)), int(min(x0 + r + 2, width))
            sub = (yy[y_lo:y_hi, x_lo:x_hi] - y0) ** 2 + (xx[y_lo:y_hi, x_lo:x_hi] - x0) ** 2 < r * r
            sub &= mask_region[y_lo:y_hi, x_lo:x_hi]
            img[y_lo:y_hi, x_lo:x_hi][sub] = color

    stamp(tissue & ~lesion, spacing=14.0, radius=(2.0, 2.8), color=(120, 70, 160), jitter=0.2)
    if lesion.any():
        stamp(lesion, spacing=8.0, radius=(2.8, 4.2), color=(70, 30, 110), jitter=0.35)
    img += rng.normal(0, 3, img.shape).astype(np.float32)
    rgb = np.clip(img + 0.5, 0, 255).astype(np.uint8)
    return SyntheticContent(rgb=rgb, tissue=tissue, lesion=lesion)


_JPEG = {"photometric": "rgb", "compression": "jpeg", "compressionargs": {"level": 85}, "metadata": None}


def write_svs(
    path: str | Path,
    img: NDArray[np.uint8],
    *,
    mpp: float | None = 0.5,
    mag: float | None = 20,
    tile: int = 256,
    factors: Sequence[int] = (4, 16),
    compression: str = "jpeg",
) -> Path:
    """Write an Aperio-style SVS that OpenSlide detects as ``aperio``.

    Parameters
    ----------
    path
        Output file.
    img
        ``(H, W, 3)`` uint8 level-0 image.
    mpp, mag
        Microns per pixel and objective power written into the description (``None`` omits them).
    tile
        Tile size of the pyramid levels.
    factors
        Downsample factors of the reduced levels.
    compression
        ``"jpeg"`` (like real scanners) or ``"none"`` (bit-exact pixels for tests).
    """
    import tifffile

    path = Path(path)
    h, w = img.shape[:2]
    meta = ""
    if mag is not None:
        meta += f"|AppMag = {mag:g}"
    if mpp is not None:
        meta += f"|MPP = {mpp:g}"
    kw: dict[str, Any] = dict(_JPEG) if compression == "jpeg" else {"photometric": "rgb", "metadata": None}
    big = img.nbytes > 2**31
    with tifffile.TiffWriter(path, bigtiff=big) as tw:
        tw.write(
            img,
            tile=(tile, tile),
            subfiletype=0,
            description=f"{_HDR}{w}x{h} [0,0 {w}x{h}] ({tile}x{tile}) JPEG/RGB Q=85{meta}",
            **kw,
        )
        th = downsample(img, max(1, max(h, w) // 512))
        tw.write(th, description=f"{_HDR}{w}x{h} -> {th.shape[1]}x{th.shape[0]} - ", **kw)
        for f in factors:
            lv = downsample(img, f)
            tw.write(
                lv,
                tile=(tile, tile),
                subfiletype=0,
                description=f"{_HDR}{w}x{h} -> {lv.shape[1]}x{lv.shape[0]} JPEG/RGB Q=85",
                **kw,
            )
        label = np.full((200, 200, 3), 230, np.uint8)
        tw.write(label, subfiletype=1, description=f"{_HDR}label 200x200", **kw)
    return path


def write_generic_tiff(
    path: str | Path,
    img: NDArray[np.uint8],
    *,
    mpp: float | None = 0.5,
    tile: int = 256,
    factors: Sequence[int] = (4, 16),
    compression: str = "jpeg",
) -> Path:
    """Write a generic tiled pyramidal TIFF (levels as top-level pages, mpp in the resolution tags)."""
    import tifffile

    path = Path(path)
    kw: dict[str, Any] = dict(_JPEG) if compression == "jpeg" else {"photometric": "rgb", "metadata": None}
    res: dict[str, Any] = {} if mpp is None else {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}
    with tifffile.TiffWriter(path) as tw:
        tw.write(img, tile=(tile, tile), subfiletype=0, **res, **kw)
        for f in factors:
            r: dict[str, Any] = (
                {} if mpp is None else {"resolution": (1e4 / (mpp * f),) * 2, "resolutionunit": "CENTIMETER"}
            )
            tw.write(downsample(img, f), tile=(tile, tile), subfiletype=1, **r, **kw)
    return path


def write_ome_tiff(
    path: str | Path,
    img: NDArray[np.uint8],
    *,
    mpp: float | None = 0.5,
    tile: int = 256,
    factors: Sequence[int] = (2, 4),
    compression: str = "jpeg",
) -> Path:
    """Write an OME-TIFF whose pyramid is stored in SubIFDs (what bioformats2raw/QuPath export)."""
    import tifffile

    path = Path(path)
    kw: dict[str, Any] = {"photometric": "rgb"}
    if compression == "jpeg":
        kw.update(compression="jpeg", compressionargs={"level": 85})
    meta: dict[str, Any] = {"axes": "YXS"}
    if mpp is not None:
        meta.update(PhysicalSizeX=mpp, PhysicalSizeXUnit="µm", PhysicalSizeY=mpp, PhysicalSizeYUnit="µm")
    with tifffile.TiffWriter(path, ome=True) as tw:
        tw.write(img, tile=(tile, tile), subifds=len(factors), metadata=meta, **kw)
        for f in factors:
            tw.write(downsample(img, f), tile=(tile, tile), subfiletype=1, metadata=None, **kw)
    return path
