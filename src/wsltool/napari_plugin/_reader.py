"""napari readers: slides as lazy multiscale RGB layers in micrometre world coordinates."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

LayerData = tuple[Any, dict[str, Any], str]


def slide_pyramid(path: str | Path, mpp: float | None = None) -> tuple[list[Any], dict[str, Any]]:
    """Dask arrays over every pyramid level of a slide, with the layer metadata.

    Chunks are read on demand through :class:`wsltool.slide.Slide`, so nothing is read at full
    resolution until napari asks for it.

    Returns
    -------
    (levels, metadata)
        ``levels`` is a list of ``(H, W, 3)`` uint8 dask arrays, finest first; ``metadata`` holds
        the world scale (micrometres per pixel when known, else 1) and the slide's info.
    """
    import dask
    import dask.array as da

    from wsltool.slide import open_slide

    slide = open_slide(path, mpp=mpp)
    chunk = 512
    levels = []
    for lvl, (w, h) in enumerate(slide.level_dimensions):
        if lvl > 0 and min(w, h) < 64:
            break

        def read(block_info: dict[Any, Any] | None = None, _lvl: int = lvl) -> np.ndarray:
            assert block_info is not None
            (y0, y1), (x0, x1), _ = block_info[None]["array-location"]
            return slide._read_level_padded(_lvl, x0, y0, x1 - x0, y1 - y0)

        arr = da.map_blocks(read, dtype=np.uint8, chunks=(da.core.normalize_chunks((chunk, chunk, 3), (h, w, 3))))
        levels.append(arr)
    mpp_used = slide.mpp_or_none or 1.0
    info = slide.info()
    del dask
    return levels, {"scale": (mpp_used, mpp_used), "info": info}


def get_slide_reader(path: str | list[str]) -> Callable[[Any], list[LayerData]] | None:
    """npe2 reader hook: a reader function for slides ``open_slide`` accepts, else ``None``."""
    if isinstance(path, list):
        return None
    from wsltool.errors import WslError
    from wsltool.slide import choose_backend

    try:
        choose_backend(path)
    except WslError:
        return None
    return read_slide


def read_slide(path: str | list[str]) -> list[LayerData]:
    """Read a slide as one multiscale RGB image layer (scale in micrometres when mpp is known)."""
    p = path[0] if isinstance(path, list) else path
    levels, meta = slide_pyramid(p)
    info = meta["info"]
    kwargs = {
        "name": Path(p).name,
        "rgb": True,
        "multiscale": len(levels) > 1,
        "scale": meta["scale"],
        "units": ("micrometer", "micrometer") if info["mpp"] else ("pixel", "pixel"),
        "metadata": {"wsltool": {"kind": "slide", **info}},
    }
    data = levels if len(levels) > 1 else levels[0]
    return [(data, kwargs, "image")]


# -- heatmap stores -------------------------------------------------------------------------------


def is_store(path: str | Path) -> bool:
    """True when ``path`` is a wsltool heatmap store (a zarr group with ``wsltool`` attributes)."""
    p = Path(path)
    meta = p / "zarr.json"
    if not (p.is_dir() and meta.is_file()):
        return False
    try:
        import json

        return "wsltool" in json.loads(meta.read_text()).get("attributes", {})
    except (OSError, ValueError):
        return False


def store_layers(path: str | Path, *, opacity: float = 0.5) -> list[LayerData]:
    """Layers of a heatmap store: M+ (inferno), the class maps (hidden), the mask and tissue labels.

    A store that is still being written opens too: its level 0 shows the finished row bands (the
    pyramid and the labels appear once it is complete). World coordinates are micrometres, the same as
    the slide reader's, so the heatmap lies exactly over the slide.
    """
    import dask.array as da

    from wsltool.store import HeatmapStore, level_transforms

    st = HeatmapStore.open(path)
    complete = st.complete
    levels = st.levels if complete else st.levels[:1]
    tf = level_transforms(st.out_mpp, st.slide_mpp, 0, ndim=2)
    scale = tuple(next(t["scale"] for t in tf if t["type"] == "scale"))
    translate = tuple(next((t["translation"] for t in tf if t["type"] == "translation"), (0.0, 0.0)))
    name = Path(path).name.removesuffix(".zarr")
    state = "" if complete else " (incomplete)"
    meta = {"wsltool": {"kind": "heatmap", "store": str(path), "complete": complete, "result": st.result,
                        "provenance": st.provenance}}
    common = {"scale": scale, "translate": translate, "units": ("micrometer", "micrometer")}
    out: list[LayerData] = []
    for c, cname in enumerate(st.channel_names):
        data = [da.from_zarr(a)[c] for a in levels]
        kw = {
            **common,
            "name": f"{name} {cname}{state}",
            "colormap": "inferno" if c == 0 else "viridis",
            "opacity": opacity,
            "contrast_limits": (0.0, 1.0),
            "blending": "translucent",
            "visible": c == 0,
            "multiscale": len(data) > 1,
            "metadata": {**meta, "channel": cname},
        }
        out.append((data if len(data) > 1 else data[0], kw, "image"))
    if complete:
        for lname in ("mask", "tissue"):
            arrs = [da.from_zarr(st.label_array(lname, i)) for i in range(len(levels))]
            kw = {
                **common,
                "name": f"{name} {lname}",
                "opacity": 0.6 if lname == "mask" else 0.3,
                "visible": lname == "mask",
                "multiscale": len(arrs) > 1,
                "metadata": {**meta, "label": lname},
            }
            out.append((arrs if len(arrs) > 1 else arrs[0], kw, "labels"))
    return out


def get_store_reader(path: str | list[str]) -> Callable[[Any], list[LayerData]] | None:
    """npe2 reader hook for wsltool heatmap stores (``*.zarr`` folders)."""
    if isinstance(path, list) or not is_store(path):
        return None
    return lambda p: store_layers(p[0] if isinstance(p, list) else p)
