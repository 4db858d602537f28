"""tifffile/zarr backend: OME-TIFF and SubIFD pyramids, generic (tiled or stripped) TIFF, Aperio-style TIFF.

OpenSlide reads SubIFD pyramids (OME-TIFF) as a single level and refuses stripped TIFFs; tifffile
reads every level of both.  Pixels are decoded through tifffile's zarr interface, chunk by chunk, so
a region read touches only the tiles it needs.
"""

from __future__ import annotations

import logging
import re
import threading
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np

from wsltool.errors import SlideFormatError, SlideReadError
from wsltool.slide.base import Slide, SlideMetadata, check_dimensions

log = logging.getLogger(__name__)

_UNIT_TO_UM = {"nm": 1e-3, "µm": 1.0, "um": 1.0, "mm": 1e3, "cm": 1e4, "m": 1e6}


def _ome_mpp(xml: str) -> tuple[float, float] | None:
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    for el in root.iter():
        if el.tag.endswith("Pixels"):
            sx, sy = el.get("PhysicalSizeX"), el.get("PhysicalSizeY")
            if sx is None:
                return None
            fx = _UNIT_TO_UM.get(el.get("PhysicalSizeXUnit", "µm"), 1.0)
            fy = _UNIT_TO_UM.get(el.get("PhysicalSizeYUnit", "µm"), 1.0)
            try:
                return float(sx) * fx, float(sy if sy is not None else sx) * fy
            except ValueError:
                return None
    return None


def _tag_mpp(page: Any) -> tuple[float, float] | None:
    tags = page.tags
    if "XResolution" not in tags or "ResolutionUnit" not in tags:
        return None
    unit = int(tags["ResolutionUnit"].value)
    per = {2: 25400.0, 3: 10000.0}.get(unit)  # micrometres per inch / per centimetre
    if per is None:
        return None

    def res(name: str) -> float | None:
        v = tags[name].value if name in tags else None
        if isinstance(v, tuple):
            v = v[0] / v[1] if v[1] else 0
        return float(v) if v else None

    rx, ry = res("XResolution"), res("YResolution")
    if not rx:
        return None
    return per / rx, per / (ry or rx)


class _Heard(logging.Filter):
    """Keeps (and silences) the records a logger emits in this thread while attached; other threads' pass."""

    def __init__(self) -> None:
        super().__init__()
        self.thread = threading.get_ident()
        self.records: list[tuple[int, str]] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.thread != self.thread:
            return True
        self.records.append((record.levelno, record.getMessage()))
        return False


def _check_data_in_file(path: Path, levels: list[Any]) -> None:
    """Refuse a file cut short: some level's pixel data would lie beyond its end.

    A truncated file often keeps its first tiles readable (the open-time probe passes), so the tile table
    itself is checked: every ``offset + bytecount`` of every level must lie within the file.
    """
    for i, lv in enumerate(levels):
        for page in lv.pages:
            if page is None:
                continue
            size = page.parent.filehandle.size  # the file that holds the page (multi-file OME: another one)
            offs = np.asarray(page.dataoffsets, dtype=np.int64)
            ends = offs + np.asarray(page.databytecounts, dtype=np.int64)
            if ends.size and int(ends.max()) > size:
                cut = int((ends > size).sum())
                msg = (
                    f"truncated file: {cut} of {ends.size} tiles/strips of level {i} lie beyond its end ({size} bytes)"
                )
                raise SlideFormatError(path, msg)


