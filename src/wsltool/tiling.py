"""Pure geometry: a grid of overlapping regions at a target mpp, filtered by tissue.

No I/O happens here.  Two coordinate systems are used:

- *grid pixels*: pixels at the target ``mpp``; region ``(row, col)`` starts at
  ``(col * stride, row * stride)`` and is ``region x region`` large (integers);
- *level-0 pixels*: the slide's own pixels; a grid coordinate ``g`` maps to ``g * mpp / base_mpp``.

Regions cover the whole slide (the last row/column may reach past the edge; readers pad with
white).  With a tissue mask, a region is kept when its tissue fraction exceeds ``min_tissue``.
Order is deterministic: row-major.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from numpy.typing import NDArray

from wsltool.config import TilingConfig

log = logging.getLogger(__name__)


class TissueLike(Protocol):
    """What :class:`Grid` needs from a tissue mask (see :class:`wsltool.tissue.TissueMask`)."""

    def fraction_in(self, x0: float, y0: float, x1: float, y1: float, base_mpp: float) -> float:
        """Tissue fraction inside a level-0 box."""
        ...


@dataclass(frozen=True)
class Region:
    """One region of a :class:`Grid`.

    Attributes
    ----------
    index
        Position in the grid's region list.
    row, col
        Grid row and column.
    gx, gy
        Top-left corner in grid pixels (pixels at the grid's mpp).
    x, y
        Top-left corner in level-0 pixels (floats: grid and slide resolutions rarely align).
    tissue
        Tissue fraction inside the region (1.0 when no tissue mask was used).
    """

    index: int
    row: int
    col: int
    gx: int
    gy: int
    x: float
    y: float
    tissue: float


class Grid:
    """Regions of ``config.region`` px at ``config.mpp`` with ``config.overlap`` px overlap over a slide.

    Parameters
    ----------
    dimensions
        Level-0 ``(width, height)`` of the slide.
    base_mpp
        Level-0 microns per pixel of the slide.
    config
        Region size, overlap, mpp and tissue threshold.
    tissue
        Optional tissue mask; without one every grid position is kept.
    """

    def __init__(
        self,
        dimensions: tuple[int, int],
        base_mpp: float,
        config: TilingConfig,
        tissue: TissueLike | None = None,
    ) -> None:
        self.dimensions = (int(dimensions[0]), int(dimensions[1]))
        self.base_mpp = float(base_mpp)
        self.config = config
        self.scale = config.mpp / self.base_mpp  # level-0 px per grid px
        w, h = self.dimensions
        self.grid_size = (math.ceil(w / self.scale), math.ceil(h / self.scale))  # slide size in grid px
        self.n_cols = self._count(self.grid_size[0])
        self.n_rows = self._count(self.grid_size[1])
        rows, cols = np.mgrid[0 : self.n_rows, 0 : self.n_cols]
        rows, cols = rows.ravel(), cols.ravel()
        st = config.stride
        fractions = np.ones(rows.size, np.float64)
        if tissue is not None:
            r0 = config.region * self.scale
            x0s, y0s = cols * st * self.scale, rows * st * self.scale
            boxes = np.stack([x0s, y0s, x0s + r0, y0s + r0], axis=1)
            if hasattr(tissue, "fractions_in"):  # vectorised (wsltool.tissue.TissueMask)
                fractions = np.asarray(tissue.fractions_in(boxes, self.base_mpp), dtype=np.float64)
            else:
                for i, b in enumerate(boxes):
                    fractions[i] = tissue.fraction_in(b[0], b[1], b[2], b[3], self.base_mpp)
            keep = fractions > config.min_tissue
        else:
            keep = np.ones(rows.size, bool)
        self._rows = rows[keep].astype(np.int64)
        self._cols = cols[keep].astype(np.int64)
        self._tissue = fractions[keep]
        if tissue is not None and not keep.any():
            log.warning("no region has more than %.0f%% tissue: the grid is empty", 100 * config.min_tissue)

    def _count(self, extent: int) -> int:
        r, st = self.config.region, self.config.stride
        if extent <= r:
            return 1
        return math.ceil((extent - r) / st) + 1

    @classmethod
    def for_slide(cls, slide: object, config: TilingConfig, tissue: TissueLike | None = None) -> Grid:
        """Grid over a :class:`wsltool.slide.Slide` (uses its level-0 dimensions and effective mpp)."""
        return cls(slide.dimensions, slide.mpp, config, tissue)  # type: ignore[attr-defined]

    def __len__(self) -> int:
        return int(self._rows.size)

    def __getitem__(self, i: int) -> Region:
        if not -len(self) <= i < len(self):
            msg = f"region index {i} out of range for a grid of {len(self)}"
            raise IndexError(msg)
        i = i % len(self)
        st = self.config.stride
        gx, gy = int(self._cols[i]) * st, int(self._rows[i]) * st
        return Region(
            i, int(self._rows[i]), int(self._cols[i]), gx, gy, gx * self.scale, gy * self.scale, float(self._tissue[i])
        )

    def __iter__(self) -> Iterator[Region]:
        for i in range(len(self)):
            yield self[i]

    @property
    def shape(self) -> tuple[int, int]:
        """``(n_rows, n_cols)`` of the full grid (before tissue filtering)."""
        return self.n_rows, self.n_cols

    @property
    def origins(self) -> NDArray[np.int64]:
        """``(N, 2)`` array of ``(gx, gy)`` region corners in grid pixels."""
        st = self.config.stride
        return np.stack([self._cols * st, self._rows * st], axis=1)

    @property
    def level0_origins(self) -> NDArray[np.float64]:
        """``(N, 2)`` array of ``(x, y)`` region corners in level-0 pixels."""
        return self.origins.astype(np.float64) * self.scale

    @property
    def tissue_fractions(self) -> NDArray[np.float64]:
        """Tissue fraction of every kept region."""
        return self._tissue.copy()

    def subset(self, indices: NDArray[np.int64] | list[int]) -> NDArray[np.int64]:
        """Validated array of region indices (e.g. the pending ones when resuming)."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            msg = "region indices out of range"
            raise IndexError(msg)
        return idx
