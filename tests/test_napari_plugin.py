"""The napari plugin: readers (values), discovery, both widgets end to end, a torch-free viewer, a GL screenshot.

Widgets are driven with pytest-qt on real generated slides; their jobs run in real worker processes
(``ProcessJob``) with a real random-weight checkpoint.  Under ``make test`` pytest-xvfb provides the X
display the GL test needs (Xvfb + ``show=True``, see ../shared/environment.md section 5).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from wsltool.infer.stitch import Stitcher
from wsltool.napari_plugin._reader import (
    get_slide_reader,
    get_store_reader,
    open_slide_layers,
    read_slide,
    store_layers,
)
from wsltool.napari_plugin._widgets import LocalizeWidget, RetrainWidget
from wsltool.slide import open_slide
from wsltool.store import HeatmapStore, level_transforms
from wsltool.testing import SyntheticContent, he_tissue, write_svs

JOB_TIMEOUT_MS = 240_000  # worker processes import torch; the test machine is small and shared
SLIDE_MPP = 0.5


# -- fixtures -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_content() -> SyntheticContent:
    return he_tissue(768, 1024, seed=5, lesion_fraction=0.3)


@pytest.fixture(scope="module")
def small_slide(tmp_path_factory: pytest.TempPathFactory, small_content: SyntheticContent) -> Path:
    """1024x768 SVS at 0.5 um/px, uncompressed (bit-exact pixels), levels 1024x768, 256x192, 64x48."""
    return write_svs(tmp_path_factory.mktemp("slide") / "small.svs", small_content.rgb, compression="none")


@pytest.fixture(scope="module")
def nompp_slide(tmp_path_factory: pytest.TempPathFactory, small_content: SyntheticContent) -> Path:
    return write_svs(tmp_path_factory.mktemp("nompp") / "nompp.svs", small_content.rgb, mpp=None, mag=None)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from wsltool.testing.models import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "random.pt", input_size=128)


@pytest.fixture
def notes() -> Iterator[list[tuple[str, str]]]:
    """Notifications as ``(severity, message)`` through napari's real notification manager."""
    from napari.utils.notifications import notification_manager

    got: list[tuple[str, str]] = []

    def on_note(event: Any) -> None:
        n = event if hasattr(event, "message") else event.value
        got.append((str(n.severity), str(n.message)))

    notification_manager.notification_ready.connect(on_note)
    yield got
    notification_manager.notification_ready.disconnect(on_note)


def _store_with_levels(path: Path, *, complete: bool) -> tuple[HeatmapStore, np.ndarray]:
    """A 70x90 store with chunk 32 (3 pyramid levels) filled with random maps in two row regions."""
    rng = np.random.default_rng(3)
    maps = rng.random((3, 70, 90), np.float32)
    st = HeatmapStore.create(
        path,
        shape_yx=(70, 90),
        out_mpp=4.0,
        slide_mpp=SLIDE_MPP,
        channel_names=["M+", "benign", "malignant"],
        provenance={"test": True},
        chunk=32,
    )
    boxes = np.array([[0, 0, 32, 90], [32, 0, 38, 90]])
    stitch = Stitcher(st, boxes, overlap=0)
    stitch.add(0, maps[:, :32])
    if complete:
        stitch.add(1, maps[:, 32:])
        tissue = np.zeros((70, 90), bool)
        tissue[10:60, 10:80] = True
        stitch.finalize(
            {"class_names": ["benign", "malignant"], "probs": [0.3, 0.7], "predicted": "malignant"},
            tissue=tissue,
            tissue_mpp=4.0,
        )
    return st, maps


def _wait_idle(qtbot: Any, w: LocalizeWidget | RetrainWidget) -> None:
    qtbot.waitUntil(lambda: not w.running and not w._timer.isActive(), timeout=JOB_TIMEOUT_MS)


def _layers(viewer: Any, prefix: str) -> dict[str, Any]:
    return {ly.name: ly for ly in viewer.layers if ly.name.startswith(prefix + " ")}


# -- 1. readers -----------------------------------------------------------------------------------------------------
def test_slide_reader_layers_scale_levels_values(small_slide: Path, small_content: SyntheticContent) -> None:
    assert get_slide_reader(str(small_slide)) is open_slide_layers
    assert get_slide_reader([str(small_slide)]) is None
    [(data, kw, kind)] = read_slide(str(small_slide))
    assert kind == "image"
    assert kw["rgb"] is True and kw["multiscale"] is True
    assert kw["scale"] == (SLIDE_MPP, SLIDE_MPP)
    assert kw["units"] == ("micrometer", "micrometer")
    assert kw["metadata"]["wsltool"]["kind"] == "slide"
    assert kw["metadata"]["wsltool"]["path"] == str(small_slide)
    with open_slide(small_slide) as s:
        dims = [(w, h) for w, h in s.level_dimensions if min(w, h) >= 64]
        assert len(dims) == 2 < s.level_count  # the 64x48 level is left out
        assert [tuple(a.shape) for a in data] == [(h, w, 3) for w, h in dims]
        assert all(a.dtype == np.uint8 for a in data)
        np.testing.assert_array_equal(np.asarray(data[0]), small_content.rgb)  # lossless file: exact pixels
        np.testing.assert_array_equal(
            np.asarray(data[1][64:192, 100:256]), s.read_level(1, 400, 256, 156, 128)
        )  # level-0 coordinates
    # chunked: napari reads 512x512 tiles, never the whole level at once
    assert data[0].chunksize == (512, 512, 3)


