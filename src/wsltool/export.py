"""Exports of a heatmap store: QuPath-compatible GeoJSON contours and a preview PNG (no torch, no Qt).

GeoJSON coordinates are **level-0 pixels of the slide** (QuPath's convention for imported objects):
an output pixel ``i`` covers level-0 pixels ``[i * F, (i + 1) * F)`` with ``F = out_mpp / slide_mpp``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

log = logging.getLogger(__name__)

#: File name endings each export accepts: a typo'd or swapped target (a slide, the store) is never replaced.
SUFFIXES = {"geojson": (".geojson", ".json"), "png": (".png",)}


def check_target(out: Path, kind: str) -> None:
    """Refuse an export target before any work: a wrong ending (:data:`SUFFIXES`) or a folder.

    Parameters
    ----------
    out
        The file to write.
    kind
        ``"geojson"`` or ``"png"``.

    Raises
    ------
    ConfigError
        ``out`` does not end as a ``kind`` file should.
    IsADirectoryError
        ``out`` is a folder.
    """
    from wsltool.errors import ConfigError

    if out.suffix.lower() not in SUFFIXES[kind]:
        msg = f"{out}: a {kind} export must end in {' or '.join(SUFFIXES[kind])}"
        raise ConfigError(msg)
    if out.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a folder, not a file", str(out))


def _save(out: Path, write: Callable[[Path], object]) -> None:
    """Write ``out`` through a hidden temporary beside it, renamed into place; a failure leaves neither.

    ``out`` was checked by the caller (:func:`check_target`), before any work.

    Raises
    ------
    OSError
        ``out`` cannot be written; the error names ``out``, not the temporary.
    """
    tmp = out.with_name(f".{out.name}.partial")
    try:
        write(tmp)
        os.replace(tmp, out)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise OSError(exc.errno, exc.strerror or str(exc), str(out)) from exc


def mask_polygons(mask: NDArray[np.bool_], min_pixels: int = 4) -> list[list[NDArray[np.float64]]]:
    """Polygons of a binary mask: per connected component, its outer ring then its holes.

    Coordinates are ``(x, y)`` in the mask's pixel units with pixel ``i`` spanning ``[i, i + 1)``.
    """
    from skimage import measure

    polys: list[list[NDArray[np.float64]]] = []
    labels = measure.label(mask, connectivity=1)
    for rp in measure.regionprops(labels):
        if rp.area < min_pixels:
            continue
        r0, c0, _, _ = rp.bbox
        comp = np.pad(rp.image, 1).astype(np.float32)
        rings = measure.find_contours(comp, 0.5)
        if not rings:
            continue
        rings.sort(key=len, reverse=True)
        out = []
        for ring in rings:
            ring = measure.approximate_polygon(ring, tolerance=0.5)
            if len(ring) < 4:
                continue
            # find_contours gives (row, col) on pixel centres of the padded crop; centre of pixel i is i + 0.5
            xy = np.stack([ring[:, 1] - 1 + c0 + 0.5, ring[:, 0] - 1 + r0 + 0.5], axis=1)
            out.append(xy)
        if out:
            polys.append(out)
    return polys


def _ring_area(xy: NDArray[np.float64]) -> float:
    x, y = xy[:, 0], xy[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def store_geojson(store_path: str | Path, *, threshold: float | None = None, class_name: str | None = None) -> dict:
    """GeoJSON FeatureCollection of the store's mask (QuPath annotations in level-0 pixels).

    Parameters
    ----------
    store_path
        A complete heatmap store.
    threshold
        Re-threshold M+ at this value instead of using the stored mask.
    class_name
        Classification name of the features (default: the positive class of the model).

    Returns
    -------
    dict
        The GeoJSON mapping; each feature has ``classification``, ``score`` (mean M+ inside) and
        ``area_um2`` properties.
    """
    from wsltool.errors import ConfigError
    from wsltool.store import HeatmapStore

    if threshold is not None and not 0 < threshold < 1:  # as InferConfig.threshold: M+ lies in [0, 1]
        msg = f"threshold must be in (0, 1), got {threshold}"
        raise ConfigError(msg)
    st = HeatmapStore.open(store_path)
    mplus = st.mplus(0).astype(np.float32)
    mask = st.mask(0).astype(bool) if threshold is None else (mplus >= threshold) & (st.tissue(0) > 0)
    f = st.out_mpp / st.slide_mpp
    names = st.channel_names[1:]
    cls = class_name or (names[-1] if names else "positive")
    features: list[dict[str, Any]] = []
    for rings in mask_polygons(mask):
        outer = rings[0]
        ys, xs = (
            np.clip(outer[:, 1].astype(int), 0, mask.shape[0] - 1),
            np.clip(outer[:, 0].astype(int), 0, mask.shape[1] - 1),
        )
        comp_score = float(mplus[ys, xs].mean())
        coords = []
        for k, ring in enumerate(rings):
            pts = ring * f
            # GeoJSON: outer ring counter-clockwise, holes clockwise (in a y-down frame signs flip; QuPath accepts both)
            if (k == 0) != (_ring_area(pts) > 0):
                pts = pts[::-1]
            pts = np.vstack([pts, pts[:1]])
            coords.append([[round(float(x), 2), round(float(y), 2)] for x, y in pts])
        area_um2 = abs(_ring_area(rings[0])) * st.out_mpp**2 - sum(
            abs(_ring_area(r)) * st.out_mpp**2 for r in rings[1:]
        )
        features.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": coords},
                "properties": {
                    "objectType": "annotation",
                    "classification": {"name": cls, "color": [220, 40, 40]},
                    "name": f"wsltool {cls}",
                    "score": round(comp_score, 4),
                    "area_um2": round(area_um2, 1),
                },
            }
        )
    return {"type": "FeatureCollection", "features": features}


def write_geojson(store_path: str | Path, out: str | Path, **kwargs: Any) -> int:
    """Write :func:`store_geojson` to ``out`` (``.geojson`` or ``.json``); returns the number of features."""
    out = Path(out)
    check_target(out, "geojson")
    gj = store_geojson(store_path, **kwargs)
    _save(out, lambda p: p.write_text(json.dumps(gj)))
    return len(gj["features"])


def preview_png(
    store_path: str | Path,
    out: str | Path,
    *,
    slide_path: str | Path | None = None,
    max_size: int = 1600,
    alpha: float = 0.5,
    cmap: str = "inferno",
) -> tuple[int, int]:
    """Preview overlay: the slide thumbnail with M+ in a perceptual colormap over tissue, mask contour outlined.

    Returns the image size ``(width, height)``.
    """
    import matplotlib as mpl
    from PIL import Image, ImageDraw

    from wsltool.slide import open_slide
    from wsltool.store import HeatmapStore

    out = Path(out)
    check_target(out, "png")
    st = HeatmapStore.open(store_path)
    src = Path(slide_path) if slide_path else Path(st.provenance["slide"]["path"])
    mplus = st.mplus(0).astype(np.float32)
    tissue = st.tissue(0) > 0
    h, w = mplus.shape
    scale = min(1.0, max_size / max(h, w)) if max(h, w) > max_size else max_size / max(h, w)
    tw, th = max(1, round(w * scale)), max(1, round(h * scale))
    prov_slide = st.provenance.get("slide", {})
    with open_slide(src, mpp=prov_slide.get("mpp") if prov_slide.get("mpp_source") == "override" else None) as s:
        _check_same_slide(s, prov_slide, store_path)
        # the heatmap grid spans ceil(slide / out px): read the same physical extent at the preview's mpp
        thumb = s.read_region(0, 0, tw, th, mpp=w * st.out_mpp / tw)
    base = Image.fromarray(thumb)
    colors = (mpl.colormaps[cmap](mplus)[..., :3] * 255).astype(np.uint8)
    heat = Image.fromarray(colors).resize((tw, th), Image.Resampling.BILINEAR)
    a = Image.fromarray((tissue * alpha * 255).astype(np.uint8)).resize((tw, th), Image.Resampling.BILINEAR)
    img = Image.composite(heat, base, a)
    draw = ImageDraw.Draw(img)
    k = tw / w
    for rings in mask_polygons(st.mask(0).astype(bool)):
        pts = [(float(x) * k, float(y) * k) for x, y in rings[0]]
        draw.line([*pts, pts[0]], fill=(0, 255, 120), width=2)
    _save(out, lambda p: img.save(p, format="PNG"))
    return img.size


def _check_same_slide(slide: Any, recorded: dict[str, Any], store_path: str | Path) -> None:
    """Refuse a slide whose size differs from the one the store was made from; warn when only its bytes do."""
    from wsltool.errors import DataError

    dims = recorded.get("dimensions")
    if dims and list(slide.dimensions) != list(dims):
        msg = (
            f"{slide.path}: not the slide {store_path} was made from ({slide.dimensions[0]}x{slide.dimensions[1]} "
            f"px, the store's slide {dims[0]}x{dims[1]})"
        )
        raise DataError(msg)
    fp = recorded.get("fingerprint")
    if fp and slide.fingerprint() != fp:
        log.warning("%s: same size as the store's slide but other content (a converted copy?)", slide.path)
