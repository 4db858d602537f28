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
                    arr = np.asarray(im.convert("RGB"))
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