def test_slide_reader_without_mpp_and_non_slides(nompp_slide: Path, tmp_path: Path) -> None:
    [(_, kw, _)] = read_slide(str(nompp_slide))
    assert kw["scale"] == (1.0, 1.0)
    assert kw["units"] == ("pixel", "pixel")
    assert kw["metadata"]["wsltool"]["mpp"] is None
    txt = tmp_path / "notes.tif"
    txt.write_text("not a slide")
    assert get_slide_reader(str(txt)) is None


def test_readers_report_what_they_cannot_open_in_one_line(
    make_napari_viewer: Callable[..., Any], tmp_path: Path, notes: list[tuple[str, str]]
) -> None:
    """File > Open on a damaged slide or store: one error line naming it and the problem, no layer, no traceback."""
    import shutil

    viewer = make_napari_viewer()
    (tmp_path / "empty.svs").write_bytes(b"")
    (tmp_path / "notes.svs").write_text("not a slide")
    _store_with_levels(tmp_path / "level.zarr", complete=True)
    shutil.rmtree(tmp_path / "level.zarr" / "1")
    _store_with_levels(tmp_path / "cut.zarr", complete=True)
    meta = tmp_path / "cut.zarr" / "zarr.json"
    meta.write_text(meta.read_text()[:40])
    expected = {
        "empty.svs": "empty.svs: empty file",
        "notes.svs": "notes.svs: not a slide or image: unrecognised file content",
        "level.zarr": "level.zarr: corrupt heatmap store: level array '1' missing",
        "cut.zarr": "cut.zarr/zarr.json: cannot be read as JSON (JSONDecodeError); the store's metadata is damaged",
    }
    for name, words in expected.items():
        before = len(notes)
        assert viewer.open(str(tmp_path / name), plugin="wsltool") == []
        assert notes[before:] == [("error", f"{tmp_path}/{words}")], name
    assert len(viewer.layers) == 0
    # a .tif that is no slide is left to napari's other readers, as before
    (tmp_path / "notes.tif").write_text("not a slide")
    assert get_slide_reader(str(tmp_path / "notes.tif")) is None


def test_damaged_tiles_show_blank_with_one_warning_and_the_rest_reads(
    make_napari_viewer: Callable[..., Any],
    tmp_path: Path,
    small_content: SyntheticContent,
    notes: list[tuple[str, str]],
) -> None:
    import tifffile

    p = write_svs(tmp_path / "bad0.svs", small_content.rgb)  # JPEG tiles
    good = open_slide(p)
    level1 = good.read_level(1, 0, 0, *good.level_dimensions[1])
    good.close()
    raw = bytearray(p.read_bytes())
    with tifffile.TiffFile(p) as tf:
        for off, n in zip(tf.pages[0].dataoffsets, tf.pages[0].databytecounts, strict=True):
            raw[off + 2 : off + n] = bytes(n - 2)  # every level-0 tile: garbage after the JPEG start marker
    p.write_bytes(bytes(raw))
    viewer = make_napari_viewer()
    [layer] = viewer.open(str(p), plugin="wsltool")
    for _ in range(2):  # read twice: said once
        assert (np.asarray(layer.data[0][:512, :512]) == 255).all()  # blank (glass), not an exception
    warned = [n for n in notes if "bad0.svs" in n[1]]
    assert len(warned) == 1 and warned[0][0] == "warning"
    assert warned[0][1].startswith(f"{p}: cannot read pixels at level 0") and warned[0][1].endswith("; shown blank")
    np.testing.assert_array_equal(np.asarray(layer.data[1]), level1)  # the intact level still reads


def test_a_slide_cut_short_with_level0_whole_opens_with_a_warning(
    make_napari_viewer: Callable[..., Any],
    tmp_path: Path,
    small_content: SyntheticContent,
    notes: list[tuple[str, str]],
) -> None:
    import tifffile

    src = write_svs(tmp_path / "whole.svs", small_content.rgb, compression="none")
    with tifffile.TiffFile(src) as tf:
        end0 = max(o + n for o, n in zip(tf.pages[0].dataoffsets, tf.pages[0].databytecounts, strict=True))
    p = tmp_path / "cut.svs"
    p.write_bytes(src.read_bytes()[:end0])  # level 0 whole; the next directory and the rest of the pyramid gone
    viewer = make_napari_viewer()
    [layer] = viewer.open(str(p), plugin="wsltool")
    assert layer.data.shape[:2] == (768, 1024) and not layer.multiscale
    warned = [n for n in notes if "cut.svs" in n[1]]
    assert len(warned) == 1 and warned[0][0] == "warning" and "invalid page offset" in warned[0][1]


