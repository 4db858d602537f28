"""OpenSlide backend: vendor formats (Aperio SVS, Hamamatsu NDPI, MIRAX, Leica SCN, Philips TIFF, DICOM...)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from wsltool.errors import SlideFormatError, SlideReadError
from wsltool.slide.base import Slide, SlideMetadata


def _float(v: str | None) -> float | None:
    try:
        return float(v) if v not in (None, "") else None
    except ValueError:
        return None


def detect_format(path: Path) -> str | None:
    """OpenSlide's format name for ``path`` (``aperio``, ``generic-tiff``...), or ``None``."""
    import openslide

    try:
        return openslide.OpenSlide.detect_format(str(path))
    except Exception:  # openslide raises various errors on unreadable files
        return None


class OpenSlideSlide(Slide):
    """A slide read through openslide-python (with the bundled openslide-bin library)."""

    backend = "openslide"

    def __init__(self, path: Path, mpp: float | None = None) -> None:
        import openslide

        try:
            self._osr = openslide.OpenSlide(str(path))
        except openslide.OpenSlideUnsupportedFormatError as exc:
            raise SlideFormatError(path, "not a slide format OpenSlide can read") from exc
        except openslide.OpenSlideError as exc:
            raise SlideFormatError(path, f"corrupt or truncated slide ({exc})") from exc
        props = dict(self._osr.properties)
        mx = _float(props.get(openslide.PROPERTY_NAME_MPP_X))
        my = _float(props.get(openslide.PROPERTY_NAME_MPP_Y))
        fmt = props.get(openslide.PROPERTY_NAME_VENDOR) or detect_format(path) or "unknown"
        meta = SlideMetadata(
            format=detect_format(path) or fmt,
            vendor=fmt,
            level_dimensions=tuple(tuple(map(int, d)) for d in self._osr.level_dimensions),  # type: ignore[misc]
            level_downsamples=tuple(float(d) for d in self._osr.level_downsamples),
            mpp=(mx, my if my is not None else mx) if mx is not None else None,
            objective_power=_float(props.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER)),
            properties=props,
            associated=tuple(self._osr.associated_images.keys()),
        )
        self._reopen_lock = threading.Lock()
        super().__init__(path, meta, mpp)
        self._probe()

    def limit_cache(self, nbytes: int) -> None:
        """Give this handle its own OpenSlide tile cache of ``nbytes`` (instead of the shared 32 MiB one)."""
        import openslide

        self._cache_bytes = int(nbytes)
        self._osr.set_cache(openslide.OpenSlideCache(self._cache_bytes))

    def _reopen(self, failed: Any) -> None:
        """Replace the handle ``failed`` by a fresh one (same file, same cache size), once.

        OpenSlide keeps an error on the handle: every later call through it fails, intact tiles included, in
        every thread.  Only the first thread to see ``failed`` fail replaces it; the old handle closes when the
        last thread reading through it lets go.  Kept as is if the file no longer opens.
        """
        import openslide

        with self._reopen_lock:
            if self._osr is not failed:
                return  # another thread has replaced it already
            try:
                osr = openslide.OpenSlide(str(self.path))
                if getattr(self, "_cache_bytes", None):
                    osr.set_cache(openslide.OpenSlideCache(self._cache_bytes))
            except openslide.OpenSlideError:
                return
            self._osr = osr

    def _read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        import openslide

        ds = self.level_downsamples[level]
        location, size = (round(x * ds), round(y * ds)), (w, h)
        osr = self._osr
        try:
            img = osr.read_region(location, level, size)
        except openslide.OpenSlideError:
            # the error may be another thread's damaged tile, stored on the shared handle: replace that handle,
            # and read once more through a handle of this read's own, which nothing else can spoil
            self._reopen(osr)
            own = None
            try:
                own = openslide.OpenSlide(str(self.path))
                img = own.read_region(location, level, size)
            except openslide.OpenSlideError as exc:
                raise SlideReadError(self.path, f"cannot read pixels at level {level} ({exc})") from exc
            finally:
                if own is not None:
                    own.close()
        rgba = np.asarray(img)
        alpha = rgba[..., 3:4]
        if alpha.min() == 255:
            return rgba[..., :3]  # a view: callers that need contiguous memory copy once, where they must
        # transparent where the scanner stored nothing: composite onto white glass
        a = alpha.astype(np.float32) / 255.0
        rgb = rgba[..., :3].astype(np.float32) * a + 255.0 * (1.0 - a)
        return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)

    def read_associated(self, name: str) -> np.ndarray:
        """Return an associated image (``label``, ``macro``, ``thumbnail``) as RGB uint8."""
        if name not in self._osr.associated_images:
            return super().read_associated(name)
        return np.asarray(self._osr.associated_images[name].convert("RGB"))

    def close(self) -> None:
        """Close the OpenSlide handle."""
        osr = getattr(self, "_osr", None)
        if osr is not None:
            osr.close()
            self._osr = None  # type: ignore[assignment]
