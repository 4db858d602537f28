"""napari readers: slides as lazy multiscale RGB layers, heatmap stores as overlays, in micrometres.

World coordinates are micrometres whenever the slide's mpp is known: a slide layer has
``scale = (mpp, mpp)`` and a heatmap store's layers carry the scale and translation of
:func:`wsltool.store.level_transforms`, so a heatmap lies exactly over its slide.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

LayerData = tuple[Any, dict[str, Any], str]

SLIDE_CHUNK = 512
"""Side of the dask chunks a slide level is read in (pixels)."""

MIN_LEVEL_SIDE = 64
"""Pyramid levels whose shorter side is below this are not shown (napari needs none that small)."""

PARTIAL_SUFFIX = ".wsltool-partial"
"""A store being overwritten is written to the hidden sibling ``.NAME.wsltool-partial`` (see
:meth:`wsltool.store.HeatmapStore.create`); the Localize widget shows it while it grows."""


def slide_pyramid(path: str | Path, mpp: float | None = None) -> tuple[list[Any], dict[str, Any]]:
    """Dask arrays over every pyramid level of a slide, with the layer metadata.

    Chunks are read on demand through :class:`wsltool.slide.Slide`, so nothing is read at full
    resolution until napari asks for it (napari reads only the chunks in view, at the level that
    matches the zoom).

    Parameters
    ----------
    path
        A slide :func:`wsltool.slide.open_slide` reads.
    mpp
        Level-0 mpp override for slides whose metadata lacks it.

    Returns
    -------
    (levels, metadata)
        ``levels`` is a list of ``(H, W, 3)`` uint8 dask arrays, finest first (levels whose shorter
        side is below :data:`MIN_LEVEL_SIDE` are left out); ``metadata`` holds the world ``scale``
        (micrometres per pixel when known, else 1) and the slide's ``info``.
    """
    import dask.array as da

    from wsltool.errors import SlideReadError
    from wsltool.slide import open_slide
    from wsltool.slide.base import BACKGROUND

    slide = open_slide(path, mpp=mpp)
    # a unique name per call: napari's dask cache must never serve chunks of another file (or of an
    # older version of this one) under the same key
    token = uuid.uuid4().hex[:12]
    levels = []
    last_w = None
    reported: set[int] = set()
    reported_lock = threading.Lock()  # napari may slice in several threads
    for lvl, (w, h) in enumerate(slide.level_dimensions):
        if lvl > 0 and (min(w, h) < MIN_LEVEL_SIDE or (last_w is not None and w >= last_w)):
            break

        def read(block_info: dict[Any, Any] | None = None, _lvl: int = lvl) -> np.ndarray:
            assert block_info is not None
            (y0, y1), (x0, x1), _ = block_info[None]["array-location"]
            try:
                return slide._read_level_padded(_lvl, x0, y0, x1 - x0, y1 - y0)
            except SlideReadError as exc:
                # damaged tiles: shown as glass, said once per level (an exception here would surface in
                # napari's slicing, after the layer was added, and leave it half-built)
                with reported_lock:
                    first = _lvl not in reported
                    reported.add(_lvl)
                if first:
                    _report(f"{exc}; shown blank", warning=True)
                return np.full((y1 - y0, x1 - x0, 3), BACKGROUND, np.uint8)

        chunks = da.core.normalize_chunks((SLIDE_CHUNK, SLIDE_CHUNK, 3), (h, w, 3))
        levels.append(da.map_blocks(read, dtype=np.uint8, chunks=chunks, name=f"wsltool-slide-{token}-{lvl}"))
        last_w = w
    mpp_used = slide.mpp_or_none or 1.0
    return levels, {"scale": (mpp_used, mpp_used), "info": slide.info()}


#: Extensions only slides have: a file named so that no backend opens is reported (a ``.tif`` or ``.dcm`` that
#: is not a slide is left to napari's other readers).
SLIDE_ONLY_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".scn", ".bif", ".vms", ".vmu")


def _report(message: str, *, warning: bool = False) -> None:
    """One line in napari's notifications (and the log)."""
    from napari.utils.notifications import show_error, show_warning

    (log.warning if warning else log.error)("%s", message)
    (show_warning if warning else show_error)(message)