def test_store_reader_complete(tmp_path: Path) -> None:
    st, maps = _store_with_levels(tmp_path / "h.zarr", complete=True)
    st = HeatmapStore.open(tmp_path / "h.zarr")
    assert len(st.levels) == 3
    reader = get_store_reader(str(tmp_path / "h.zarr"))
    assert reader is not None
    assert get_store_reader(str(tmp_path)) is None
    layers = {kw["name"]: (data, kw, kind) for data, kw, kind in reader(str(tmp_path / "h.zarr"))}
    assert list(layers) == ["h M+", "h benign", "h malignant", "h mask", "h tissue"]
    tf = level_transforms(st.out_mpp, st.slide_mpp, 0, ndim=2)
    scale, translate = tuple(tf[0]["scale"]), tuple(tf[1]["translation"])
    assert scale == (4.0, 4.0) and translate == (1.75, 1.75)
    for name, (data, kw, kind) in layers.items():
        assert kw["scale"] == scale and kw["translate"] == translate, name
        assert kw["multiscale"] is True and len(data) == 3
        assert kind == ("labels" if name.endswith(("mask", "tissue")) else "image")
    for lvl in range(3):
        np.testing.assert_array_equal(np.asarray(layers["h M+"][0][lvl]), st.mplus(lvl))
        np.testing.assert_array_equal(np.asarray(layers["h malignant"][0][lvl]), st.channel("malignant", lvl))
        np.testing.assert_array_equal(np.asarray(layers["h mask"][0][lvl]), st.mask(lvl))
        np.testing.assert_array_equal(np.asarray(layers["h tissue"][0][lvl]), st.tissue(lvl))
    # level 0 is the stitched maps (float16) and the mask is M+ >= 0.5 within tissue
    np.testing.assert_allclose(st.mplus(0), maps[0], atol=1e-3)
    assert np.asarray(layers["h mask"][0][0]).sum() == ((st.mplus(0) >= 0.5) & (st.tissue(0) > 0)).sum() > 0
    m_kw = layers["h M+"][1]
    assert m_kw["visible"] and not layers["h benign"][1]["visible"]
    assert m_kw["contrast_limits"] == (0.0, 1.0)
    assert m_kw["metadata"]["wsltool"]["result"]["predicted"] == "malignant"
    cmap = m_kw["colormap"]
    assert cmap.map(np.array([0.0]))[0, 3] == 0.0 and cmap.map(np.array([1.0]))[0, 3] == 1.0  # M+ 0 transparent


def test_store_reader_incomplete_shows_level0(tmp_path: Path) -> None:
    _, maps = _store_with_levels(tmp_path / "part.zarr", complete=False)
    assert not HeatmapStore.open(tmp_path / "part.zarr").complete
    layers = store_layers(tmp_path / "part.zarr")
    assert [kw["name"] for _, kw, _ in layers] == [
        "part M+ (incomplete)",
        "part benign (incomplete)",
        "part malignant (incomplete)",
    ]
    data, kw, kind = layers[0]
    assert kind == "image" and kw["multiscale"] is False and data.shape == (70, 90)
    assert kw["metadata"]["wsltool"]["complete"] is False
    np.testing.assert_allclose(data[:32], maps[0, :32], atol=1e-3)  # the finished band
    assert not data[32:].any()  # not written yet


