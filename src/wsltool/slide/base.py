"""The :class:`Slide` interface: mpp-first region reading over a multi-level pyramid.

Coordinates are always level-0 pixels ``(x, y)``; sizes are pixels at the resolution asked for.
Backends only implement :meth:`Slide._read_level`, which reads a rectangle that lies inside one
level; this class handles level choice, resampling and padding beyond the slide edge.
"""

from __future__ import annotations

import hashlib
import logging
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from wsltool.errors import MppError, SlideFormatError, SlideReadError

log = logging.getLogger(__name__)

#: Plausible microns per pixel; outside this range the metadata is treated as bogus.
MPP_RANGE = (0.05, 20.0)
#: Value used to pad regions that reach beyond the slide edge (white glass background).
BACKGROUND = 255
#: Relative tolerance when comparing downsample factors (levels are rarely exact powers of two).
_DS_TOL = 1e-3

MppSource = Literal["metadata", "override", "none"]


def check_mpp(value: float | None) -> float | None:
    """Return ``value`` when it is a plausible mpp, else ``None``."""
    if value is None:
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(v) or not (MPP_RANGE[0] <= v <= MPP_RANGE[1]):
        return None
    return v


#: Largest accepted level-0 side in pixels (the biggest real slides are ~200k px).
MAX_SIDE = 2_000_000


def check_dimensions(path: str | Path, dims: tuple[tuple[int, int], ...] | list[tuple[int, int]]) -> None:
    """Raise :class:`SlideFormatError` for zero-size or absurd level dimensions."""
    if not dims:
        raise SlideFormatError(path, "no image levels")
    for w, h in dims:
        if w <= 0 or h <= 0 or w > MAX_SIDE or h > MAX_SIDE:
            msg = f"absurd slide dimensions {w}x{h} (expected 1..{MAX_SIDE} px per side)"
            raise SlideFormatError(path, msg)


@dataclass
class SlideMetadata:
    """What a backend found in the file.

    Attributes
    ----------
    format
        Short name of the file format (``aperio``, ``generic-tiff``, ``ome-tiff``, ``png`` ...).
    vendor
        Scanner vendor when known, else the format.
    level_dimensions
        ``(width, height)`` of every pyramid level, finest first.
    level_downsamples
        Downsample factor of every level relative to level 0.
    mpp
        ``(mpp_x, mpp_y)`` as stored in the file, or ``None`` when absent.
    objective_power
        Objective magnification as stored in the file, or ``None``.
    properties
        Raw key/value metadata from the file.
    associated
        Names of associated images (label, macro, thumbnail).
    """

    format: str
    vendor: str
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    mpp: tuple[float, float] | None = None
    objective_power: float | None = None
    properties: dict[str, str] = field(default_factory=dict)
    associated: tuple[str, ...] = ()


