"""Stitch per-region maps into a heatmap store, band by band, with bounded memory (no torch).

Regions are boxes ``(y0, x0, h, w)`` in heatmap (output-grid) pixels; they may reach beyond the grid
(edge regions of a slide), the part outside is ignored.  Each region's maps are weighted by a smooth
separable window (a raised-cosine ramp over the overlap with a floor > 0, so a region still counts at
the slide border where it has no neighbour) and accumulated as ``sum(w * v)`` and ``sum(w)``.

Accumulation is split into chunk-aligned row bands (band height = the store's chunk).  Every band
knows how many regions touch it; when that count reaches zero the band is final: it is divided,
written to level 0 of the store, recorded in the store's resume record and released.  Regions may
arrive in any order (interleaved DataLoader workers); memory is the bands currently open.

The sums are kept in fixed point (integers with 2**-24 resolution or finer, far below float16's), so they do
not depend on the order regions arrive in: a resumed run, or a run with another worker count, gives
bit-identical output.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any

import numpy as np

from wsltool.errors import DataError, StoreError
from wsltool.store import HeatmapStore

__all__ = ["Stitcher", "blend_window", "ramp"]

logger = logging.getLogger(__name__)

_INT32_MAX = 2**31 - 1


def _infer_overlap(boxes: np.ndarray) -> int:
    """Box size minus the smallest positive step between distinct origins, per axis (max of both)."""
    best = 0
    for axis in (0, 1):
        starts = np.unique(boxes[:, axis])
        steps = np.diff(starts)
        if steps.size:
            size = int(np.median(boxes[:, axis + 2]))
            best = max(best, size - int(steps.min()))
    return max(best, 0)


def ramp(n: int, overlap: int, floor: float = 0.1) -> np.ndarray:
    """Return a 1-D blending weight of length ``n``.

    A raised-cosine (Hann) ramp from ``floor`` up to 1 over the first and last ``overlap`` samples
    (sampled at pixel centres), 1 in between.  ``overlap=0`` gives all ones.

    Parameters
    ----------
    n
        Length in pixels.
    overlap
        Ramp length in pixels at each end (the region overlap at output resolution).
    floor
        Smallest weight, in (0, 1]; keeps edge regions weighted at the slide border.

    Returns
    -------
    numpy.ndarray
        float64 ``(n,)`` in ``[floor, 1]``.
    """
    t = np.arange(n, dtype=np.float64)
    if overlap <= 0:
        return np.ones(n, dtype=np.float64)
    d = np.minimum(t, n - 1 - t) + 0.5  # distance of the pixel centre from the nearer end
    rise = 0.5 * (1.0 - np.cos(np.pi * np.clip(d / overlap, 0.0, 1.0)))
    return floor + (1.0 - floor) * rise


def blend_window(h: int, w: int, overlap: int, floor: float = 0.1) -> np.ndarray:
    """Return the separable 2-D blending window ``ramp(h) x ramp(w)``.

    Parameters
    ----------
    h, w
        Region size in output pixels.
    overlap
        Ramp length in output pixels.
    floor
        Smallest 1-D weight (the corner weight is ``floor**2``).

    Returns
    -------
    numpy.ndarray
        float64 ``(h, w)`` in ``(0, 1]``.
    """
    return np.outer(ramp(h, overlap, floor), ramp(w, overlap, floor))


class _Band:
    """Fixed-point accumulators of one open row band."""

    __slots__ = ("acc", "wsum")

    def __init__(self, channels: int, rows: int, width: int, dtype: type[np.signedinteger[Any]]) -> None:
        self.acc = np.zeros((channels, rows, width), dtype=dtype)
        self.wsum = np.zeros((rows, width), dtype=dtype)


class Stitcher:
    """Blend overlapping region maps into a :class:`~wsltool.store.HeatmapStore`, band by band.

    Parameters
    ----------
    store
        A writable store (from :meth:`HeatmapStore.create`).
    boxes
        All regions up front, ``(y0, x0, h, w)`` in heatmap pixels (integers; may extend beyond the
        grid).  Region ``i`` of :meth:`add` is ``boxes[i]``.
    overlap
        Blending ramp length in heatmap pixels: the region overlap at output resolution.  None infers
        it from the boxes (box size minus the smallest step between distinct box origins); 0 gives
        flat weights (plain averaging of overlaps).
    floor
        Smallest 1-D window weight, in (0, 1].
    resume
        Keep the bands the store already records as final (see :meth:`pending_indices`); otherwise
        the resume record is cleared and every band is computed again.

    Raises
    ------
    DataError
        Invalid boxes or window parameters.
    StoreError
        The store is not writable, or ``resume`` meets a store started with another region list.

    Examples
    --------
    >>> with Stitcher(store, boxes, overlap=16) as st:  # doctest: +SKIP
    ...     for i in st.pending_indices():
    ...         st.add(i, predict(i))
    ...     st.finalize({"p_malignant": 0.9}, tissue=mask)
    """

    def __init__(
        self,
        store: HeatmapStore,
        boxes: Sequence[Sequence[int]] | np.ndarray,
        *,
        overlap: int | None = None,
        floor: float = 0.1,
        resume: bool = False,
    ) -> None:
        arr = np.asarray(boxes)
        if arr.size == 0:
            arr = arr.reshape(0, 4)
        if arr.ndim != 2 or arr.shape[1] != 4:
            msg = f"{store.path}: boxes must be (n, 4) as (y0, x0, h, w), got shape {arr.shape}"
            raise DataError(msg)
        if not np.issubdtype(arr.dtype, np.integer) and (
            not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.round(arr))
        ):
            msg = f"{store.path}: boxes must be integral heatmap pixels (convert regions to the output grid first)"
            raise DataError(msg)
        self._boxes = arr.astype(np.int64)
        if np.any(self._boxes[:, 2:] <= 0):
            msg = f"{store.path}: every box needs a positive height and width"
            raise DataError(msg)
        if overlap is None:
            overlap = _infer_overlap(self._boxes)
        if overlap < 0 or not 0.0 < floor <= 1.0:
            msg = f"{store.path}: need overlap >= 0 and 0 < floor <= 1, got {overlap} and {floor}"
            raise DataError(msg)
        self.store = store
        self.overlap = int(overlap)
        self.floor = float(floor)
        self._h, self._w = store.shape_yx
        self._band_h = store.chunk
        self._channels = len(store.channel_names)
        self._n_bands = store.n_bands

        # clipped row range of every region, and the bands it touches
        y0 = np.clip(self._boxes[:, 0], 0, self._h)
        y1 = np.clip(self._boxes[:, 0] + self._boxes[:, 2], 0, self._h)
        x0 = np.clip(self._boxes[:, 1], 0, self._w)
        x1 = np.clip(self._boxes[:, 1] + self._boxes[:, 3], 0, self._w)
        inside = (y1 > y0) & (x1 > x0)
        self._b0 = np.where(inside, y0 // self._band_h, 0)
        self._b1 = np.where(inside, (y1 - 1) // self._band_h + 1, 0)  # exclusive

        fingerprint = hashlib.sha256(
            np.ascontiguousarray(self._boxes).tobytes() + f"|{self.overlap}|{self.floor!r}".encode()
        ).hexdigest()
        if resume:
            store.check_regions(fingerprint)
            self._final = store.final_bands()
        else:
            if store.final_bands():
                store.reset_progress()
            store.check_regions(fingerprint)
            self._final = set()

        # regions still needed: those touching a band that is not final
        self._counts = np.zeros(self._n_bands, dtype=np.int64)
        pending = []
        for i in np.flatnonzero(inside):
            bands = range(int(self._b0[i]), int(self._b1[i]))
            if any(b not in self._final for b in bands):
                pending.append(int(i))
                for b in bands:
                    self._counts[b] += 1
        self._pending = pending
        self._added: set[int] = set()
        self._open: dict[int, _Band] = {}
        self.max_open_bands = 0
        self._windows: dict[tuple[int, int], np.ndarray] = {}
        # fixed point: as many fraction bits as the deepest overlap allows in int32 (>= 24 bits, so a
        # lone corner weight floor**2 still resolves ~1e-6), else int64 with 40 bits
        cover = max(self._max_cover(inside), 1)
        bits = int(np.floor(np.log2(_INT32_MAX / cover)))
        self._dtype: type[np.signedinteger[Any]] = np.int32 if bits >= 24 else np.int64
        self._scale = float(2 ** min(bits, 30)) if bits >= 24 else float(2**40)
        logger.debug(
            "%s: stitching %d regions (%d pending, blend ramp %d px) into %d bands (%d final)",
            store.path,
            len(self._boxes),
            len(pending),
            self.overlap,
            self._n_bands,
            len(self._final),
        )
        # bands no pending region touches are final now (zeros, or already written)
        for b in range(self._n_bands):
            if b not in self._final and self._counts[b] == 0:
                self._flush(b)

    # ------------------------------------------------------------------ public API
    @property
    def n_regions(self) -> int:
        """Number of regions given."""
        return len(self._boxes)

    @property
    def open_bands(self) -> int:
        """Number of row bands currently held in memory."""
        return len(self._open)

    @property
    def done(self) -> bool:
        """True when every band is final."""
        return len(self._final) == self._n_bands

    def pending_indices(self) -> list[int]:
        """Return the region indices that must still be computed (those touching a non-final band).

        Returns
        -------
        list of int
            Sorted region indices; regions entirely outside the grid are never pending.
        """
        return [i for i in self._pending if i not in self._added]

    def add(self, index: int, maps: np.ndarray) -> int:
        """Accumulate the maps of one region; write every band that becomes final.

        Parameters
        ----------
        index
            Region index into ``boxes``.
        maps
            ``(channels, h, w)`` float maps in [0, 1] at output resolution for ``boxes[index]``
            (the part outside the grid is ignored).

        Returns
        -------
        int
            Number of row bands this call made final and wrote (0 most of the time).

        Raises
        ------
        DataError
            Unknown or repeated index, wrong shape, or non-finite values.
        StoreError
            Writing a band failed.
        """
        if not 0 <= index < len(self._boxes):
            msg = f"{self.store.path}: region index {index} out of range (0..{len(self._boxes) - 1})"
            raise DataError(msg)
        if index in self._added:
            msg = f"{self.store.path}: region {index} was added twice"
            raise DataError(msg)
        y0, x0, h, w = (int(v) for v in self._boxes[index])
        maps = np.asarray(maps)
        if maps.shape != (self._channels, h, w):
            msg = f"{self.store.path}: region {index} maps have shape {maps.shape}, expected {(self._channels, h, w)}"
            raise DataError(msg)
        self._added.add(index)
        b0, b1 = int(self._b0[index]), int(self._b1[index])
        live = [b for b in range(b0, b1) if b not in self._final]
        if not live:
            return 0
        # clip to the grid
        ya, yb = max(y0, 0), min(y0 + h, self._h)
        xa, xb = max(x0, 0), min(x0 + w, self._w)
        win = self._window(h, w)
        flushed = 0
        for b in live:
            r0 = max(ya, b * self._band_h)
            r1 = min(yb, (b + 1) * self._band_h)
            v = maps[:, r0 - y0 : r1 - y0, xa - x0 : xb - x0]
            if not np.all(np.isfinite(v)):
                msg = f"{self.store.path}: region {index} maps contain NaN or infinite values"
                raise DataError(msg)
            wq = win[r0 - y0 : r1 - y0, xa - x0 : xb - x0]
            band = self._band(b)
            rows = slice(r0 - b * self._band_h, r1 - b * self._band_h)
            vq = np.rint(np.clip(v, 0.0, 1.0) * wq).astype(self._dtype)
            band.acc[:, rows, xa:xb] += vq
            band.wsum[rows, xa:xb] += wq.astype(self._dtype)
            self._counts[b] -= 1
            if self._counts[b] == 0:
                self._flush(b)
                flushed += 1
        return flushed

    def finalize(
        self,
        result: Mapping[str, Any],
        tissue: np.ndarray | None = None,
        threshold: float = 0.5,
        **kwargs: Any,
    ) -> HeatmapStore:
        """Check that every band is final, then :meth:`HeatmapStore.finalize` the store.

        Parameters
        ----------
        result
            Slide-level result.
        tissue
            Tissue mask (see :meth:`HeatmapStore.finalize`).
        threshold
            M+ threshold of the mask label.
        **kwargs
            Passed on (``tissue_mpp``, ``provenance``).

        Returns
        -------
        HeatmapStore
            The complete store.

        Raises
        ------
        StoreError
            Regions are missing, or the store failed to finalize.
        """
        if not self.done:
            missing = len(self.pending_indices())
            msg = f"{self.store.path}: cannot finalize, {missing} region(s) not added yet"
            raise StoreError(msg)
        self.close()
        return self.store.finalize(result, tissue, threshold, **kwargs)

    def close(self) -> None:
        """Release the open bands without writing them (the store keeps its resume record)."""
        self._open.clear()

    def __enter__(self) -> Stitcher:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ internals
    def _window(self, h: int, w: int) -> np.ndarray:
        key = (h, w)
        win = self._windows.get(key)
        if win is None:
            win = np.rint(blend_window(h, w, self.overlap, self.floor) * self._scale)
            self._windows[key] = win
        return win

    def _band(self, b: int) -> _Band:
        band = self._open.get(b)
        if band is None:
            rows = min(self._band_h, self._h - b * self._band_h)
            band = self._open[b] = _Band(self._channels, rows, self._w, self._dtype)
            self.max_open_bands = max(self.max_open_bands, len(self._open))
        return band

    def _flush(self, b: int) -> None:
        band = self._open.pop(b, None)
        values: np.ndarray
        if band is None:
            rows = min(self._band_h, self._h - b * self._band_h)
            values = np.zeros((self._channels, rows, self._w), dtype=np.float32)
        else:
            # channel by channel, to keep the temporaries of a flush at one band-channel
            wsum = band.wsum.astype(np.float32)
            covered = band.wsum > 0
            values = np.zeros(band.acc.shape, dtype=np.float32)
            for c in range(band.acc.shape[0]):
                np.divide(band.acc[c], wsum, out=values[c], where=covered)
            del band, wsum, covered
        self.store.write_band(b, values)
        self._final.add(b)

    def _max_cover(self, inside: np.ndarray) -> int:
        """Upper bound of the number of regions covering one pixel (picks the fixed-point scale).

        Computed over all regions inside the grid, not only the pending ones, so that a resumed run
        uses the same scale as the run it continues (bit-identical output).
        """
        best = 0
        idx = np.flatnonzero(inside)
        if idx.size == 0:
            return 0
        x0 = np.clip(self._boxes[idx, 1], 0, self._w)
        x1 = np.clip(self._boxes[idx, 1] + self._boxes[idx, 3], 0, self._w)
        b0, b1 = self._b0[idx], self._b1[idx]
        for b in range(self._n_bands):
            sel = (b0 <= b) & (b1 > b)
            if not sel.any():
                continue
            diff = np.zeros(self._w + 1, dtype=np.int64)
            np.add.at(diff, x0[sel], 1)
            np.add.at(diff, x1[sel], -1)
            best = max(best, int(np.cumsum(diff).max()))
        return best