# -- 2. discovery ---------------------------------------------------------------------------------------------------
def test_napari_discovers_plugin(make_napari_viewer: Callable[..., Any], small_slide: Path, tmp_path: Path) -> None:
    from npe2 import PluginManager

    pm = PluginManager.instance()
    pm.discover()
    mf = pm.get_manifest("wsltool")
    assert {w.display_name for w in mf.contributions.widgets or []} == {"Localize", "Retrain"}
    assert {r.command for r in mf.contributions.readers or []} == {
        "wsltool.get_slide_reader",
        "wsltool.get_store_reader",
    }
    assert [s.key for s in mf.contributions.sample_data or []] == ["sample"]
    assert "wsltool" in {r.plugin_name for r in pm.iter_compatible_readers([str(small_slide)])}

    viewer = make_napari_viewer()
    _, w = viewer.window.add_plugin_dock_widget("wsltool", "Localize")
    assert isinstance(w, LocalizeWidget)
    _, r = viewer.window.add_plugin_dock_widget("wsltool", "Retrain")
    assert isinstance(r, RetrainWidget)
    # the reader through napari's own open(): one multiscale layer in micrometres, offered to Localize
    viewer.open(str(small_slide), plugin="wsltool")
    assert [ly.name for ly in viewer.layers] == ["small.svs"]
    assert viewer.layers[0].multiscale and tuple(viewer.layers[0].scale) == (SLIDE_MPP, SLIDE_MPP)
    assert [getattr(ly, "name", None) for ly in w.slide.choices] == ["small.svs"]
    _store_with_levels(tmp_path / "h.zarr", complete=True)
    viewer.open(str(tmp_path / "h.zarr"), plugin="wsltool")
    assert [ly.name for ly in viewer.layers][1:] == ["h M+", "h benign", "h malignant", "h mask", "h tissue"]
    assert tuple(viewer.layers["h M+"].translate) == (1.75, 1.75)
    # Localize's threshold acts on the opened store: the mask becomes a contour at the slider's threshold
    w.threshold.value = 0.8
    mask = viewer.layers["h mask"]
    st = HeatmapStore.open(tmp_path / "h.zarr")
    np.testing.assert_array_equal(mask.data, (st.mplus(0) >= 0.8) & (st.tissue(0) > 0))
    assert mask.contour == 1 and mask.visible


# -- 3. Localize ----------------------------------------------------------------------------------------------------
def _localize(viewer: Any, slide: Path, ckpt: Path, out: Path) -> LocalizeWidget:
    viewer.open(str(slide), plugin="wsltool")
    _, w = viewer.window.add_plugin_dock_widget("wsltool", "Localize")
    w.config["workers"] = 0  # region reading in the worker process itself (fewer processes on a small machine)
    w.model.value = ckpt
    w.overlap.value = 0
    w.out.value = out
    return w


def test_localize_end_to_end_cancel_then_resume(
    make_napari_viewer: Callable[..., Any],
    qtbot: Any,
    small_slide: Path,
    checkpoint: Path,
    tmp_path: Path,
    notes: list[tuple[str, str]],
) -> None:
    viewer = make_napari_viewer()
    out = tmp_path / "heat.zarr"
    w = _localize(viewer, small_slide, checkpoint, out)
    # cancelled at once: the worker stops at its first batch and leaves an incomplete, resumable store
    w.run_btn.native.click()
    assert w.running and not w.run_btn.enabled and w.cancel_btn.enabled
    w.cancel_btn.native.click()
    _wait_idle(qtbot, w)
    assert w.result.value.startswith("cancelled")
    assert w.run_btn.enabled and not w.cancel_btn.enabled
    assert out.exists() and not HeatmapStore.open(out).complete
    assert "heat M+ (incomplete)" in _layers(viewer, "heat")
    assert notes == []  # a cancel is not an error
    # run again, to the end; small chunks and batches so that the heatmap grows band by band on the slide
    w.config.update(chunk=16, batch_size=1)  # 48x64 heatmap px: 3 row bands, one per row of regions
    inserted: list[str] = []
    viewer.layers.events.inserted.connect(lambda e: inserted.append(e.value.name))
    w.run_btn.native.click()
    _wait_idle(qtbot, w)
    assert "heat M+ (incomplete)" in inserted  # shown while running, before the last band was written
    assert inserted.index("heat M+ (incomplete)") < inserted.index("heat M+")  # then the finished store
    st = HeatmapStore.open(out)
    assert st.complete and st.provenance["config"]["tta"] == "none"
    res = w.last_result
    assert res is not None and res["store"] == str(out)
    assert res["predicted"] in ("benign", "malignant") and res["regions"] > 0
    assert res["predicted"] in w.result.value and f"{res['regions']} regions" in w.result.value
    assert st.result is not None and st.result["predicted"] == res["predicted"]
    assert w.progress.value == w.progress.max == res["regions"]
    layers = _layers(viewer, "heat")
    assert set(layers) == {"heat M+", "heat benign", "heat malignant", "heat mask", "heat tissue"}
    heat = layers["heat M+"]
    tf = level_transforms(st.out_mpp, st.slide_mpp, 0, ndim=2)
    assert tuple(heat.scale) == tuple(tf[0]["scale"]) and tuple(heat.translate) == tuple(tf[1]["translation"])
    np.testing.assert_array_equal(np.asarray(heat.data[0] if heat.multiscale else heat.data), st.mplus(0))
    # the heatmap covers the slide: same extent in micrometres (within one heatmap pixel)
    slide_layer = viewer.layers["small.svs"]
    hh, hw = st.shape_yx
    assert abs(hw * st.out_mpp - slide_layer.data[0].shape[1] * SLIDE_MPP) <= st.out_mpp
    assert abs(hh * st.out_mpp - slide_layer.data[0].shape[0] * SLIDE_MPP) <= st.out_mpp
    assert layers["heat mask"].contour == 1 and layers["heat mask"].visible
    assert notes == []
    # export writes GeoJSON and a preview next to the store, and says so
    w.export_btn.native.click()
    assert (tmp_path / "heat.geojson").is_file() and (tmp_path / "heat.png").is_file()
    assert json.loads((tmp_path / "heat.geojson").read_text())["type"] == "FeatureCollection"
    assert notes and notes[-1][0] == "info" and "heat.geojson" in notes[-1][1]


