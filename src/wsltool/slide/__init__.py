"""Slide reading: one :class:`Slide` interface over OpenSlide, tifffile/zarr and plain images.

Use :func:`open_slide`; the backend is chosen from the file's content (magic bytes and what
OpenSlide detects), not from its extension alone, and can be forced with ``backend=``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from wsltool.errors import SlideFormatError, SlideNotFoundError
from wsltool.slide.base import MPP_RANGE, Slide, SlideMetadata

log = logging.getLogger(__name__)

Backend = Literal["openslide", "tifffile", "image"]
BACKENDS: tuple[str, ...] = ("openslide", "tifffile", "image")

#: OpenSlide formats read with OpenSlide (vendor formats, DICOM).  ``generic-tiff`` goes to tifffile,
#: which also reads SubIFD pyramids and stripped TIFFs that OpenSlide sees as one level or refuses.
_OPENSLIDE_FORMATS = {
    "aperio",
    "hamamatsu",
    "leica",
    "mirax",
    "philips",
    "sakura",
    "trestle",
    "ventana",
    "dicom",
    "zeiss",
    "synthetic",
}

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"BM", b"GIF8")

__all__ = ["BACKENDS", "MPP_RANGE", "Slide", "SlideMetadata", "choose_backend", "open_slide"]


def choose_backend(path: str | Path) -> str:
    """Pick the backend for a file from its content.

    Raises
    ------
    SlideNotFoundError
        When the path does not exist.
    SlideFormatError
        When no backend recognises the content.
    """
    from wsltool.slide.openslide_backend import detect_format

    p = Path(path)
    if not p.exists():
        raise SlideNotFoundError(p, "no such file")
    if p.is_dir():
        fmt = detect_format(p)
        if fmt is not None:
            return "openslide"
        raise SlideFormatError(p, "a folder that OpenSlide does not recognise as a slide (DICOM, MIRAX...)")
    try:
        with p.open("rb") as fh:
            head = fh.read(16)
    except OSError as exc:
        raise SlideFormatError(p, f"cannot read the file ({exc.strerror})") from exc
    if not head:
        raise SlideFormatError(p, "empty file")
    fmt = detect_format(p)
    if head.startswith(_TIFF_MAGIC):
        return "openslide" if fmt in _OPENSLIDE_FORMATS else "tifffile"
    if fmt is not None and fmt != "generic-tiff":
        return "openslide"
    if head.startswith(_IMAGE_MAGIC):
        return "image"
    raise SlideFormatError(p, "not a slide or image: unrecognised file content")


def open_slide(path: str | Path, *, mpp: float | None = None, backend: str | None = None) -> Slide:
    """Open a whole-slide image or a plain image.

    Parameters
    ----------
    path
        Slide file (SVS, NDPI, MRXS, SCN, Philips/generic/OME-TIFF, DICOM folder) or image (PNG, JPEG, BMP).
    mpp
        Override of the level-0 microns per pixel, for files whose metadata lacks it or is wrong.
        Recorded as ``mpp_source == "override"``.
    backend
        Force ``"openslide"``, ``"tifffile"`` or ``"image"``; default: chosen from the content.

    Returns
    -------
    Slide
        The opened slide; close it (or use it as a context manager) when done.

    Raises
    ------
    SlideNotFoundError, SlideFormatError, MppError
        With a one-line message naming the file and the problem.
    """
    p = Path(path)
    if backend is None:
        backend = choose_backend(p)
    elif not p.exists():
        raise SlideNotFoundError(p, "no such file")
    if backend == "openslide":
        from wsltool.slide.openslide_backend import OpenSlideSlide

        slide: Slide = OpenSlideSlide(p, mpp=mpp)
    elif backend == "tifffile":
        from wsltool.slide.tiff_backend import TiffSlide

        slide = TiffSlide(p, mpp=mpp)
    elif backend == "image":
        from wsltool.slide.image_backend import ImageSlide

        slide = ImageSlide(p, mpp=mpp)
    else:
        msg = f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}"
        raise ValueError(msg)
    log.debug("opened %r", slide)
    return slide
