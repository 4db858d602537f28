"""Sample data: a small generated H&E-like slide with a lesion, and a heatmap store over it.

The heatmap is **illustrative**: it is made from the slide's known lesion mask (smoothed), not by a
model, so a new user sees at once what a wsltool overlay looks like without training anything.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from wsltool.napari_plugin._reader import LayerData, read_slide, store_layers

SAMPLE_VERSION = 2
"""Bumped when the sample changes, so an older cached sample is rebuilt."""


def make_sample(folder: Path) -> tuple[Path, Path]:
    """Write ``sample.svs`` and ``sample.zarr`` into ``folder`` (reused when present)."""
    from scipy import ndimage

    from wsltool.errors import StoreError
    from wsltool.infer.stitch import Stitcher
    from wsltool.store import HeatmapStore
    from wsltool.testing import he_tissue, write_svs

    slide, store = folder / "sample.svs", folder / "sample.zarr"
    if slide.exists() and store.exists():
        try:
            st = HeatmapStore.open(store)
            if st.complete and st.provenance.get("sample_version") == SAMPLE_VERSION:
                return slide, store
        except StoreError:  # damaged or interrupted: made again below
            pass
    c = he_tissue(1536, 2048, seed=3, lesion_fraction=0.2)
    write_svs(slide, c.rgb, mpp=0.5)
    f = 8  # heatmap pixel = 8 slide pixels = 4 um
    h, w = c.rgb.shape[0] // f, c.rgb.shape[1] // f
    lesion = c.lesion[: h * f, : w * f].reshape(h, f, w, f).mean(axis=(1, 3))
    tissue = c.tissue[: h * f, : w * f].reshape(h, f, w, f).mean(axis=(1, 3)) > 0.5
    # graded like a real localization: strongest in the lesion core, fading over ~10 heatmap pixels
    inner = ndimage.distance_transform_edt(lesion > 0.5)
    heat = np.clip(0.55 * ndimage.gaussian_filter(lesion, 2.5) + 0.45 * np.clip(inner / 10.0, 0, 1), 0, 1) * tissue
    maps = np.stack([heat, 1 - heat, heat]).astype(np.float32)
    st = HeatmapStore.create(
        store,
        shape_yx=(h, w),
        out_mpp=0.5 * f,
        slide_mpp=0.5,
        channel_names=["M+", "benign", "malignant"],
        provenance={"sample": "illustrative heatmap from the known lesion mask", "sample_version": SAMPLE_VERSION},
        overwrite=True,
    )
    stitch = Stitcher(st, np.array([[0, 0, h, w]]), overlap=0)
    stitch.add(0, maps)
    stitch.finalize(
        result={"class_names": ["benign", "malignant"], "probs": [0.05, 0.95], "predicted": "malignant"},
        tissue=tissue,
        tissue_mpp=0.5 * f,
    )
    return slide, store


def sample_data() -> list[LayerData]:
    """npe2 sample data: the slide and its (illustrative) heatmap layers."""
    folder = Path(tempfile.gettempdir()) / "wsltool-sample"
    folder.mkdir(exist_ok=True)
    slide, store = make_sample(folder)
    layers: list[Any] = read_slide(str(slide))
    layers.extend(store_layers(store))
    return layers