def test_localize_bad_input_notifies(
    make_napari_viewer: Callable[..., Any],
    qtbot: Any,
    small_slide: Path,
    nompp_slide: Path,
    checkpoint: Path,
    tmp_path: Path,
    notes: list[tuple[str, str]],
) -> None:
    viewer = make_napari_viewer()
    _, w = viewer.window.add_plugin_dock_widget("wsltool", "Localize")
    # no slide layer
    w.run_btn.native.click()
    assert not w.running
    assert notes[-1][0] == "error" and "open a slide first" in notes[-1][1]
    # no checkpoint chosen, or one that is not there
    viewer.open(str(small_slide), plugin="wsltool")
    w.run_btn.native.click()
    assert not w.running and notes[-1] == ("error", "Localize: choose a checkpoint file (.pt): none chosen")
    w.model.value = tmp_path / "gone.pt"
    w.run_btn.native.click()
    assert not w.running and notes[-1] == (
        "error",
        f"Localize: choose a checkpoint file (.pt): {tmp_path}/gone.pt not found",
    )
    # an output that holds another slide's heatmap is kept, not replaced (re-localizing a slide replaces its own)
    other = tmp_path / "other.zarr"
    HeatmapStore.create(
        other,
        shape_yx=(8, 8),
        out_mpp=4.0,
        slide_mpp=0.5,
        channel_names=["M+", "benign", "malignant"],
        provenance={"slide": {"path": str(tmp_path / "another.svs")}},
        chunk=16,
    )
    kept = (other / "zarr.json").read_bytes()
    w.model.value = checkpoint
    w.out.value = other
    w.run_btn.native.click()
    assert not w.running and notes[-1] == (
        "error",
        f"Localize: {other} holds the heatmap of {tmp_path}/another.svs; choose another output, or delete that store",
    )
    assert (other / "zarr.json").read_bytes() == kept
    # the same slide moved or copied together with its store is the same slide (same bytes)
    import shutil

    from wsltool.napari_plugin._widgets import _other_slides_store

    copy = shutil.copy(small_slide, tmp_path / "copy.svs")
    with open_slide(small_slide) as sl:
        fp = sl.fingerprint()
    same = tmp_path / "same.zarr"
    HeatmapStore.create(
        same,
        shape_yx=(8, 8),
        out_mpp=4.0,
        slide_mpp=0.5,
        channel_names=["M+", "benign", "malignant"],
        provenance={"slide": {"path": str(small_slide), "fingerprint": fp}},
        chunk=16,
    )
    assert _other_slides_store(same, str(copy)) is None and _other_slides_store(other, str(copy)) is not None
    # a slide without mpp: a message that says so and what to do
    viewer.layers.clear()
    viewer.open(str(nompp_slide), plugin="wsltool")
    w.model.value = checkpoint
    w.run_btn.native.click()
    assert not w.running and "nompp.svs has no usable mpp" in notes[-1][1] and "slide mpp" in notes[-1][1]
    n = len(notes)
    # a bad checkpoint (a text file named .pt): the worker fails, the viewer shows one line and stays usable
    bad = tmp_path / "bad.pt"
    bad.write_text("this is not a checkpoint\n")
    w.model.value = bad
    w.slide_mpp.value = 0.5
    w.config["workers"] = 0
    w.out.value = tmp_path / "bad.zarr"
    w.run_btn.native.click()
    _wait_idle(qtbot, w)
    assert len(notes) == n + 1
    sev, msg = notes[-1]
    assert sev == "error" and msg.startswith("Localize: ") and "bad.pt" in msg and "checkpoint" in msg
    assert "Traceback" not in msg and "\n" not in msg
    assert w.result.value == "failed" and w.run_btn.enabled and not w.cancel_btn.enabled
    # the mpp given for the slide without one puts the slide in micrometres, where its heatmap will be
    assert tuple(viewer.layers["nompp.svs"].scale) == (0.5, 0.5)


# -- 4. Retrain -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from wsltool.testing.cohort import make_cohort

    d = tmp_path_factory.mktemp("cohort")
    make_cohort(d, {"all": (2, 2)}, size=(768, 1024), seed=1)
    return d


RETRAIN_FAST = {
    "mil": {"region": 128, "score_cap": 8},
    "model": {"backbone": "efficientnet_lite0", "pretrained": "none"},
}


