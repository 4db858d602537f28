"""Plain images (PNG, JPEG, BMP, small TIFF without pyramid) as one-level slides."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from wsltool.errors import SlideFormatError
from wsltool.slide.base import Slide, SlideMetadata

#: Largest plain image accepted (pixels); beyond this a real pyramidal format is required.
MAX_PIXELS = 40_000 * 40_000


class ImageSlide(Slide):
    """A plain raster image held in memory, exposed through the :class:`Slide` interface.

    mpp comes from the file's resolution (PNG pHYs / JPEG/TIFF dpi) only when it is plausible
    for microscopy (0.05-20 um/px); screen-style 72/96 dpi values are ignored.
    """

    backend = "image"

    def __init__(self, path: Path, mpp: float | None = None) -> None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                Image.MAX_IMAGE_PIXELS = MAX_PIXELS
                with Image.open(path) as im:
                    fmt = (im.format or "image").lower()
                    dpi = im.info.get("dpi")
                    im.load()
                    arr = pil_to_rgb8(im)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise SlideFormatError(path, f"not a readable image ({exc})") from exc
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise SlideFormatError(path, "image too large for a plain raster; convert it to a pyramidal TIFF") from exc
        file_mpp = None
        if dpi and dpi[0]:
            file_mpp = (25400.0 / float(dpi[0]), 25400.0 / float(dpi[1] or dpi[0]))
        h, w = arr.shape[:2]
        meta = SlideMetadata(format=fmt, vendor=fmt, level_dimensions=((w, h),), level_downsamples=(1.0,), mpp=file_mpp)
        super().__init__(path, meta, mpp)
        self._arr = arr

    def _read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        return self._arr[y : y + h, x : x + w]


def pil_to_rgb8(im: Image.Image) -> np.ndarray:
    """A PIL image as ``uint8 (H, W, 3)`` RGB, high-bit-depth greyscale scaled rather than clipped.

    ``convert("RGB")`` clips 16-bit greyscale at 255 (a 16-bit image turns almost white), so ``I;16*`` modes
    (0-65535) are divided by 257; ``I`` / ``F`` (no declared range) are taken as 8-bit when every value fits
    0-255 and as 16-bit when they fit 0-65535.

    Raises
    ------
    ValueError
        Greyscale values outside 0-65535 (or not finite).
    """
    if not (im.mode.startswith("I") or im.mode == "F"):
        return np.asarray(im.convert("RGB"))
    a = np.asarray(im).astype(np.float64)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if lo < 0 or hi > 65535 or not np.isfinite(a).all():
        msg = f"{im.mode} pixel values {lo:g}..{hi:g} are outside 0-65535; save the image as 8-bit RGB"
        raise ValueError(msg)
    top = 65535.0 if im.mode.startswith("I;16") or hi > 255 else 255.0
    g = np.round(a * (255.0 / top)).astype(np.uint8)
    return np.repeat(g[..., None], 3, axis=2)
