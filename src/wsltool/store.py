"""OME-Zarr heatmap store: one versioned store per slide (wsltool heatmap format 1.0).

Layout (NGFF 0.5 on zarr v3; OME metadata under ``attrs["ome"]``)::

    OUT.zarr/                    image group (multiscales + omero), attrs["wsltool"] (see below)
      0, 1, ..., n               float16 (c, y, x) pyramid, chunks (1, chunk, chunk), Blosc zstd
      labels/                    NGFF labels group: ["mask", "tissue"] (written by finalize)
        mask/0..n                uint8 (y, x): M+ >= threshold within tissue
        tissue/0..n              uint8 (y, x): tissue mask resampled to the heatmap grid
      wsltool/region_probs       float32 (region, class) slide-level evidence per region (NaN = not yet)

Level ``i`` has pixel size ``out_mpp * 2**i`` micrometre.  Heatmap pixel ``j`` of level ``i`` covers
slide micrometres ``[j * s_i, (j + 1) * s_i)`` with ``s_i = out_mpp * 2**i``; the translation
``0.5 * (s_i - slide_mpp)`` places it exactly over a slide layer shown with ``scale=(slide_mpp,
slide_mpp)`` (napari puts pixel centres at ``index * scale``).

``attrs["wsltool"]`` holds ``format_version``, ``state`` (``"incomplete"`` until :meth:`finalize`
sets ``"complete"`` as its very last write), ``grid``, ``provenance`` (given by the caller),
``progress`` (the resume record: which level-0 row bands are final, rewritten atomically after
each band is written), ``result``, ``threshold`` and ``chunk_files`` (written by :meth:`finalize`:
the chunk files of each array, which :meth:`open` counts again to refuse a store that lost some).
Channel 0 is ``"M+"``, then one per class (``omero`` channel labels); values are float16 in [0, 1].
Pyramid levels are 2x2 means (odd edges: the mean of the pixels that exist); label levels take every
other pixel.

This module imports neither torch nor Qt.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import zarr
from zarr.codecs import BloscCodec
from zarr.storage import LocalStore

from wsltool.errors import DataError, StoreError, StoreExistsError

__all__ = [
    "FORMAT_VERSION",
    "LABEL_NAMES",
    "MPLUS",
    "RESUME_IGNORED_KEYS",
    "HeatmapStore",
    "RegionTable",
    "level_shapes",
    "level_transforms",
    "mean_downsample2",
]

logger = logging.getLogger(__name__)

FORMAT_VERSION = "1.0"
"""Version of the wsltool heatmap store format written by this module."""

MPLUS = "M+"
"""Name of channel 0 (the normalised malignancy map)."""

LABEL_NAMES = ("mask", "tissue")
"""The NGFF label images of a complete store, in ``labels/``."""

RESUME_IGNORED_KEYS = frozenset(
    {"timings", "workers", "batch", "batch_size", "device", "progress", "threshold", "top_k", "aggregation"}
)
"""Provenance keys (at any depth) that may differ between a run and the run that resumes it (they do
not change the level-0 maps: speed settings, the device, and what :meth:`HeatmapStore.finalize` redoes:
the mask's threshold and the slide score's top-k, whose effective k is the ``aggregation`` text)."""

INCOMPLETE = "incomplete"
COMPLETE = "complete"

_CHANNEL_COLORS = ("FF0000", "00FF00", "0000FF", "FF00FF", "00FFFF", "FFFF00", "FFFFFF")
_LABEL_COLORS = {
    "mask": [{"label-value": 1, "rgba": [255, 0, 0, 255]}],
    "tissue": [{"label-value": 1, "rgba": [0, 160, 255, 255]}],
}
_T = TypeVar("_T")


# ----------------------------------------------------------------------------------------------------
# geometry helpers (public: the napari plugin and the tests use them)
# ----------------------------------------------------------------------------------------------------
def level_shapes(shape_yx: tuple[int, int], chunk: int = 512) -> list[tuple[int, int]]:
    """Return the (y, x) shapes of the pyramid levels.

    Level ``i + 1`` is ``ceil(level_i / 2)``; levels are added until the longer side is below ``chunk``
    (512 by default), so the top level fits in one chunk.

    Parameters
    ----------
    shape_yx
        Level-0 shape in heatmap pixels.
    chunk
        Chunk side in pixels.

    Returns
    -------
    list of tuple of int
        One ``(height, width)`` per level, level 0 first.
    """
    shapes = [(int(shape_yx[0]), int(shape_yx[1]))]
    while max(shapes[-1]) >= chunk:
        h, w = shapes[-1]
        shapes.append(((h + 1) // 2, (w + 1) // 2))
    return shapes


def level_transforms(out_mpp: float, slide_mpp: float, level: int, *, ndim: int = 3) -> list[dict[str, Any]]:
    """Return the NGFF ``coordinateTransformations`` of one pyramid level.

    Parameters
    ----------
    out_mpp
        Level-0 heatmap pixel size in micrometres.
    slide_mpp
        Level-0 slide pixel size in micrometres (the scale of the slide layer it overlays).
    level
        Pyramid level.
    ndim
        3 for the ``(c, y, x)`` image, 2 for the ``(y, x)`` labels.

    Returns
    -------
    list of dict
        ``[scale, translation]`` with ``scale = out_mpp * 2**level`` and translation
        ``0.5 * (scale - slide_mpp)`` on y and x (1 and 0 on c).
    """
    s = float(out_mpp) * 2.0**level
    t = 0.5 * (s - float(slide_mpp))
    lead = [1.0] * (ndim - 2)
    zero = [0.0] * (ndim - 2)
    return [
        {"type": "scale", "scale": [*lead, s, s]},
        {"type": "translation", "translation": [*zero, t, t]},
    ]


def mean_downsample2(a: np.ndarray) -> np.ndarray:
    """Mean of 2x2 blocks over the last two axes; odd edges average the pixels that exist.

    Parameters
    ----------
    a
        Array ``(..., h, w)``.

    Returns
    -------
    numpy.ndarray
        float64 array ``(..., ceil(h / 2), ceil(w / 2))``.
    """
    h, w = a.shape[-2:]
    h2, w2 = (h + 1) // 2, (w + 1) // 2
    out = np.zeros((*a.shape[:-2], h2, w2), dtype=np.float64)
    cnt = np.zeros((h2, w2), dtype=np.float64)
    for dy in (0, 1):
        for dx in (0, 1):
            sub = a[..., dy::2, dx::2]
            sh, sw = sub.shape[-2:]
            out[..., :sh, :sw] += sub
            cnt[:sh, :sw] += 1.0
    out /= cnt
    return out


def _jsonable(value: Any, what: str) -> Any:
    """Return ``value`` as plain JSON data (numpy scalars, paths and tuples converted)."""

    def conv(v: Any) -> Any:
        if isinstance(v, Mapping):
            return {str(k): conv(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [conv(x) for x in v]
        if isinstance(v, np.ndarray):
            return conv(v.tolist())
        if isinstance(v, np.generic):
            return v.item()
        if isinstance(v, os.PathLike):
            return os.fspath(v)
        return v

    out = conv(value)
    try:
        json.dumps(out, allow_nan=False)
    except (TypeError, ValueError) as e:
        msg = f"{what} is not JSON-serialisable: {e}"
        raise DataError(msg) from None
    return out


def _strip(value: Any) -> Any:
    """Drop the keys of :data:`RESUME_IGNORED_KEYS` at any depth (for resume comparisons)."""
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in RESUME_IGNORED_KEYS}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def _diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for k in sorted(set(a) | set(b)):
            out += _diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".") or "value"]


def _read_wsltool_attrs(path: Path) -> dict[str, Any] | None:
    """Return ``attrs["wsltool"]`` of the group at ``path``, or None when it is no wsltool store."""
    if not (path / "zarr.json").is_file():
        return None
    try:
        group = zarr.open_group(store=LocalStore(path, read_only=True), mode="r")
        attrs = group.attrs.get("wsltool")
    except Exception:  # any unreadable metadata means: not one of ours
        return None
    return dict(attrs) if isinstance(attrs, Mapping) and "format_version" in attrs else None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


class HeatmapStore:
    """An OME-Zarr heatmap store (wsltool heatmap format 1.0), one per slide.

    Build one with :meth:`create` (writing) or :meth:`open` (reading); do not call the constructor.
    Level-0 data arrives in chunk-aligned row bands through :meth:`write_band` (normally from
    :class:`wsltool.infer.stitch.Stitcher`); :meth:`finalize` then builds the pyramid and the labels
    and marks the store complete, as its last write.

    Attributes
    ----------
    path
        Where the finished store lives (or will live).
    write_path
        Where this object writes: ``path`` itself, or a hidden sibling while a complete store at
        ``path`` is being overwritten (swapped in by :meth:`finalize`).
    """

    def __init__(self, path: Path, write_path: Path, group: zarr.Group, *, writable: bool) -> None:
        self.path = path
        self.write_path = write_path
        self._group = group
        self._writable = writable
        self._meta: dict[str, Any] = _attr(group, "wsltool")
        self._levels: list[zarr.Array] | None = None
        self._completed_here = False

    # ------------------------------------------------------------------ construction
    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        *,
        shape_yx: tuple[int, int],
        out_mpp: float,
        slide_mpp: float,
        channel_names: Sequence[str],
        provenance: Mapping[str, Any],
        chunk: int = 512,
        overwrite: bool = False,
        resume: bool = False,
    ) -> HeatmapStore:
        """Create (or reopen for resuming) the heatmap store of one slide.

        Parameters
        ----------
        path
            Store directory, conventionally ``*.zarr``.
        shape_yx
            Level-0 heatmap shape ``(height, width)`` in output pixels.
        out_mpp
            Heatmap pixel size in micrometres.
        slide_mpp
            Slide level-0 pixel size in micrometres (for the overlay translation).
        channel_names
            All channel names; the first must be ``"M+"``, then one per class.
        provenance
            JSON-serialisable provenance (slide path, size, fingerprint, requested/effective mpp and
            its source, region/overlap, model fingerprint, method, config, wsltool version, timings).
        chunk
            Chunk side in pixels; also the row-band height of :meth:`write_band`.
        overwrite
            Replace a complete store at ``path``.  The new store is written to a hidden sibling and
            swapped in only by :meth:`finalize`, so a failed run leaves the previous store untouched.
        resume
            Continue an incomplete store made with the same grid, channels and provenance (except
            :data:`RESUME_IGNORED_KEYS`).  A complete, matching store is returned as is
            (``store.complete`` is True; nothing is left to do).

        Returns
        -------
        HeatmapStore
            A writable store in state ``"incomplete"`` (or the complete one, see ``resume``).

        Raises
        ------
        StoreExistsError
            A complete store is in the way and neither ``overwrite`` nor a matching ``resume`` was
            asked for; or something that is not a wsltool store (nor an empty folder) is in the way,
            which is never replaced.
        StoreError
            The location cannot be written, or ``resume`` meets a store made with other settings.
        DataError
            Invalid arguments (shape, mpp, channel names, non-JSON provenance).
        """
        path = Path(path).absolute()
        h, w = (int(shape_yx[0]), int(shape_yx[1]))
        names = [str(n) for n in channel_names]
        if h <= 0 or w <= 0:
            msg = f"{path}: heatmap shape must be positive, got {tuple(shape_yx)}"
            raise DataError(msg)
        if not (out_mpp > 0 and slide_mpp > 0 and math.isfinite(out_mpp) and math.isfinite(slide_mpp)):
            msg = f"{path}: out_mpp and slide_mpp must be positive, got {out_mpp} and {slide_mpp}"
            raise DataError(msg)
        if not names or names[0] != MPLUS or len(set(names)) != len(names):
            msg = f"{path}: channel_names must be unique and start with {MPLUS!r}, got {names}"
            raise DataError(msg)
        if chunk < 16:
            msg = f"{path}: chunk must be at least 16, got {chunk}"
            raise DataError(msg)
        grid = {
            "shape_yx": [h, w],
            "out_mpp": float(out_mpp),
            "slide_mpp": float(slide_mpp),
            "chunk": int(chunk),
            "channel_names": names,
        }
        prov = _jsonable(dict(provenance), f"{path}: provenance")

        existing = _read_wsltool_attrs(path)
        write_path = path
        if existing is not None and existing.get("state") == COMPLETE:
            if resume and not overwrite:
                problems = cls._mismatch(existing, grid, prov)
                if problems:
                    msg = (
                        f"{path}: a complete heatmap store made with other settings ({', '.join(problems)})"
                        " is in the way; use --overwrite to replace it"
                    )
                    raise StoreExistsError(msg)
                logger.info("%s: complete store with the same settings found; nothing to resume", path)
                try:
                    return cls.open(path)
                except StoreError as exc:
                    msg = f"{exc}; use --overwrite to replace it"
                    raise StoreExistsError(msg) from exc
            if not overwrite:
                msg = f"{path}: a complete heatmap store is in the way; use --overwrite to replace it"
                raise StoreExistsError(msg)
            write_path = path.with_name(f".{path.name}.wsltool-partial")
        elif existing is None and (path.is_file() or path.is_symlink() or (path.is_dir() and any(path.iterdir()))):
            # never replaced, not even with overwrite: it may be anything (a folder of the user's)
            msg = f"{path}: exists and is not a wsltool heatmap store; choose another output path"
            raise StoreExistsError(msg)

        # ``write_path`` is now either ``path`` (absent, empty or an incomplete store) or the sibling.
        partial = _read_wsltool_attrs(write_path)
        if partial is not None and resume and partial.get("state") == INCOMPLETE:
            problems = cls._mismatch(partial, grid, prov)
            if not problems and not cls._open_for_writing(path, write_path)._created():
                # killed while being created (no data written yet): start over below
                logger.warning("%s: the incomplete store was interrupted while being created", path)
            elif not problems:
                store = cls._open_for_writing(path, write_path)
                store._meta["resumed"] = int(store._meta.get("resumed", 0)) + 1
                store._save_meta()  # also proves the location is still writable, before any work
                logger.info(
                    "%s: resuming (%d of %d row bands already final)",
                    path,
                    len(store.final_bands()),
                    store.n_bands,
                )
                return store
            elif not overwrite:
                msg = (
                    f"{path}: the incomplete store was started with other settings ({', '.join(problems)});"
                    " use --overwrite to start over"
                )
                raise StoreError(msg)
        if partial is not None:
            logger.warning("%s: discarding the incomplete store at %s and starting over", path, write_path)
        return cls._create_fresh(path, write_path, grid, prov)

    def _created(self) -> bool:
        """True when :meth:`_create_fresh` finished: multiscales metadata and every pyramid array exist."""
        try:
            return len(self.levels) == len(level_shapes(self.shape_yx, self.chunk))
        except (KeyError, IndexError, TypeError, ValueError, OSError):
            return False

    @staticmethod
    def _mismatch(meta: Mapping[str, Any], grid: dict[str, Any], prov: Any) -> list[str]:
        problems = [f"grid.{k}" for k in _diff_keys(meta.get("grid"), grid)]
        problems += [f"provenance.{k}" for k in _diff_keys(_strip(meta.get("provenance")), _strip(prov))]
        return problems

    @classmethod
    def _create_fresh(cls, path: Path, write_path: Path, grid: dict[str, Any], prov: Any) -> HeatmapStore:
        h, w = grid["shape_yx"]
        chunk = grid["chunk"]
        names = grid["channel_names"]
        shapes = level_shapes((h, w), chunk)
        n_bands = -(-h // chunk)
        meta = {
            "format_version": FORMAT_VERSION,
            "state": INCOMPLETE,
            "grid": grid,
            "provenance": prov,
            "progress": {"band_height": chunk, "n_bands": n_bands, "final_bands": [], "regions_sha256": None},
            "result": None,
            "threshold": None,
        }
        try:
            if write_path.exists() or write_path.is_symlink():
                _remove(write_path)
            write_path.mkdir(parents=True, exist_ok=True)
            # the group's first metadata write already says: wsltool store, state incomplete
            group = zarr.open_group(store=LocalStore(write_path), mode="w", zarr_format=3, attributes={"wsltool": meta})
            for i, (lh, lw) in enumerate(shapes):
                group.create_array(
                    str(i),
                    shape=(len(names), lh, lw),
                    dtype="float16",
                    chunks=(1, chunk, chunk),
                    fill_value=0.0,
                    dimension_names=["c", "y", "x"],
                    compressors=BloscCodec(cname="zstd", clevel=5, shuffle="shuffle"),
                )
            datasets = [
                {"path": str(i), "coordinateTransformations": level_transforms(grid["out_mpp"], grid["slide_mpp"], i)}
                for i in range(len(shapes))
            ]
            omero = {
                "channels": [
                    {
                        "label": n,
                        "color": _CHANNEL_COLORS[i % len(_CHANNEL_COLORS)],
                        "window": {"min": 0.0, "max": 1.0, "start": 0.0, "end": 1.0},
                        "active": i == 0,
                        "coefficient": 1.0,
                        "family": "linear",
                        "inverted": False,
                    }
                    for i, n in enumerate(names)
                ],
                "rdefs": {"model": "color"},
            }
            from ome_zarr.format import FormatV05  # heavy (dask, ...): only where a store is written
            from ome_zarr.writer import write_multiscales_metadata

            write_multiscales_metadata(
                group,
                datasets,
                fmt=FormatV05(),
                axes=[
                    {"name": "c", "type": "channel"},
                    {"name": "y", "type": "space", "unit": "micrometer"},
                    {"name": "x", "type": "space", "unit": "micrometer"},
                ],
                name="heatmap",
                metadata={"omero": omero, "method": "mean of 2x2 blocks (wsltool.store.mean_downsample2)"},
            )
            _set_multiscale_type(group, "mean")
        except OSError as e:
            msg = f"{path}: cannot create the heatmap store at {write_path}: {e.strerror or e}"
            raise StoreError(msg) from e
        logger.info(
            "%s: created heatmap store %dx%d px at %.4g µm/px, %d levels", path, h, w, grid["out_mpp"], len(shapes)
        )
        return cls._open_for_writing(path, write_path)

    @classmethod
    def _open_for_writing(cls, path: Path, write_path: Path) -> HeatmapStore:
        try:
            group = zarr.open_group(store=LocalStore(write_path), mode="r+")
        except OSError as e:
            msg = f"{path}: cannot open the heatmap store for writing: {e.strerror or e}"
            raise StoreError(msg) from e
        return cls(path, write_path, group, writable=True)

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> HeatmapStore:
        """Open a heatmap store read-only.

        Parameters
        ----------
        path
            Store directory.

        Returns
        -------
        HeatmapStore
            The store; check :attr:`complete` before trusting its data.

        Raises
        ------
        StoreError
            Nothing there, not a wsltool heatmap store, or a format version this wsltool cannot read.
        """
        p = Path(path).absolute()
        if not p.exists():
            msg = f"{p}: no heatmap store here (path does not exist)"
            raise StoreError(msg)
        meta = _read_wsltool_attrs(p)
        if meta is None:
            msg = f"{p}: not a wsltool heatmap store (no zarr v3 group with wsltool attributes)"
            raise StoreError(msg)
        major = str(meta["format_version"]).split(".")[0]
        if major != FORMAT_VERSION.split(".")[0]:
            msg = (
                f"{p}: heatmap store format {meta['format_version']} is not readable by this wsltool"
                f" (it reads {FORMAT_VERSION})"
            )
            raise StoreError(msg)
        group = zarr.open_group(store=LocalStore(p, read_only=True), mode="r")
        store = cls(p, p, group, writable=False)
        problem = store._layout_problem()
        if problem is not None:
            msg = f"{p}: corrupt heatmap store: {problem}"
            raise StoreError(msg)
        return store

    def _layout_problem(self) -> str | None:
        """What is missing or unreadable in an opened store that its attributes promise, or None.

        Metadata (a few small ``zarr.json`` reads) and, in a complete store, the number of chunk files of each
        array against the count :meth:`finalize` recorded: zarr would read a lost chunk as the fill value, as it
        does the all-fill chunks a store never writes.  Stores written before the record (no ``chunk_files``)
        are not counted.
        """
        for key, subkeys in (
            ("grid", ("shape_yx", "chunk", "channel_names", "out_mpp", "slide_mpp")),
            ("progress", ("n_bands", "final_bands")),
            ("provenance", ()),
            ("state", ()),
        ):
            value = self._meta.get(key)
            if value is None:
                return f"wsltool attribute {key!r} missing"
            missing = [k for k in subkeys if k not in value]
            if missing:
                return f"wsltool attribute '{key}.{missing[0]}' missing"
        levels, problem = _level_arrays(self._group, "")
        if problem and not self.complete:  # its arrays were never all made: _create_fresh did not finish
            return "interrupted while being created, before any data (run it again to start over)"
        if problem:
            return problem
        self._levels = levels
        if self.complete:
            for name in ("mask", "tissue"):
                try:
                    group = _subgroup(_subgroup(self._group, "labels"), name)
                except Exception:  # missing (KeyError), damaged zarr.json (ValueError), not a group (StoreError)
                    return f"label image {name!r} missing or unreadable"
                _, problem = _level_arrays(group, f" of label image {name!r}")
                if problem:
                    return problem
            written = self._meta.get("chunk_files") or {}
            for path, n in sorted(written.items()):
                try:
                    found = _chunk_files(self.path / path)
                except OSError as exc:
                    return f"chunk files of array {path!r} unreadable ({exc.strerror or exc})"
                if found < n:
                    return f"{n - found} of {n} chunk files of array {path!r} missing"
        return None

    # ------------------------------------------------------------------ properties
    @property
    def state(self) -> str:
        """``"incomplete"`` or ``"complete"``."""
        return str(self._meta["state"])

    @property
    def complete(self) -> bool:
        """True once :meth:`finalize` has finished."""
        return self.state == COMPLETE

    @property
    def format_version(self) -> str:
        """The store's format version (``"1.0"``)."""
        return str(self._meta["format_version"])

    @property
    def provenance(self) -> dict[str, Any]:
        """Provenance as given to :meth:`create` (updated by :meth:`finalize`)."""
        return dict(self._meta["provenance"])

    @property
    def result(self) -> dict[str, Any] | None:
        """Slide-level result set by :meth:`finalize`, None before."""
        r = self._meta.get("result")
        return None if r is None else dict(r)

    @property
    def threshold(self) -> float | None:
        """M+ threshold of the mask label (set by :meth:`finalize`)."""
        t = self._meta.get("threshold")
        return None if t is None else float(t)

    @property
    def out_mpp(self) -> float:
        """Level-0 heatmap pixel size in micrometres."""
        return float(self._meta["grid"]["out_mpp"])

    @property
    def slide_mpp(self) -> float:
        """Slide level-0 pixel size in micrometres."""
        return float(self._meta["grid"]["slide_mpp"])

    @property
    def shape_yx(self) -> tuple[int, int]:
        """Level-0 heatmap shape ``(height, width)``."""
        h, w = self._meta["grid"]["shape_yx"]
        return int(h), int(w)

    @property
    def chunk(self) -> int:
        """Chunk side in pixels (and the row-band height)."""
        return int(self._meta["grid"]["chunk"])

    @property
    def channel_names(self) -> list[str]:
        """Channel names: ``"M+"`` then one per class."""
        return list(self._meta["grid"]["channel_names"])

    @property
    def n_bands(self) -> int:
        """Number of level-0 row bands (``ceil(height / chunk)``)."""
        return int(self._meta["progress"]["n_bands"])

    @property
    def levels(self) -> list[zarr.Array]:
        """The pyramid arrays ``(c, y, x)``, level 0 first (paths read from the multiscales metadata)."""
        if self._levels is None:
            datasets = self._ome(self._group)["multiscales"][0]["datasets"]
            self._levels = [self._array(self._group, d["path"]) for d in datasets]
        return self._levels

    # ------------------------------------------------------------------ reading
    def mplus(self, level: int = 0) -> np.ndarray:
        """Return the M+ map of one level.

        Parameters
        ----------
        level
            Pyramid level.

        Returns
        -------
        numpy.ndarray
            float16 ``(y, x)`` in [0, 1].

        Raises
        ------
        StoreError
            The store is incomplete.
        """
        return self.channel(0, level)

    def channel(self, channel: int | str, level: int = 0) -> np.ndarray:
        """Return one channel (by index or name) of one level as float16 ``(y, x)``.

        Parameters
        ----------
        channel
            Index or name (see :attr:`channel_names`).
        level
            Pyramid level.

        Returns
        -------
        numpy.ndarray
            float16 ``(y, x)``.

        Raises
        ------
        StoreError
            The store is incomplete.
        """
        self._require_complete()
        n = len(self.channel_names)
        c = self.channel_names.index(channel) if isinstance(channel, str) else int(channel)
        if not -n <= c < n:
            msg = f"{self.path}: channel {c} out of range (the store has {n}: {', '.join(self.channel_names)})"
            raise IndexError(msg)
        return self._read_plane(self.levels[level], (c % n,))

    def mask(self, level: int = 0) -> np.ndarray:
        """Return the binary mask label (M+ >= threshold within tissue) as uint8 ``(y, x)``.

        Parameters
        ----------
        level
            Pyramid level.

        Returns
        -------
        numpy.ndarray
            uint8 ``(y, x)`` of 0 and 1.
        """
        return self.label("mask", level)

    def tissue(self, level: int = 0) -> np.ndarray:
        """Return the tissue label resampled to the heatmap grid as uint8 ``(y, x)``.

        Parameters
        ----------
        level
            Pyramid level.

        Returns
        -------
        numpy.ndarray
            uint8 ``(y, x)`` of 0 and 1.
        """
        return self.label("tissue", level)

    def label_array(self, name: str, level: int = 0) -> zarr.Array:
        """The zarr array of one label image level (for lazy readers such as the napari plugin)."""
        self._require_complete()
        g = _subgroup(_subgroup(self._group, "labels"), name)
        return self._array(g, self._ome(g)["multiscales"][0]["datasets"][level]["path"])

    def label(self, name: str, level: int = 0) -> np.ndarray:
        """Return one label image (``"mask"`` or ``"tissue"``) of one level.

        Parameters
        ----------
        name
            Label name.
        level
            Pyramid level.

        Returns
        -------
        numpy.ndarray
            uint8 ``(y, x)``.
        """
        self._require_complete()
        g = _subgroup(_subgroup(self._group, "labels"), name)
        path = self._ome(g)["multiscales"][0]["datasets"][level]["path"]
        return self._read_plane(self._array(g, path), ())

    def _read_plane(self, arr: zarr.Array, lead: tuple[int, ...]) -> np.ndarray:
        """``arr[lead]`` (a whole ``(y, x)`` plane); a chunk that cannot be decoded is a StoreError naming it.

        zarr reads the chunks concurrently and raises the codec's bare error (``RuntimeError: error during
        blosc decompression``) for a damaged one; only then is the plane read again chunk by chunk, to say which.
        """
        try:
            return np.asarray(arr[lead])
        except (MemoryError, IndexError, TypeError):  # the caller's request, not the data
            raise
        except Exception as exc:  # codec errors (RuntimeError, ValueError, ...) and I/O errors
            first = exc
        ch, cw = arr.chunks[-2:]
        for r0 in range(0, arr.shape[-2], ch):
            for c0 in range(0, arr.shape[-1], cw):
                window: tuple[int | slice, ...] = (*lead, slice(r0, r0 + ch), slice(c0, c0 + cw))
                try:
                    arr[window]
                except Exception as exc:
                    key = "/".join(str(i) for i in (*lead, r0 // ch, c0 // cw))
                    msg = (
                        f"{self.path}: corrupt heatmap store: chunk {key} of array {arr.path!r} unreadable"
                        f" ({type(exc).__name__}: {exc})"
                    )
                    raise StoreError(msg) from exc
        msg = f"{self.path}: array {arr.path!r} could not be read ({type(first).__name__}: {first})"
        raise StoreError(msg) from first

    def final_bands(self) -> set[int]:
        """Return the level-0 row bands already written and recorded as final (the resume record)."""
        return {int(b) for b in self._meta["progress"]["final_bands"]}

    # ------------------------------------------------------------------ writing
    def region_table(self, n_regions: int, n_classes: int) -> RegionTable:
        """Return the per-region class-probability table (persisted for resume).

        A float32 ``(n_regions, n_classes)`` zarr array at ``wsltool/region_probs`` (NaN until written),
        so a resumed run can aggregate the slide-level result over every region, including those
        computed before the interruption.  Write a region's row before adding its maps to the
        Stitcher (then a final band implies the probabilities of its regions are stored).

        Parameters
        ----------
        n_regions
            Number of regions (the Stitcher's boxes).
        n_classes
            Number of classes.

        Returns
        -------
        RegionTable
            ``table[indices] = probs`` and ``table[:]``; failed writes raise :class:`StoreError`.
        """
        self._require_writable()
        shape = (int(n_regions), int(n_classes))

        def get() -> zarr.Array:
            g = self._group.require_group("wsltool")
            if "region_probs" in g:
                arr = g["region_probs"]
                if isinstance(arr, zarr.Array) and tuple(arr.shape) == shape:
                    return arr
                del g["region_probs"]
            return g.create_array(
                "region_probs",
                shape=shape,
                dtype="float32",
                chunks=(max(1, min(shape[0], 16384)), max(1, shape[1])),
                fill_value=float("nan"),
                dimension_names=["region", "class"],
            )

        return RegionTable(self._io(get, "creating the region table"), self)

    def set_timings(self, timings: Mapping[str, float]) -> None:
        """Merge ``timings`` into ``provenance["timings"]``; allowed on a store this object completed.

        Parameters
        ----------
        timings
            Seconds per stage.
        """
        if not (self._writable or self._completed_here):
            self._require_writable()
        t = _jsonable(dict(timings), f"{self.path}: timings")
        self._meta["provenance"] = {
            **self._meta["provenance"],
            "timings": {**self._meta["provenance"].get("timings", {}), **t},
        }
        if self._writable:
            self._save_meta()
            return
        group = zarr.open_group(store=LocalStore(self.path), mode="r+")

        def put() -> None:
            group.attrs["wsltool"] = self._meta

        self._io(put, "writing the timings")
        self._group = zarr.open_group(store=LocalStore(self.path, read_only=True), mode="r")
        self._levels = None

    def reset_progress(self) -> None:
        """Forget the resume record (every band counts as not final again)."""
        self._require_writable()
        self._meta["progress"]["final_bands"] = []
        self._save_meta()

    def check_regions(self, fingerprint: str) -> None:
        """Record the fingerprint of the region list, or check it against the recorded one.

        Parameters
        ----------
        fingerprint
            Hex digest of the region boxes (computed by the Stitcher).

        Raises
        ------
        StoreError
            A different region list was recorded by the run being resumed.
        """
        self._require_writable()
        recorded = self._meta["progress"].get("regions_sha256")
        if recorded is None or not self._meta["progress"]["final_bands"]:
            if recorded != fingerprint:
                self._meta["progress"]["regions_sha256"] = fingerprint
                self._save_meta()
        elif recorded != fingerprint:
            msg = f"{self.path}: the store was started with a different region list; use --overwrite to start over"
            raise StoreError(msg)

    def write_band(self, band: int, values: np.ndarray) -> None:
        """Write one final level-0 row band and record it in the resume record.

        Parameters
        ----------
        band
            Band index; rows ``[band * chunk, min((band + 1) * chunk, height))``.
        values
            ``(channels, rows, width)`` in [0, 1] (stored as float16, clipped to [0, 1]).

        Raises
        ------
        StoreError
            The write failed (disk full, I/O error); the store stays incomplete.
        """
        self._require_writable()
        h, w = self.shape_yx
        r0 = band * self.chunk
        r1 = min(r0 + self.chunk, h)
        if not 0 <= band < self.n_bands:
            msg = f"{self.path}: band {band} out of range (0..{self.n_bands - 1})"
            raise DataError(msg)
        expected = (len(self.channel_names), r1 - r0, w)
        if values.shape != expected:
            msg = f"{self.path}: band {band} has shape {values.shape}, expected {expected}"
            raise DataError(msg)
        data = np.empty(values.shape, dtype=np.float16)
        np.clip(values, 0.0, 1.0, out=data)

        def put() -> None:
            self.levels[0][:, r0:r1, :] = data

        self._io(put, f"writing row band {band}")
        done = self.final_bands() | {band}
        self._meta["progress"]["final_bands"] = sorted(done)
        self._save_meta()
        logger.debug("%s: band %d final (%d/%d)", self.path, band, len(done), self.n_bands)

    def finalize(
        self,
        result: Mapping[str, Any],
        tissue: np.ndarray | Any | None = None,
        threshold: float = 0.5,
        *,
        tissue_mpp: float | None = None,
        provenance: Mapping[str, Any] | None = None,
    ) -> HeatmapStore:
        """Build the pyramid and the labels, store the result and mark the store complete (last).

        Works band by band (memory bounded by a few row bands of the widest level).  When a complete
        store was being overwritten, the new store is swapped in at :attr:`path` at the very end.

        Parameters
        ----------
        result
            JSON-serialisable slide-level result (class probabilities, aggregation, ...).
        tissue
            Tissue mask (any shape, boolean or 0/1) covering the slide from its top-left corner, or an
            object with ``mask`` and ``mpp`` (a :class:`wsltool.tissue.TissueMask`); resampled to the
            heatmap grid by nearest neighbour at heatmap pixel centres.  None: everything is tissue.
        threshold
            ``mask = (M+ >= threshold) & tissue``.
        tissue_mpp
            Pixel size of ``tissue`` in micrometres (taken from ``tissue.mpp`` when it has one).
            None with a plain array: the array spans the heatmap grid exactly.
        provenance
            Entries merged into the provenance (for example final timings).

        Returns
        -------
        HeatmapStore
            ``self``, now complete (and pointing at :attr:`path`).

        Raises
        ------
        StoreError
            Bands are missing, the store is not writable, or a write failed (the store stays
            incomplete and any previous store at :attr:`path` stays untouched).
        """
        self._require_writable()
        missing = self.n_bands - len(self.final_bands())
        if missing:
            msg = f"{self.path}: cannot finalize, {missing} of {self.n_bands} row bands not written yet"
            raise StoreError(msg)
        res = _jsonable(dict(result), f"{self.path}: result")
        prov_update = _jsonable(dict(provenance or {}), f"{self.path}: provenance")
        if not 0.0 <= threshold <= 1.0:
            msg = f"{self.path}: threshold must be in [0, 1], got {threshold}"
            raise DataError(msg)
        if tissue is not None and not isinstance(tissue, np.ndarray) and hasattr(tissue, "mpp"):
            # a wsltool.tissue.TissueMask (or alike): the mask and its resolution
            tissue_mpp = float(tissue.mpp) if tissue_mpp is None else tissue_mpp
            tissue = getattr(tissue, "mask", tissue)
        tmask = None if tissue is None else np.asarray(tissue)
        if tmask is not None and tmask.ndim != 2:
            msg = f"{self.path}: tissue mask must be 2-D, got shape {tmask.shape}"
            raise DataError(msg)

        self._io(self._build_pyramid, "building the pyramid")
        self._io(lambda: self._write_labels(tmask, float(threshold), tissue_mpp), "writing the labels")
        # what was written, so that open() finds a chunk lost later (zarr would read it as the fill value)
        self._meta["chunk_files"] = self._io(self._count_chunk_files, "counting the chunk files")
        self._meta["result"] = res
        self._meta["threshold"] = float(threshold)
        self._meta["provenance"] = {**self._meta["provenance"], **prov_update}
        self._save_meta()
        self._meta["state"] = COMPLETE
        self._save_meta()  # the state flips last; zarr writes zarr.json atomically (temp file + rename)
        if self.write_path != self.path:
            self._swap_in()
        self._writable = False
        self._completed_here = True
        logger.info("%s: heatmap store complete", self.path)
        return self

    # ------------------------------------------------------------------ internals
    def _build_pyramid(self) -> None:
        levels = self.levels
        step = self.chunk
        for i in range(1, len(levels)):
            src, dst = levels[i - 1], levels[i]
            # one destination chunk at a time (from 2x2 source chunks): memory is a few chunks
            for c in range(dst.shape[0]):
                for r0 in range(0, dst.shape[1], step):
                    r1 = min(r0 + step, dst.shape[1])
                    for c0 in range(0, dst.shape[2], step):
                        c1 = min(c0 + step, dst.shape[2])
                        block = np.asarray(src[c, 2 * r0 : 2 * r1, 2 * c0 : 2 * c1]).astype(np.float64)
                        dst[c, r0:r1, c0:c1] = mean_downsample2(block).astype(np.float16)

    def _write_labels(self, tissue: np.ndarray | None, threshold: float, tissue_mpp: float | None) -> None:
        from ome_zarr.format import FormatV05
        from ome_zarr.writer import write_label_metadata, write_multiscales_metadata

        h, w = self.shape_yx
        shapes = level_shapes((h, w), self.chunk)
        if "labels" in self._group:
            del self._group["labels"]
        labels = self._group.create_group("labels")
        labels.attrs["ome"] = {"version": FormatV05().version, "labels": []}
        groups: dict[str, zarr.Group] = {}
        for name in LABEL_NAMES:
            g = labels.create_group(name)
            for i, (lh, lw) in enumerate(shapes):
                g.create_array(
                    str(i),
                    shape=(lh, lw),
                    dtype="uint8",
                    chunks=(self.chunk, self.chunk),
                    fill_value=0,
                    dimension_names=["y", "x"],
                    compressors=BloscCodec(cname="zstd", clevel=5, shuffle="noshuffle"),
                )
            groups[name] = g
        mplus0 = self.levels[0]
        cols = self._tissue_index(tissue, w, 1, tissue_mpp)
        for r0 in range(0, h, self.chunk):
            r1 = min(r0 + self.chunk, h)
            if tissue is None:
                t = np.ones((r1 - r0, w), dtype=np.uint8)
            else:
                rows = self._tissue_index(tissue, h, 0, tissue_mpp, r0, r1)
                t = _take2(tissue, rows, cols)
            m = (np.asarray(mplus0[0, r0:r1, :]) >= np.float16(threshold)) & (t > 0)
            self._array(groups["tissue"], "0")[r0:r1, :] = t
            self._array(groups["mask"], "0")[r0:r1, :] = m.astype(np.uint8)
        for name, g in groups.items():
            for i in range(1, len(shapes)):
                src, dst = self._array(g, str(i - 1)), self._array(g, str(i))
                for r0 in range(0, dst.shape[0], self.chunk):
                    r1 = min(r0 + self.chunk, dst.shape[0])
                    dst[r0:r1, :] = np.asarray(src[2 * r0 : 2 * r1, :])[::2, ::2]
            write_multiscales_metadata(
                g,
                [
                    {
                        "path": str(i),
                        "coordinateTransformations": level_transforms(self.out_mpp, self.slide_mpp, i, ndim=2),
                    }
                    for i in range(len(shapes))
                ],
                fmt=FormatV05(),
                axes=[
                    {"name": "y", "type": "space", "unit": "micrometer"},
                    {"name": "x", "type": "space", "unit": "micrometer"},
                ],
                name=name,
            )
            _set_multiscale_type(g, "nearest")
            write_label_metadata(labels, name, colors=_LABEL_COLORS[name], fmt=FormatV05(), source={"image": "../../"})

    def _count_chunk_files(self) -> dict[str, int]:
        """Chunk files on disk per array of the store (all-fill chunks are never written, so not every chunk)."""
        root = self.write_path
        arrays = [path for path, node in self._group.members(max_depth=None) if isinstance(node, zarr.Array)]
        return {path: _chunk_files(root / path) for path in sorted(arrays)}

    def _tissue_index(
        self, tissue: np.ndarray | None, n: int, axis: int, tissue_mpp: float | None, r0: int = 0, r1: int | None = None
    ) -> np.ndarray:
        """Indices into ``tissue`` along ``axis`` for heatmap pixels ``r0..r1`` (-1 outside the mask)."""
        if tissue is None:
            return np.zeros(0, dtype=np.int64)
        r1 = n if r1 is None else r1
        centres = np.arange(r0, r1, dtype=np.float64) + 0.5
        tn = tissue.shape[axis]
        idx = np.floor(centres * self.out_mpp / tissue_mpp) if tissue_mpp else np.floor(centres * tn / n)
        idx = idx.astype(np.int64)
        idx[(idx < 0) | (idx >= tn)] = -1
        return idx

    def _swap_in(self) -> None:
        """Move the complete new store from :attr:`write_path` to :attr:`path`, the old one aside first."""
        old: Path | None = self.path.with_name(f".{self.path.name}.wsltool-old-{uuid.uuid4().hex[:8]}")
        if not (self.path.exists() or self.path.is_symlink()):  # the old store went away meanwhile
            old = None
        if old is not None:
            try:
                os.replace(self.path, old)
            except OSError as e:
                msg = (
                    f"{self.path}: the new store is complete at {self.write_path} but the old one could not"
                    f" be moved aside: {e.strerror or e}"
                )
                raise StoreError(msg) from e
        try:
            os.replace(self.write_path, self.path)
        except OSError as e:
            if old is not None:
                os.replace(old, self.path)
            msg = f"{self.path}: could not swap in the new store from {self.write_path}: {e.strerror or e}"
            raise StoreError(msg) from e
        self.write_path = self.path
        self._group = zarr.open_group(store=LocalStore(self.path, read_only=True), mode="r")
        self._levels = None
        if old is not None:
            try:
                _remove(old)
            except OSError as e:  # the new store is in place; a leftover is only untidy
                logger.warning("%s: could not remove the previous store moved to %s: %s", self.path, old, e)

    def _save_meta(self) -> None:
        def put() -> None:
            self._group.attrs["wsltool"] = self._meta

        self._io(put, "writing the store attributes")

    def _io(self, fn: Callable[[], _T], what: str) -> _T:
        try:
            return fn()
        except OSError as e:
            msg = f"{self.path}: {what} failed: {e.strerror or e}; the store is left incomplete"
            raise StoreError(msg) from e

    def _require_writable(self) -> None:
        if not self._writable:
            why = "complete" if self.complete else "opened read-only"
            msg = f"{self.path}: the heatmap store is {why} and cannot be written"
            raise StoreError(msg)

    def _require_complete(self) -> None:
        if not self.complete:
            msg = f"{self.path}: the heatmap store is incomplete (an interrupted run); finish it with --resume"
            raise StoreError(msg)

    @staticmethod
    def _ome(group: zarr.Group) -> dict[str, Any]:
        return _attr(group, "ome")

    @staticmethod
    def _array(group: zarr.Group, path: str) -> zarr.Array:
        arr = group[path]
        assert isinstance(arr, zarr.Array)
        return arr

    def __repr__(self) -> str:
        h, w = self.shape_yx
        return f"HeatmapStore({str(self.path)!r}, {h}x{w} @ {self.out_mpp:g} µm, {self.channel_names}, {self.state})"

    def iter_bands(self) -> Iterator[tuple[int, int]]:
        """Yield the level-0 row bands as ``(first_row, stop_row)``."""
        h = self.shape_yx[0]
        for r0 in range(0, h, self.chunk):
            yield r0, min(r0 + self.chunk, h)


class RegionTable:
    """Per-region class probabilities inside a store (see :meth:`HeatmapStore.region_table`).

    Parameters
    ----------
    array
        The zarr array.
    store
        Its store (for error messages).
    """

    def __init__(self, array: zarr.Array, store: HeatmapStore) -> None:
        self.array = array
        self._store = store

    @property
    def shape(self) -> tuple[int, ...]:
        """``(n_regions, n_classes)``."""
        return tuple(self.array.shape)

    def __len__(self) -> int:
        return int(self.array.shape[0])

    def __setitem__(self, index: Any, value: Any) -> None:
        idx = np.asarray(index) if not isinstance(index, slice | int) else index

        def put() -> None:
            if isinstance(idx, np.ndarray):
                self.array.oindex[idx, :] = np.asarray(value, dtype=np.float32)
            else:
                self.array[idx] = np.asarray(value, dtype=np.float32)

        self._store._io(put, "writing region probabilities")

    def __getitem__(self, index: Any) -> np.ndarray:
        if isinstance(index, np.ndarray | list):
            return np.asarray(self.array.oindex[np.asarray(index), :])
        return np.asarray(self.array[index])


def _take2(a: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``a[rows][:, cols] > 0`` as uint8, with index -1 meaning outside (0)."""
    out = (a[np.clip(rows, 0, None)][:, np.clip(cols, 0, None)] > 0).astype(np.uint8)
    out[rows < 0, :] = 0
    out[:, cols < 0] = 0
    return out


def _attr(group: zarr.Group, key: str) -> dict[str, Any]:
    value = group.attrs[key]
    if not isinstance(value, Mapping):
        msg = f"{group.store_path}: attribute {key!r} is not a mapping"
        raise StoreError(msg)
    return dict(value)


def _level_arrays(group: zarr.Group, where: str) -> tuple[list[zarr.Array], str | None]:
    """The multiscale arrays of ``group``, or what is missing or unreadable among them (``where``: for the message)."""
    try:
        paths = [str(d["path"]) for d in _attr(group, "ome")["multiscales"][0]["datasets"]]
    except Exception:  # no or damaged OME metadata: KeyError, IndexError, TypeError, StoreError
        return [], f"OME multiscales metadata{where} missing or unreadable"
    arrays = []
    for path in paths:
        try:
            node = group.get(path)
        except Exception as exc:  # a damaged zarr.json: ValueError (JSON), zarr's metadata errors
            return [], f"level array {path!r}{where} unreadable ({type(exc).__name__})"
        if not isinstance(node, zarr.Array):
            return [], f"level array {path!r}{where} missing"
        arrays.append(node)
    return arrays, None


def _chunk_files(array_dir: Path) -> int:
    """The chunk files of a zarr v3 array: files named by a chunk index under its ``c/`` folder.

    Symlinks are followed (a link whose target is gone is not a chunk); other files (``.DS_Store``, editor or
    copy leftovers) are not counted.

    Raises
    ------
    OSError
        A folder under ``c/`` cannot be listed.
    """
    top = array_dir / "c"
    if not top.is_dir():
        return 0

    def fail(exc: OSError) -> None:
        raise exc

    n, seen = 0, set()
    for folder, subfolders, files in os.walk(top, onerror=fail, followlinks=True):
        st = os.stat(folder)
        if (st.st_dev, st.st_ino) in seen:  # a symlink loop, or a folder reached twice
            subfolders[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        n += sum(1 for f in files if f.isdigit() and os.path.isfile(os.path.join(folder, f)))
    return n


def _subgroup(group: zarr.Group, name: str) -> zarr.Group:
    g = group[name]
    if not isinstance(g, zarr.Group):
        msg = f"{group.store_path}: {name!r} is not a group"
        raise StoreError(msg)
    return g


def _set_multiscale_type(group: zarr.Group, kind: str) -> None:
    ome = _attr(group, "ome")
    ms = [dict(m) for m in ome["multiscales"]]
    ms[0]["type"] = kind
    ome["multiscales"] = ms
    group.attrs["ome"] = ome