class Slide(ABC):
    """A whole-slide image (or a plain image, which is a one-level slide).

    Open one with :func:`wsltool.slide.open_slide`; do not instantiate backends directly.

    Parameters
    ----------
    path
        The file (or folder, for DICOM) that was opened.
    meta
        The backend's metadata.
    mpp
        Optional override of the microns per pixel (both axes), for files whose metadata is absent
        or wrong.  When given it wins over the file and :attr:`mpp_source` is ``"override"``.
    """

    backend: str = "?"

    def __init__(self, path: Path, meta: SlideMetadata, mpp: float | None = None) -> None:
        self.path = Path(path)
        self.meta = meta
        check_dimensions(self.path, meta.level_dimensions)
        self._file_mpp: float | None = None
        self._file_mpp_raw = meta.mpp
        if meta.mpp is not None:
            mx, my = (check_mpp(meta.mpp[0]), check_mpp(meta.mpp[1]))
            if mx is not None and my is not None:
                if abs(mx - my) / max(mx, my) > 0.05:
                    log.warning("%s: anisotropic pixels (mpp-x %.4f, mpp-y %.4f); using mpp-x", path, mx, my)
                self._file_mpp = mx
        self._override: float | None = None
        if mpp is not None:
            ov = check_mpp(mpp)
            if ov is None:
                msg = f"mpp override {mpp} is outside the plausible range {MPP_RANGE[0]}-{MPP_RANGE[1]} um/px"
                raise MppError(self.path, msg)
            self._override = ov

    # -- metadata -----------------------------------------------------------------------------
    @property
    def dimensions(self) -> tuple[int, int]:
        """``(width, height)`` of level 0."""
        return self.meta.level_dimensions[0]

    @property
    def level_count(self) -> int:
        """Number of pyramid levels."""
        return len(self.meta.level_dimensions)

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        """``(width, height)`` of every level."""
        return self.meta.level_dimensions

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        """Downsample of every level relative to level 0."""
        return self.meta.level_downsamples

    @property
    def vendor(self) -> str:
        """Scanner vendor or format name."""
        return self.meta.vendor

    @property
    def format(self) -> str:
        """File format name."""
        return self.meta.format

    @property
    def objective_power(self) -> float | None:
        """Objective magnification from the metadata, if any."""
        return self.meta.objective_power

    @property
    def properties(self) -> dict[str, str]:
        """Raw metadata properties."""
        return self.meta.properties

    @property
    def file_mpp(self) -> float | None:
        """The plausible mpp stored in the file, or ``None`` (absent, zero or outside 0.05-20 um/px)."""
        return self._file_mpp

    @property
    def mpp_source(self) -> MppSource:
        """Where :attr:`mpp` comes from: ``"override"``, ``"metadata"`` or ``"none"``."""
        if self._override is not None:
            return "override"
        return "metadata" if self._file_mpp is not None else "none"

    @property
    def mpp_or_none(self) -> float | None:
        """The effective level-0 mpp (override first, then metadata), or ``None``."""
        return self._override if self._override is not None else self._file_mpp

    @property
    def mpp(self) -> float:
        """The effective level-0 microns per pixel.

        Raises
        ------
        MppError
            When the file has no usable mpp and no override was given.
        """
        v = self.mpp_or_none
        if v is None:
            raw = self._file_mpp_raw
            why = "absent" if raw is None else f"implausible value {raw[0]:g}"
            hint = ""
            if self.objective_power:
                hint = f" (objective {self.objective_power:g}x suggests about {10.0 / self.objective_power:g})"
            msg = (
                f"no usable microns-per-pixel in the file ({why}); give it explicitly{hint}: --slide-mpp (infer), "
                "--mpp (info), an mpp column (cohort or labels CSV), mpp= (Python)"
            )
            raise MppError(self.path, msg)
        return v

    @property
    def associated_images(self) -> tuple[str, ...]:
        """Names of the associated images (label, macro, thumbnail) the file holds."""
        return self.meta.associated

    def read_associated(self, name: str) -> np.ndarray:
        """Return an associated image as ``(H, W, 3)`` uint8."""
        msg = f"no associated image {name!r}"
        raise KeyError(msg)

    # -- pixels -------------------------------------------------------------------------------
    @abstractmethod
    def _read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Read ``(h, w, 3)`` uint8 at ``level``; ``x, y, w, h`` in that level's pixels, inside it."""

    def _probe(self) -> None:
        """Read the first pixel of the coarsest level, so a truncated or corrupt file fails at open time."""
        try:
            self._read_level(self.level_count - 1, 0, 0, 1, 1)
        except SlideReadError as exc:
            self.close()
            raise SlideFormatError(self.path, f"corrupt or truncated slide ({exc.problem})") from exc

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the file handle."""

    def limit_cache(self, nbytes: int) -> None:  # noqa: B027 - optional hook
        """Cap the decoded-tile cache of this handle (backends without a cache ignore it).

        Streaming readers visit each tile about once, so a cache of a few regions' tiles is enough;
        OpenSlide's default (32 MiB per process) otherwise fills up on large slides and makes memory grow
        with slide size.
        """

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        w, h = self.dimensions
        return f"<{type(self).__name__} {self.path.name} {self.format} {w}x{h} levels={self.level_count}>"

    def read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Read pixels of one level, padding with white outside it.

        Parameters
        ----------
        level
            Pyramid level.
        x, y
            Top-left corner in **level-0** pixels.
        w, h
            Size in pixels of ``level``.

        Returns
        -------
        numpy.ndarray
            ``(h, w, 3)`` uint8 RGB.
        """
        ds = self.level_downsamples[level]
        lx, ly = int(math.floor(x / ds)), int(math.floor(y / ds))
        return self._read_level_padded(level, lx, ly, w, h)

    def _read_level_padded(self, level: int, lx: int, ly: int, w: int, h: int) -> np.ndarray:
        lw, lh = self.level_dimensions[level]
        x0, y0 = max(lx, 0), max(ly, 0)
        x1, y1 = min(lx + w, lw), min(ly + h, lh)
        if x0 == lx and y0 == ly and x1 == lx + w and y1 == ly + h:
            return self._read_level(level, lx, ly, w, h)
        out = np.full((h, w, 3), BACKGROUND, dtype=np.uint8)
        if x1 > x0 and y1 > y0:
            out[y0 - ly : y1 - ly, x0 - lx : x1 - lx] = self._read_level(level, x0, y0, x1 - x0, y1 - y0)
        return out

    def best_level(self, downsample: float) -> int:
        """Coarsest level whose downsample is at most ``downsample`` (level 0 when none is)."""
        best = 0
        for i, d in enumerate(self.level_downsamples):
            if d <= downsample * (1 + _DS_TOL):
                best = i if d >= self.level_downsamples[best] else best
        return best

    def read_region(self, x: float, y: float, w: int, h: int, mpp: float | None = None) -> np.ndarray:
        """Read ``w x h`` pixels at ``mpp`` whose top-left corner is level-0 pixel ``(x, y)``.

        The region is read from the coarsest level that is at least as fine as ``mpp`` and
        resampled with an antialiasing Lanczos filter (or returned as is when the level matches).
        Pixels beyond the slide edge are white (255), like empty glass.

        Parameters
        ----------
        x, y
            Top-left corner in level-0 pixels.
        w, h
            Output size in pixels at ``mpp``.
        mpp
            Output microns per pixel; ``None`` means level 0.

        Returns
        -------
        numpy.ndarray
            ``(h, w, 3)`` uint8 RGB.

        Raises
        ------
        MppError
            When ``mpp`` is given and the slide has no usable mpp.
        """
        if w <= 0 or h <= 0:
            msg = f"region size must be positive, got {w}x{h}"
            raise ValueError(msg)
        ds = 1.0 if mpp is None else float(mpp) / self.mpp
        level = self.best_level(ds)
        lds = self.level_downsamples[level]
        scale = ds / lds  # output pixel size in level pixels (>= 1 up to tolerance, unless upsampling)
        fx, fy = x / lds, y / lds
        if abs(scale - 1.0) < _DS_TOL and abs(fx - round(fx)) < 1e-6 and abs(fy - round(fy)) < 1e-6:
            return self._read_level_padded(level, round(fx), round(fy), w, h)
        # integer window that covers the source box, with a margin for the filter support
        pad = 3
        sx0 = int(math.floor(fx)) - pad
        sy0 = int(math.floor(fy)) - pad
        sx1 = int(math.ceil(fx + w * scale)) + pad
        sy1 = int(math.ceil(fy + h * scale)) + pad
        src = self._read_level_padded(level, sx0, sy0, sx1 - sx0, sy1 - sy0)
        box = (fx - sx0, fy - sy0, fx - sx0 + w * scale, fy - sy0 + h * scale)
        img = Image.fromarray(src).resize((w, h), Image.Resampling.LANCZOS, box=box)
        return np.asarray(img)

    def thumbnail(self, max_size: int = 1024) -> np.ndarray:
        """Whole-slide overview whose longer side is at most ``max_size`` pixels, as RGB uint8."""
        w, h = self.dimensions
        factor = max(w, h) / max_size
        if factor <= 1:
            return self.read_level(0, 0, 0, w, h)
        level = self.best_level(factor)
        lw, lh = self.level_dimensions[level]
        arr = self._read_level(level, 0, 0, lw, lh)
        tw, th = max(1, round(w / factor)), max(1, round(h / factor))
        return np.asarray(Image.fromarray(arr).resize((tw, th), Image.Resampling.BOX))

    def read_at_mpp(self, mpp: float) -> np.ndarray:
        """Whole slide at a (coarse) ``mpp``, e.g. for tissue detection; ``(H, W, 3)`` uint8."""
        ds = mpp / self.mpp
        w, h = self.dimensions
        tw, th = max(1, round(w / ds)), max(1, round(h / ds))
        return self.read_region(0, 0, tw, th, mpp=mpp)

    def fingerprint(self) -> str:
        """Content fingerprint: sha256 of the file size and its first and last MiB (hex, 16 chars)."""
        p = self.path
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file())
            p = max(files, key=lambda f: f.stat().st_size) if files else p
        h = hashlib.sha256()
        size = p.stat().st_size if p.is_file() else 0
        h.update(str(size).encode())
        if p.is_file():
            with p.open("rb") as fh:
                h.update(fh.read(1 << 20))
                if size > 2 << 20:
                    fh.seek(size - (1 << 20))
                    h.update(fh.read())
        return h.hexdigest()[:16]

    def info(self) -> dict[str, Any]:
        """Summary of the slide for display (``wsltool info``) and provenance records."""
        return {
            "path": str(self.path),
            "backend": self.backend,
            "format": self.format,
            "vendor": self.vendor,
            "dimensions": list(self.dimensions),
            "level_count": self.level_count,
            "level_dimensions": [list(d) for d in self.level_dimensions],
            "level_downsamples": [round(d, 4) for d in self.level_downsamples],
            "mpp": self.mpp_or_none,
            "mpp_source": self.mpp_source,
            "file_mpp": self._file_mpp_raw[0] if self._file_mpp_raw else None,
            "objective_power": self.objective_power,
            "associated_images": list(self.associated_images),
        }
