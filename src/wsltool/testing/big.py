"""Gigapixel synthetic slides for benchmarks, written tile by tile (never held in memory).

The tissue layout is a smooth blob mask at 1/16 resolution; each 256-px tile blends a tile of
H&E-like texture (from a small pool made by :func:`wsltool.testing.he_tissue`) with glass background
through the upsampled mask, so tiles look like real tissue and JPEG sizes are realistic.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from wsltool.testing.slides import _HDR, _blobs, downsample, he_tissue

TILE = 256
MASK_FACTOR = 16


def tissue_layout(width: int, height: int, tissue_fraction: float, seed: int) -> NDArray[np.bool_]:
    """A blob mask at 1/16 of the slide size covering about ``tissue_fraction`` of it."""
    rng = np.random.default_rng(seed)
    mh, mw = -(-height // MASK_FACTOR), -(-width // MASK_FACTOR)
    scale = 0.2 * min(mh, mw)
    mask = np.zeros((mh, mw), bool)
    for _ in range(40):
        mask |= _blobs(mh, mw, rng, 1, scale)
        if mask.mean() >= tissue_fraction:
            break
    return mask


def write_large_svs(
    path: str | Path,
    width: int,
    height: int,
    *,
    tissue_fraction: float = 0.3,
    mpp: float = 0.5,
    seed: int = 0,
    factors: tuple[int, ...] = (4, 16, 64),
    compression: str = "jpeg",
) -> NDArray[np.bool_]:
    """Write an Aperio-style SVS of ``width x height`` px, tile by tile; returns the 1/16 tissue mask.

    ``compression`` is ``"jpeg"`` (Q80, like scanners; needs imagecodecs) or ``"none"`` (for machines without
    imagecodecs, e.g. the lent GPU machine; openslide reads both).
    """
    import tifffile

    path = Path(path)
    mask = tissue_layout(width, height, tissue_fraction, seed)
    pool_img = he_tissue(1024, 1024, seed=seed, n_blobs=1, blob_scale=10_000).rgb
    pool = [pool_img[y : y + TILE, x : x + TILE] for y in range(0, 1024, TILE) for x in range(0, 1024, TILE)]
    glass = np.full((TILE, TILE, 3), 242, np.uint8)
    rng = np.random.default_rng(seed + 1)

    def level_tiles(f: int) -> Iterator[NDArray[np.uint8]]:
        lw, lh = width // f, height // f
        m_per_tile = TILE * f / MASK_FACTOR  # mask pixels per tile side at this level
        for ty in range(0, lh, TILE):
            for tx in range(0, lw, TILE):
                y0, x0 = ty * f / MASK_FACTOR, tx * f / MASK_FACTOR
                ys = np.clip((y0 + np.arange(TILE) * m_per_tile / TILE).astype(int), 0, mask.shape[0] - 1)
                xs = np.clip((x0 + np.arange(TILE) * m_per_tile / TILE).astype(int), 0, mask.shape[1] - 1)
                m = mask[np.ix_(ys, xs)]
                if not m.any():
                    yield glass
                    continue
                tex = pool[int(rng.integers(len(pool)))]
                if f > 1:
                    tex = np.asarray(downsample(np.tile(tex, (min(f, 4), min(f, 4), 1)), min(f, 4)))
                yield np.where(m[..., None], tex, glass)

    if compression not in ("jpeg", "none"):
        msg = f"compression must be 'jpeg' or 'none', got {compression!r}"
        raise ValueError(msg)
    kw: dict[str, Any] = {"photometric": "rgb", "metadata": None}
    if compression == "jpeg":
        kw.update(compression="jpeg", compressionargs={"level": 80})
    codec = "JPEG/RGB Q=80" if compression == "jpeg" else "RAW/RGB"
    desc0 = f"{_HDR}{width}x{height} [0,0 {width}x{height}] ({TILE}x{TILE}) {codec}|AppMag = 20|MPP = {mpp:g}"
    with tifffile.TiffWriter(path, bigtiff=width * height * 3 > 2**32) as tw:
        tw.write(
            level_tiles(1),
            shape=(height, width, 3),
            dtype=np.uint8,
            tile=(TILE, TILE),
            subfiletype=0,
            description=desc0,
            maxworkers=2,
            **kw,
        )
        th = np.where(downsample(mask.astype(np.uint8) * 255, 2)[..., None] > 127, 200, 242).astype(np.uint8)
        th = np.repeat(th, 3, axis=2)
        tw.write(th, description=f"{_HDR}{width}x{height} -> {th.shape[1]}x{th.shape[0]} - ", **kw)
        for f in factors:
            lw, lh = width // f, height // f
            tw.write(
                level_tiles(f),
                shape=(lh, lw, 3),
                dtype=np.uint8,
                tile=(TILE, TILE),
                subfiletype=0,
                description=f"{_HDR}{width}x{height} -> {lw}x{lh} {codec}",
                maxworkers=2,
                **kw,
            )
    return mask