def _retrain_widget(viewer: Any) -> RetrainWidget:
    """A Retrain widget with small, fast settings, docked in ``viewer``."""
    w = RetrainWidget(viewer, **RETRAIN_FAST)  # type: ignore[arg-type]
    viewer.window.add_dock_widget(w, name="Retrain (fast)")
    return w


def test_retrain_end_to_end_sets_localize_checkpoint(
    make_napari_viewer: Callable[..., Any],
    qtbot: Any,
    cohort: Path,
    tmp_path: Path,
    notes: list[tuple[str, str]],
) -> None:
    viewer = make_napari_viewer()
    _, loc = viewer.window.add_plugin_dock_widget("wsltool", "Localize")
    w = _retrain_widget(viewer)
    assert Path(w.out.value) == Path(tempfile.gettempdir())  # default: runs go to <tmp>/wsltool-retrain[-N]
    # too few rows: a notification, no job
    w.run_btn.native.click()
    assert not w.running and "at least two classes" in notes[-1][1]
    # the table from a slides.csv (paths relative to the CSV)
    w.csv.value = cohort / "all.csv"
    rows = w.rows()
    assert len(rows) == 4 and sorted(lab for _, lab in rows) == ["benign", "benign", "malignant", "malignant"]
    assert all(Path(p).is_absolute() and Path(p).exists() for p, _ in rows)
    w.epochs.value = 1
    w.out.value = tmp_path
    w.run_btn.native.click()
    assert w.running and w.status.value == "training..."
    _wait_idle(qtbot, w)
    out = tmp_path / "wsltool-retrain"
    res = w.last_result
    assert res is not None and not res["stopped"], notes
    assert w.checkpoint == out / "best.pt" and w.checkpoint.is_file()
    hist = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert len(hist) == 1
    assert 0.0 <= hist[0]["valid_error"] <= 100.0 and "valid_auc" in hist[0]
    assert res["valid_error"] == hist[0]["valid_error"]
    assert len(w.history) == 1 and w.progress.value == 1
    assert "valid_error=" in w.log.value and "valid error" in w.status.value
    # usable right away by Localize
    assert Path(loc.model.value) == out / "best.pt"
    assert [n for n in notes if n[0] == "error"] == [
        ("error", "Retrain: the table needs slides of at least two classes")
    ]


def test_retrain_failure_names_the_rows_shown(
    make_napari_viewer: Callable[..., Any],
    qtbot: Any,
    cohort: Path,
    tmp_path: Path,
    notes: list[tuple[str, str]],
) -> None:
    viewer = make_napari_viewer()
    w = _retrain_widget(viewer)
    slides = sorted(cohort.glob("*.svs"))
    bad = tmp_path / "notes.svs"
    bad.write_text("not a slide")
    w.set_rows([(str(slides[0]), "benign"), ("", ""), (str(bad), "malignant"), (str(slides[1]), "")])
    assert list(w.table.row_headers) == [1, 2, 3, 4]  # numbered as a failed run counts them
    w.out.value = tmp_path
    w.run_btn.native.click()  # a half-filled row is refused by its number, before anything starts
    assert not w.running and notes[-1] == (
        "error",
        "Retrain: row 4 has a path but no label: fill it in or clear both cells",
    )
    w.set_rows([(str(slides[0]), "benign"), ("", ""), (str(bad), "malignant"), (str(slides[1]), "malignant")])
    # a slides.csv that is not there, or a folder; an output folder that is a file; fine-tuning with no checkpoint
    for value, words in ((tmp_path / "nope.csv", "nope.csv not found"), (tmp_path, "is a folder, not a file")):
        before = len(notes)
        w.csv.value = value  # as each keystroke would: nothing said while a path is being typed ...
        assert len(notes) == before
        w.csv.line_edit.native.editingFinished.emit()  # ... then once, when the typing ends
        assert len(notes) == before + 1 and notes[-1][1].startswith("Retrain: cannot load slides.csv: ")
        assert notes[-1][1].endswith(words) and len(w.rows()) == 3  # the table is left as it was
    w.out.value = bad
    w.run_btn.native.click()
    assert not w.running and notes[-1] == ("error", f"Retrain: output folder: {bad}: exists and is not a folder")
    w.out.value = tmp_path
    w.finetune.value = True
    w.run_btn.native.click()
    assert not w.running and notes[-1] == ("error", "Retrain: fine-tuning needs a checkpoint file: none chosen")
    w.finetune.value = False
    w.run_btn.native.click()
    assert w.running and not w.table.enabled and not w.csv.enabled  # the rows a failure names stay put
    # the blank row went out of the table, so the rows the error names are the rows shown
    assert w.rows() == [(str(slides[0]), "benign"), (str(bad), "malignant"), (str(slides[1]), "malignant")]
    assert list(w.table.row_headers) == [1, 2, 3] and w.table.data.to_list()[1][0] == str(bad)
    _wait_idle(qtbot, w)
    kind, msg = notes[-1]
    assert kind == "error" and msg.startswith(f"Retrain: the Retrain table: 1 problem(s): row 2: {bad}: not a slide")
    assert "slides.csv" not in msg and w.status.value == "failed"
    assert not (tmp_path / "wsltool-retrain").exists()
    assert w.table.enabled and w.csv.enabled and w.add_open.enabled