class TiffSlide(Slide):
    """A TIFF slide read with tifffile; every pyramid level (pages or SubIFDs) is a zarr array."""

    backend = "tifffile"

    def __init__(self, path: Path, mpp: float | None = None) -> None:
        import tifffile
        import zarr

        # what tifffile logs while parsing (a broken page chain, say) is ours to judge: with the pixel data whole
        # it stays a warning naming the file; when the file is refused, our one-line error says it all (and
        # tifffile's words are kept at debug level, -vv)
        heard = _Heard()
        tiff_log = logging.getLogger("tifffile")
        tiff_log.addFilter(heard)
        try:
            self._tf = tifffile.TiffFile(str(path))
            series = self._tf.series[0]
            levels = list(series.levels)
            _check_data_in_file(path, levels)
        except BaseException as exc:
            tiff_log.removeFilter(heard)
            for _, msg in heard.records:
                log.debug("%s: tifffile: %s", path, msg)
            if hasattr(self, "_tf"):
                self._tf.close()
            if isinstance(exc, SlideFormatError) or not isinstance(exc, Exception):
                raise
            # tifffile raises TiffFileError, ValueError, struct.error...
            raise SlideFormatError(path, f"not a readable TIFF ({type(exc).__name__}: {exc})") from exc
        tiff_log.removeFilter(heard)
        for level, msg in heard.records:
            log.log(min(level, logging.WARNING), "%s: tifffile: %s", path, msg)
        axes = series.axes
        self._axes = axes
        self._arrays: list[Any] = []
        dims: list[tuple[int, int]] = []
        try:
            for i, lv in enumerate(levels):
                shape = dict(zip(axes, lv.shape, strict=True))
                dims.append((int(shape["X"]), int(shape["Y"])))
                self._arrays.append(zarr.open_array(series.aszarr(level=i), mode="r"))
        except KeyError as exc:
            raise SlideFormatError(path, f"TIFF without X/Y image axes (axes {axes!r})") from exc
        except Exception as exc:
            raise SlideFormatError(path, f"cannot index TIFF levels ({exc})") from exc
        if series.dtype != np.uint8:
            log.info("%s: %s pixels will be rescaled to uint8", path, series.dtype)
        check_dimensions(path, dims)
        w0 = dims[0][0]
        fmt = "ome-tiff" if self._tf.is_ome else ("aperio-tiff" if self._tf.is_svs else "generic-tiff")
        page0 = self._tf.pages.first
        file_mpp: tuple[float, float] | None = None
        props: dict[str, str] = {}
        objective = None
        if self._tf.is_ome and self._tf.ome_metadata:
            file_mpp = _ome_mpp(self._tf.ome_metadata)
        if self._tf.is_svs:
            desc = page0.description
            for k, v in re.findall(r"\|\s*([^=|]+?)\s*=\s*([^|]*)", desc):
                props[f"aperio.{k}"] = v.strip()
            try:
                m = float(props.get("aperio.MPP", ""))
                file_mpp = file_mpp or (m, m)
            except ValueError:
                pass
            try:
                objective = float(props.get("aperio.AppMag", ""))
            except ValueError:
                pass
        if file_mpp is None:
            file_mpp = _tag_mpp(page0)
        meta = SlideMetadata(
            format=fmt,
            vendor=fmt,
            level_dimensions=tuple(dims),
            level_downsamples=tuple(w0 / d[0] for d in dims),
            mpp=file_mpp,
            objective_power=objective,
            properties=props,
        )
        self._dtype = series.dtype
        super().__init__(path, meta, mpp)
        self._probe()

    def _read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        arr = self._arrays[level]
        index: list[Any] = []
        for ax in self._axes:
            if ax == "Y":
                index.append(slice(y, y + h))
            elif ax == "X":
                index.append(slice(x, x + w))
            elif ax in "SC":
                index.append(slice(None))
            else:
                index.append(0)
        try:
            data = np.asarray(arr[tuple(index)])
        except Exception as exc:  # codec errors (imagecodecs.JpegError...), truncated files
            raise SlideReadError(
                self.path, f"cannot decode pixels at level {level} ({type(exc).__name__}: {exc})"
            ) from exc
        kept = [ax for ax in self._axes if ax in "YXSC"]
        # bring to (Y, X, channels)
        order = [kept.index("Y"), kept.index("X")] + [i for i, ax in enumerate(kept) if ax in "SC"]
        data = data.transpose(order)
        if data.ndim == 2:
            data = data[..., None]
        if data.ndim > 3:
            data = data.reshape(data.shape[0], data.shape[1], -1)
        if data.shape[2] == 1:
            data = np.repeat(data, 3, axis=2)
        elif data.shape[2] >= 3:
            data = data[..., :3]
        else:
            data = np.concatenate([data, data[..., :1]], axis=2)
        if data.dtype != np.uint8:
            info = np.iinfo(data.dtype) if np.issubdtype(data.dtype, np.integer) else None
            top = float(info.max) if info else 1.0
            data = np.clip(data.astype(np.float32) / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.ascontiguousarray(data)

    def close(self) -> None:
        """Close the TIFF file."""
        tf = getattr(self, "_tf", None)
        if tf is not None:
            tf.close()
            self._tf = None  # type: ignore[assignment]