def _naming(exc: BaseException, path: str | Path) -> str:
    """``exc`` as one line that names ``path``."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if str(path) in text else f"{path}: {text}"


def _refusal(message: str) -> Callable[[Any], list[Any]]:
    """A reader function that reports ``message`` and adds nothing (napari's ``[(None,)]``).

    Raising instead would reach the user as an error toast with a traceback.
    """

    def refuse(_path: Any) -> list[Any]:
        _report(message)
        return [(None,)]

    return refuse


def get_slide_reader(path: str | list[str]) -> Callable[[Any], list[Any]] | None:
    """npe2 reader hook: a reader function for slides ``open_slide`` accepts, else ``None``.

    A file with a slide-only extension (:data:`SLIDE_ONLY_SUFFIXES`) that no backend accepts gets a reader that
    reports why (empty, not a slide, ...) in one line, rather than napari's "refused the file".
    """
    if isinstance(path, list):
        return None
    from wsltool.errors import WslError
    from wsltool.slide import choose_backend

    try:
        choose_backend(path)
    except (WslError, OSError) as exc:
        if Path(path).suffix.lower() in SLIDE_ONLY_SUFFIXES:
            return _refusal(_naming(exc, path))
        return None
    return open_slide_layers


def open_slide_layers(path: str | list[str]) -> list[Any]:
    """npe2 reader function: :func:`read_slide`, a slide it cannot open reported in one line (no layer)."""
    from wsltool.errors import WslError

    p = str(path[0] if isinstance(path, list) else path)
    heard = _Warnings()
    logging.getLogger("wsltool").addHandler(heard)
    try:
        return read_slide(p)
    except (WslError, OSError) as exc:
        return _refusal(_naming(exc, p))(p)
    finally:
        logging.getLogger("wsltool").removeHandler(heard)
        for message in heard.messages:  # e.g. a file cut short whose level 0 is whole: it opens, with a word
            _report(message, warning=True)


class _Warnings(logging.Handler):
    """Collects the warnings wsltool logs in this thread while attached (shown in napari, not only logged)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.thread = threading.get_ident()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            self.messages.append(" ".join(record.getMessage().split()))


def read_slide(path: str | list[str], mpp: float | None = None) -> list[LayerData]:
    """Read a slide as one multiscale RGB image layer (scale in micrometres when mpp is known).

    The layer's ``metadata["wsltool"]`` holds ``kind="slide"`` and the slide's info (path, mpp, levels,
    ...): the Localize and Retrain widgets find slides by it.
    """
    p = str(path[0] if isinstance(path, list) else path)
    levels, meta = slide_pyramid(p, mpp=mpp)
    info = meta["info"]
    kwargs = {
        "name": Path(p).name,
        "rgb": True,
        "multiscale": len(levels) > 1,
        "scale": meta["scale"],
        "units": ("micrometer", "micrometer") if info["mpp"] else ("pixel", "pixel"),
        "contrast_limits": (0, 255),
        "metadata": {"wsltool": {"kind": "slide", **info}},
    }
    data = levels if len(levels) > 1 else levels[0]
    return [(data, kwargs, "image")]


# -- heatmap stores -------------------------------------------------------------------------------


def is_store(path: str | Path) -> bool:
    """True when ``path`` is a wsltool heatmap store (a zarr v3 group with ``wsltool`` attributes)."""
    p = Path(path)
    meta = p / "zarr.json"
    if not (p.is_dir() and meta.is_file()):
        return False
    try:
        import json

        return "wsltool" in json.loads(meta.read_text()).get("attributes", {})
    except (OSError, ValueError, AttributeError):
        return False


MASK_RGBA = (0.0, 1.0, 1.0, 1.0)
TISSUE_RGBA = (0.0, 0.63, 1.0, 1.0)


def heat_colormap() -> Any:
    """Inferno whose low values fade to transparent, so the slide shows through where M+ is low."""
    from napari.utils.colormaps import Colormap, ensure_colormap

    colors = np.array(ensure_colormap("inferno").colors, dtype=np.float32).copy()
    x = np.linspace(0.0, 1.0, len(colors))
    colors[:, 3] = np.clip((x - 0.05) / 0.3, 0.0, 1.0)
    return Colormap(colors, name="wsltool-inferno", display_name="inferno (transparent low)")


def label_colormap(rgba: tuple[float, float, float, float]) -> Any:
    """A labels colormap: 0 transparent, 1 the given colour."""
    from napari.utils.colormaps import DirectLabelColormap

    return DirectLabelColormap(color_dict={None: (0, 0, 0, 0), 0: (0, 0, 0, 0), 1: rgba})


def store_transform(st: Any) -> tuple[tuple[float, float], tuple[float, float]]:
    """Level-0 ``(scale, translate)`` of a store's layers in micrometres (from ``level_transforms``)."""
    from wsltool.store import level_transforms

    tf = level_transforms(st.out_mpp, st.slide_mpp, 0, ndim=2)
    s = next(t["scale"] for t in tf if t["type"] == "scale")
    t = next((t["translation"] for t in tf if t["type"] == "translation"), (0.0, 0.0))
    return (float(s[0]), float(s[1])), (float(t[0]), float(t[1]))


def store_layers(path: str | Path, *, opacity: float = 0.7, name: str | None = None) -> list[LayerData]:
    """Layers of a heatmap store: M+ (inferno), the class maps (hidden), the mask and tissue labels.

    A store that is still being written opens too: its level 0 (read now, as it is) shows the
    finished row bands; the pyramid and the labels appear once it is complete.  World coordinates
    are micrometres, the same as the slide reader's, so the heatmap lies exactly over the slide.

    Parameters
    ----------
    path
        The store folder.
    opacity
        Opacity of the heatmap layers.
    name
        Layer name prefix (default: the folder name without ``.zarr``).
    """
    import dask.array as da

    from wsltool.store import HeatmapStore

    st = HeatmapStore.open(path)
    complete = st.complete
    scale, translate = store_transform(st)
    prefix = name or Path(path).name.removesuffix(".zarr")
    state = "" if complete else " (incomplete)"
    meta = {
        "wsltool": {
            "kind": "heatmap",
            "store": str(Path(path).absolute()),
            "complete": complete,
            "result": st.result,
            "threshold": st.threshold,
            "provenance": st.provenance,
        }
    }
    common = {"scale": scale, "translate": translate, "units": ("micrometer", "micrometer")}
    token = uuid.uuid4().hex[:12]  # fresh dask keys: a rewritten store must not be served from a cache
    out: list[LayerData] = []
    for c, cname in enumerate(st.channel_names):
        data: list[Any]
        if complete:
            data = [da.from_zarr(a, name=f"wsltool-heat-{token}-{i}")[c] for i, a in enumerate(st.levels)]
        else:
            data = [np.asarray(st.levels[0][c], dtype=np.float32)]  # small; a snapshot of what is done
        kw = {
            **common,
            "name": f"{prefix} {cname}{state}",
            "colormap": heat_colormap() if c == 0 else "viridis",
            "opacity": opacity,
            "contrast_limits": (0.0, 1.0),
            "blending": "translucent",
            "visible": c == 0,
            "multiscale": len(data) > 1,
            "metadata": {"wsltool": {**meta["wsltool"], "channel": cname}},
        }
        out.append((data if len(data) > 1 else data[0], kw, "image"))
    if complete:
        for lname, rgba in (("mask", MASK_RGBA), ("tissue", TISSUE_RGBA)):
            arrs = [
                da.from_zarr(st.label_array(lname, i), name=f"wsltool-{lname}-{token}-{i}")
                for i in range(len(st.levels))
            ]
            kw = {
                **common,
                "name": f"{prefix} {lname}",
                "opacity": 0.5 if lname == "mask" else 0.3,
                "colormap": label_colormap(rgba),
                "visible": False,  # the Localize widget shows the mask as a contour at its threshold
                "multiscale": len(arrs) > 1,
                "metadata": {"wsltool": {**meta["wsltool"], "label": lname}},
            }
            out.append((arrs if len(arrs) > 1 else arrs[0], kw, "labels"))
    return out


def read_store(path: str | list[str]) -> list[Any]:
    """npe2 reader function for heatmap stores; a store it cannot open is reported in one line (no layer)."""
    p = str(path[0] if isinstance(path, list) else path)
    try:
        return store_layers(p)
    except Exception as exc:  # any failure of a damaged store: one line, not a toast with a traceback
        return _refusal(_naming(exc, p))(p)


def get_store_reader(path: str | list[str]) -> Callable[[Any], list[Any]] | None:
    """npe2 reader hook for wsltool heatmap stores (``*.zarr`` folders); ``None`` for anything else.

    A ``*.zarr`` folder whose ``zarr.json`` cannot be read as JSON gets a reader that says so; a readable group
    without wsltool attributes (another tool's OME-Zarr) is left to other readers.
    """
    if isinstance(path, list):
        return None
    import json

    meta = Path(path) / "zarr.json"
    if not meta.is_file():
        return None
    try:
        attrs = json.loads(meta.read_bytes()).get("attributes")
    except (OSError, ValueError) as exc:
        return _refusal(f"{meta}: cannot be read as JSON ({type(exc).__name__}); the store's metadata is damaged")
    except AttributeError:  # valid JSON that is no zarr group metadata
        return None
    return read_store if isinstance(attrs, dict) and "wsltool" in attrs else None