def test_retrain_cancel(
    make_napari_viewer: Callable[..., Any],
    qtbot: Any,
    cohort: Path,
    tmp_path: Path,
    small_slide: Path,
    notes: list[tuple[str, str]],
) -> None:
    viewer = make_napari_viewer()
    w = _retrain_widget(viewer)
    # rows from the open slides, with the label chosen for them
    viewer.open(str(small_slide), plugin="wsltool")
    w.labels_txt.value = "malignant"
    w.add_open.native.click()
    assert w.rows() == [(str(small_slide), "malignant")]
    w.set_rows([(str(p), p.stem.split("_")[-1]) for p in sorted(cohort.glob("*.svs"))])
    w.epochs.value = 5
    w.out.value = tmp_path
    earlier = tmp_path / "wsltool-retrain"  # a model from an earlier retrain stays: this run goes next to it
    earlier.mkdir()
    (earlier / "best.pt").write_bytes(b"the pathologist's earlier model")
    w.run_btn.native.click()
    w.cancel_btn.native.click()
    assert w.status.value == "cancelling..."
    _wait_idle(qtbot, w)
    res = w.last_result
    assert res is not None and res["stopped"] is True and res["epochs"] == 1  # stopped within the first epoch
    assert "stopped early" in w.status.value
    assert (tmp_path / "wsltool-retrain-2" / "last.pt").is_file()
    assert w.checkpoint == tmp_path / "wsltool-retrain-2" / "best.pt" and w.checkpoint.is_file()
    assert (earlier / "best.pt").read_bytes() == b"the pathologist's earlier model"
    assert sorted(p.name for p in earlier.iterdir()) == ["best.pt"]
    assert w.run_btn.enabled and not w.cancel_btn.enabled
    assert [n for n in notes if n[0] == "error"] == []


# -- the worker process ----------------------------------------------------------------------------------------------
JOB_TASKS = """
import os, signal, time

def ok(*, emit, cancelled, n):
    for i in range(n):
        emit("progress", (i + 1, n))
    return {"n": n}

def fails(*, emit, cancelled):
    raise ValueError("bad value\\nsecond line")

def crashes(*, emit, cancelled):
    emit("progress", (0, 1))
    os.kill(os.getpid(), signal.SIGSEGV)

def waits(*, emit, cancelled):
    while not cancelled():
        time.sleep(0.01)
    return "stopped"
"""


def test_process_job_messages_errors_crash_cancel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from wsltool.napari_plugin._jobs import ProcessJob

    (tmp_path / "wsl_job_tasks.py").write_text(JOB_TASKS)
    monkeypatch.syspath_prepend(str(tmp_path))  # the spawned child gets the parent's sys.path
    msgs = list(ProcessJob("wsl_job_tasks:ok", n=3).start().messages())
    assert msgs == [("progress", (1, 3)), ("progress", (2, 3)), ("progress", (3, 3)), ("done", {"n": 3})]
    assert list(ProcessJob("wsl_job_tasks:fails").start().messages()) == [("error", "ValueError: bad value")]
    # a segfault in the worker: the viewer's side gets one error message with the exit code (a message put just
    # before the crash may be lost with the queue's feeder thread)
    msgs = list(ProcessJob("wsl_job_tasks:crashes").start().messages())
    assert msgs[-1] == ("error", "worker process died (exit code -11)")
    assert [k for k, _ in msgs].count("error") == 1
    job = ProcessJob("wsl_job_tasks:waits").start()
    job.cancel()
    assert job.cancelled and list(job.messages()) == [("done", "stopped")]


# -- 5. the viewer process never imports torch ----------------------------------------------------------------------
TORCH_FREE = """
import sys, json
from pathlib import Path

def main(slide, ckpt, out):
    import napari
    from qtpy.QtCore import QCoreApplication
    viewer = napari.Viewer(show=False)
    viewer.open(slide, plugin="wsltool")
    _, loc = viewer.window.add_plugin_dock_widget("wsltool", "Localize")
    _, ret = viewer.window.add_plugin_dock_widget("wsltool", "Retrain")
    ret.add_open.native.click()
    loc.config["workers"] = 0
    loc.model.value = ckpt
    loc.overlap.value = 0
    loc.tta.value = "flips"
    loc.out.value = out
    loc.run_btn.native.click()   # a ProcessJob (spawned worker process)
    import time
    t0 = time.time()
    while loc.running and time.time() - t0 < 200:
        QCoreApplication.processEvents()
        time.sleep(0.05)
    QCoreApplication.processEvents()
    names = [ly.name for ly in viewer.layers]
    bad = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision", "triton"))
    print(json.dumps({"result": loc.last_result, "layers": names, "torch": bad, "rows": len(ret.rows())}))
    viewer.close()

if __name__ == "__main__":
    main(*sys.argv[1:4])
"""


