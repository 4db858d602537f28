"""Streaming regions of a slide into PyTorch: an ``IterableDataset`` sharded over DataLoader workers.

Each worker process opens its own slide handle (lazily, in the worker), reads its share of the
regions (region ``i`` goes to worker ``i % num_workers``, so the stream stays close to row-major
order, which keeps the stitcher's open bands few) and yields ``(uint8 CHW tensor, meta)`` pairs.
Nothing is converted to float here: normalisation happens on the model's device.  Memory is
bounded by the DataLoader's prefetch queue (``num_workers * prefetch_factor`` batches), whatever the
slide size.

With ``batch_size`` set (what :func:`make_loader` does), each worker assembles whole batches: the
regions are stacked as ``(B, H, W, 3)`` (one plain copy) and handed on as an NCHW *view* in
``channels_last`` layout, the layout the model runs in on the CPU, so no worker pays for a strided HWC->CHW
transpose and the DataLoader does no per-sample collation (on CUDA the model runs NCHW and the transpose
happens on the GPU after the copy: ``wsltool.infer.run.MEMORY_FORMAT``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from wsltool.errors import SlideReadError, WslError
from wsltool.slide import Slide, open_slide

#: Tile cache per reader handle: a few regions' worth of decoded tiles (each region is read once; overlaps
#: with the previous region reuse them), so reader memory does not grow with slide size (tools/bench/infer.py).
STREAM_CACHE_BYTES = 8 << 20

log = logging.getLogger(__name__)


class RegionStream(IterableDataset[tuple[torch.Tensor, torch.Tensor]]):
    """Regions of one slide as ``(uint8 tensor (3, S, S), int64 tensor [index, gx, gy])`` pairs.

    Parameters
    ----------
    path
        Slide file.
    origins
        ``(N, 2)`` level-0 ``(x, y)`` corners of the regions (``Grid.level0_origins``).
    grid_origins
        ``(N, 2)`` ``(gx, gy)`` corners in grid pixels (``Grid.origins``), passed through as metadata.
    region
        Region side in pixels at ``mpp``.
    mpp
        Resolution to read at.
    indices
        Which regions to stream (default all), e.g. the pending ones when resuming.
    slide_mpp
        Level-0 mpp override for slides without usable metadata.
    backend
        Force a slide backend.
    on_error
        ``"raise"`` (default) or ``"skip"``: what to do when a region cannot be read.
    """

    def __init__(
        self,
        path: str | Path,
        origins: np.ndarray,
        grid_origins: np.ndarray,
        region: int,
        mpp: float,
        *,
        indices: Sequence[int] | np.ndarray | None = None,
        slide_mpp: float | None = None,
        backend: str | None = None,
        on_error: str = "raise",
        batch_size: int | None = None,
    ) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.path = Path(path)
        self.origins = np.asarray(origins, dtype=np.float64)
        self.grid_origins = np.asarray(grid_origins, dtype=np.int64)
        self.region = int(region)
        self.mpp = float(mpp)
        self.indices = np.arange(len(self.origins)) if indices is None else np.asarray(indices, np.int64)
        self.slide_mpp = slide_mpp
        self.backend = backend
        if on_error not in ("raise", "skip"):
            msg = f"on_error must be 'raise' or 'skip', got {on_error!r}"
            raise ValueError(msg)
        self.on_error = on_error
        #: Set by :class:`RegionLoader`: a reader process hands a wsltool error on as an item, which only that
        #: loader turns back into the error (a plain DataLoader gets the error as torch wraps it).
        self.carry_errors = False
        self._slide: Slide | None = None
        self._pid: int | None = None

    @classmethod
    def from_grid(cls, path: str | Path, grid: Any, **kwargs: Any) -> RegionStream:
        """Stream the regions of a :class:`wsltool.tiling.Grid`."""
        return cls(path, grid.level0_origins, grid.origins, grid.config.region, grid.config.mpp, **kwargs)

    def __len__(self) -> int:
        return int(self.indices.size)

    def _handle(self) -> Slide:
        # one handle per process: a handle inherited through fork is not reused
        if self._slide is None or self._pid != os.getpid():
            self._slide = open_slide(self.path, mpp=self.slide_mpp, backend=self.backend)
            self._slide.limit_cache(STREAM_CACHE_BYTES)
            self._pid = os.getpid()
        return self._slide

    def read(self, i: int) -> np.ndarray:
        """Read region ``i`` as ``(S, S, 3)`` uint8."""
        x, y = self.origins[i]
        return self._handle().read_region(float(x), float(y), self.region, self.region, mpp=self.mpp)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        try:
            if self.batch_size:
                yield from self._batches(self.batch_size)
            else:
                yield from self._regions()
        except WslError as exc:
            if get_worker_info() is None or not self.carry_errors:
                raise
            # a reader process hands the error on as an item: the DataLoader would turn it into a RuntimeError
            # carrying the worker's traceback; RegionLoader raises it as it was raised here
            yield _ReaderFailure(exc), torch.empty(0, dtype=torch.int64)  # type: ignore[misc]

    def _regions(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Single regions (no ``batch_size``): worker ``w`` takes regions ``w, w + n, ...``."""
        info = get_worker_info()
        mine = self.indices if info is None else self.indices[info.id :: info.num_workers]
        for i in mine:
            i = int(i)
            try:
                rgb = self.read(i)
            except SlideReadError as exc:
                if self.on_error == "raise":
                    raise
                log.warning("skipping region %d: %s", i, exc)
                continue
            tensor = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))
            gx, gy = self.grid_origins[i]
            yield tensor, torch.tensor([i, int(gx), int(gy)], dtype=torch.int64)

    def _batches(self, bs: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Whole batches: worker ``w`` takes batches ``w, w + n, ...`` of consecutive regions."""
        info = get_worker_info()
        chunks = [self.indices[k : k + bs] for k in range(0, len(self.indices), bs)]
        mine = chunks if info is None else chunks[info.id :: info.num_workers]
        s = self.region
        for chunk in mine:
            # allocated in shared memory when in a worker: handing it to the main process copies nothing
            out = torch.empty((len(chunk), s, s, 3), dtype=torch.uint8)
            if info is not None:
                out.share_memory_()
            buf = out.numpy()
            metas: list[tuple[int, int, int]] = []
            for i in chunk:
                i = int(i)
                try:
                    buf[len(metas)] = self.read(i)
                except SlideReadError as exc:
                    if self.on_error == "raise":
                        raise
                    log.warning("skipping region %d: %s", i, exc)
                    continue
                gx, gy = self.grid_origins[i]
                metas.append((i, int(gx), int(gy)))
            if not metas:
                continue
            yield out[: len(metas)].permute(0, 3, 1, 2), torch.tensor(metas, dtype=torch.int64)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_slide"] = None  # handles never cross process boundaries
        state["_pid"] = None
        return state


class _ReaderFailure:
    """An error raised in a reader process, carried to the main process as a stream item."""

    def __init__(self, error: WslError) -> None:
        self.error = error


class RegionLoader(DataLoader[tuple[torch.Tensor, torch.Tensor]]):
    """A DataLoader over a :class:`RegionStream` that re-raises a reader process's wsltool error as it was.

    Without it, a corrupt tile read in a worker surfaces as a ``RuntimeError`` holding the worker's traceback
    (torch rebuilds worker exceptions from their message alone), instead of the one-line ``SlideReadError``
    that names the slide and the tile.
    """

    def __init__(self, dataset: RegionStream, **kwargs: Any) -> None:
        dataset.carry_errors = True
        super().__init__(dataset, **kwargs)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:  # type: ignore[override]
        for x, meta in super().__iter__():
            if isinstance(x, _ReaderFailure):
                raise x.error
            yield x, meta


def make_loader(
    stream: RegionStream,
    *,
    batch_size: int = 8,
    num_workers: int = 2,
    pin_memory: bool = False,
    persistent_workers: bool = False,
    prefetch_factor: int = 2,
) -> RegionLoader:
    """A :class:`RegionLoader` over a :class:`RegionStream` with bounded prefetching.

    Parameters
    ----------
    stream
        The region stream.
    batch_size
        Regions per batch.
    num_workers
        Reader processes (0 reads in the calling process).
    pin_memory
        Pin batches for fast, non-blocking copies to a GPU.
    persistent_workers
        Keep workers alive between epochs.
    prefetch_factor
        Batches each worker reads ahead (memory bound).
    """
    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        kwargs.update(prefetch_factor=prefetch_factor, persistent_workers=persistent_workers)
    stream.batch_size = batch_size  # batches are assembled in the workers (see the module docstring)
    return RegionLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory, **kwargs)