def test_viewer_process_never_imports_torch(small_slide: Path, checkpoint: Path, tmp_path: Path) -> None:
    script = tmp_path / "viewer_no_torch.py"
    script.write_text(textwrap.dedent(TORCH_FREE))
    env = dict(os.environ)
    if not env.get("DISPLAY"):
        env["QT_QPA_PLATFORM"] = "offscreen"
    out = tmp_path / "nt.zarr"
    r = subprocess.run(
        [sys.executable, str(script), str(small_slide), str(checkpoint), str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads(r.stdout.strip().splitlines()[-1])
    assert rep["torch"] == []
    assert rep["result"] is not None and rep["result"]["store"] == str(out) and rep["rows"] == 1
    st = HeatmapStore.open(out)
    assert st.complete and st.provenance["config"]["tta"] == "flips"  # the widget's view averaging reached it
    assert "nt M+" in rep["layers"]


# -- 6. GL screenshot: the heatmap colour over the lesion, not over glass --------------------------------------------
@pytest.mark.gl
def test_screenshot_overlay_over_lesion(make_napari_viewer: Callable[..., Any], qtbot: Any) -> None:
    if not os.environ.get("DISPLAY"):
        pytest.fail("the GL test needs an X display: install xvfb (make apt); pytest-xvfb then starts it")
    from wsltool.napari_plugin._sample import sample_data

    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1100, 900)
    for data, kw, kind in sample_data():
        getattr(viewer, f"add_{kind}")(data, **kw)
    heat = viewer.layers["sample M+"]
    st = HeatmapStore.open(heat.metadata["wsltool"]["store"])
    mplus = st.mplus(0).astype(np.float32)
    tissue = st.tissue(0) > 0
    viewer.reset_view()
    qtbot.wait(200)
    overlays = [ly for ly in viewer.layers if ly.name.startswith("sample ")]
    vis = {ly.name: ly.visible for ly in overlays}
    for ly in overlays:
        ly.visible = False
    bare = viewer.screenshot(canvas_only=True, flash=False)[..., :3].astype(np.int16)
    for ly in overlays:
        ly.visible = vis[ly.name]
    shot = viewer.screenshot(canvas_only=True, flash=False)[..., :3].astype(np.int16)
    assert shot.shape == bare.shape
    # canvas pixel -> world (um) -> heatmap pixel; the heatmap pixel j covers [j*s, (j+1)*s) from the slide's edge
    h, w = shot.shape[:2]
    camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera  # napari >= 0.9 / older
    cy, cx = camera.center[-2:]
    zoom = camera.zoom
    rr, cc = np.mgrid[0:h, 0:w]
    wy = cy + (rr + 0.5 - h / 2) / zoom
    wx = cx + (cc + 0.5 - w / 2) / zoom
    edge = -SLIDE_MPP / 2
    hy = np.floor((wy - edge) / st.out_mpp).astype(int)
    hx = np.floor((wx - edge) / st.out_mpp).astype(int)
    inside = (hy >= 0) & (hy < mplus.shape[0]) & (hx >= 0) & (hx < mplus.shape[1])
    hyc, hxc = np.clip(hy, 0, mplus.shape[0] - 1), np.clip(hx, 0, mplus.shape[1] - 1)
    from scipy import ndimage

    core = ndimage.binary_erosion(mplus > 0.9, iterations=2)[hyc, hxc] & inside
    glass = ~ndimage.binary_dilation(tissue | (mplus > 0), iterations=3)[hyc, hxc] & inside
    assert core.sum() > 2000 and glass.sum() > 2000, (core.sum(), glass.sum())
    diff = np.abs(shot - bare).sum(axis=-1)
    # over glass the overlay is transparent: the picture is unchanged and stays grey-white glass
    assert np.median(diff[glass]) <= 3
    g = shot[glass].mean(axis=0)
    assert g.min() > 200 and g.max() - g.min() < 15, g
    # over the lesion the inferno colour shows: the bare slide blended with inferno(M+) at the layer's opacity
    m = mplus[hyc[core], hxc[core]]
    rgba = np.asarray(heat.colormap.map(m))
    a = (rgba[:, 3] * heat.opacity)[:, None]
    expected = bare[core] * (1 - a) + 255 * rgba[:, :3] * a
    assert np.median(diff[core]) > 60
    assert np.median(np.abs(shot[core] - expected)) < 20
    r, g, b = shot[core].mean(axis=0)
    assert r > 190 and r - b > 40, (r, g, b)  # bright and warm, unlike the pink/purple tissue or the glass
