"""HeatmapStore: format values, pyramid, labels, readers, and the failure paths (real failures)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import types
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from wsltool.errors import DataError, StoreError, StoreExistsError
from wsltool.infer.stitch import Stitcher
from wsltool.store import FORMAT_VERSION, HeatmapStore, level_shapes, level_transforms

NAMES = ["M+", "tumour", "normal"]
OUT_MPP, SLIDE_MPP = 2.0, 0.5
PROV = {
    "slide": {"path": "/data/s1.svs", "size": [2800, 4400], "fingerprint": "sha256:abc"},
    "mpp": {"requested": 1.0, "effective": 1.0, "source": "slide"},
    "region": 512,
    "overlap": 64,
    "model": {"fingerprint": "sha256:def", "method": "minmax"},
    "config": {"batch": 8, "workers": 2},
    "wsltool_version": "0.1.0",
    "timings": {"inference_s": 1.0},
}


def create(path: Path, shape: tuple[int, int] = (700, 1100), chunk: int = 256, **kw: object) -> HeatmapStore:
    kw.setdefault("provenance", PROV)
    return HeatmapStore.create(
        path,
        shape_yx=shape,
        out_mpp=OUT_MPP,
        slide_mpp=SLIDE_MPP,
        channel_names=NAMES,
        chunk=chunk,
        **kw,  # type: ignore[arg-type]
    )


def fill(store: HeatmapStore, value: float | None = None, seed: int = 0, stop_after: int | None = None) -> None:
    """Write every band: a constant, or random values in [0, 1] (hard to compress)."""
    rng = np.random.default_rng(seed)
    w = store.shape_yx[1]
    for b, (r0, r1) in enumerate(store.iter_bands()):
        if stop_after is not None and b == stop_after:
            msg = "simulated crash inside the inference loop"
            raise RuntimeError(msg)
        shape = (len(store.channel_names), r1 - r0, w)
        store.write_band(b, np.full(shape, value, np.float32) if value is not None else rng.random(shape, np.float32))


def finished(path: Path, value: float | None = None, **kw: object) -> HeatmapStore:
    store = create(path, **kw)
    store.region_table(4, 2)[np.array([0, 3])] = [[0.5, 0.5], [0.2, 0.8]]  # readers must ignore it
    fill(store, value)
    tissue = np.zeros((70, 110), bool)
    tissue[10:60, 20:100] = True
    return store.finalize({"p_malignant": 0.8, "aggregation": "top-k mean"}, tissue=tissue, threshold=0.5)


def ref_downsample(a: np.ndarray) -> np.ndarray:
    """Independent 2x mean: pad odd edges with NaN, reshape, nanmean."""
    c, h, w = a.shape
    p = np.full((c, h + h % 2, w + w % 2), np.nan)
    p[:, :h, :w] = a
    return np.nanmean(p.reshape(c, p.shape[1] // 2, 2, p.shape[2] // 2, 2), axis=(2, 4)).astype(np.float16)


# ------------------------------------------------------------------------------------------------
def test_layout_metadata_and_values(tmp_path: Path) -> None:
    path = tmp_path / "s1.zarr"
    store = create(path)
    assert store.state == "incomplete" and not store.complete
    fill(store, seed=1)
    assert HeatmapStore.open(path).state == "incomplete"
    tissue = np.zeros((70, 110), bool)  # a 10x coarser tissue mask covering the slide
    tissue[10:60, 20:100] = True
    store.finalize({"p_malignant": 0.8}, tissue=tissue, threshold=0.5, provenance={"timings": {"total_s": 2.0}})

    s = HeatmapStore.open(path)
    assert s.complete and s.state == "complete" and s.format_version == FORMAT_VERSION == "1.0"
    assert s.result == {"p_malignant": 0.8} and s.threshold == 0.5
    assert s.provenance["model"] == PROV["model"] and s.provenance["timings"] == {"total_s": 2.0}
    assert s.channel_names == NAMES and s.out_mpp == OUT_MPP and s.slide_mpp == SLIDE_MPP

    root = json.loads((path / "zarr.json").read_text())["attributes"]
    ome = root["ome"]
    assert ome["version"] == "0.5"
    ms = ome["multiscales"][0]
    assert [a["name"] for a in ms["axes"]] == ["c", "y", "x"]
    assert [a.get("unit") for a in ms["axes"]] == [None, "micrometer", "micrometer"]
    assert [c["label"] for c in ome["omero"]["channels"]] == NAMES
    shapes = level_shapes((700, 1100), 256)
    assert shapes == [(700, 1100), (350, 550), (175, 275), (88, 138)]
    assert [tuple(a.shape) for a in s.levels] == [(3, *sh) for sh in shapes]
    for i, ds in enumerate(ms["datasets"]):
        scale, trans = ds["coordinateTransformations"]
        assert scale == {"type": "scale", "scale": [1.0, 2.0 * 2**i, 2.0 * 2**i]}
        t = 0.5 * (2.0 * 2**i - 0.5)
        assert trans == {"type": "translation", "translation": [0.0, t, t]}
    arr = s.levels[0]
    assert arr.dtype == np.float16 and arr.chunks == (1, 256, 256)
    assert "blosc" in json.dumps(json.loads((path / "0" / "zarr.json").read_text())["codecs"]).lower()
    assert root["wsltool"]["progress"]["final_bands"] == [0, 1, 2]

    # pyramid: each level is the 2x mean of the one below (odd edges: mean of the pixels that exist)
    prev = np.asarray(s.levels[0][...]).astype(np.float64)
    for lvl in s.levels[1:]:
        got = np.asarray(lvl[...])
        np.testing.assert_array_equal(got, ref_downsample(prev))
        prev = got.astype(np.float64)
    assert np.array_equal(s.mplus(2), np.asarray(s.levels[2][0]))
    assert np.array_equal(s.channel("normal"), np.asarray(s.levels[0][2]))

    # labels: tissue resampled by nearest neighbour at heatmap pixel centres; mask = M+ >= 0.5 in tissue
    t0 = s.tissue(0)
    exp_t = np.zeros((700, 1100), np.uint8)
    exp_t[100:600, 200:1000] = 1
    np.testing.assert_array_equal(t0, exp_t)
    np.testing.assert_array_equal(s.mask(0), ((s.mplus(0) >= 0.5) & (exp_t > 0)).astype(np.uint8))
    assert 0 < s.mask(0).sum() < exp_t.sum()
    for i in range(1, len(shapes)):
        np.testing.assert_array_equal(s.mask(i), s.mask(0)[:: 2**i, :: 2**i])
        np.testing.assert_array_equal(s.tissue(i), t0[:: 2**i, :: 2**i])
    lab = json.loads((path / "labels" / "zarr.json").read_text())["attributes"]["ome"]
    assert lab["labels"] == ["mask", "tissue"] and lab["version"] == "0.5"
    mask_ome = json.loads((path / "labels" / "mask" / "zarr.json").read_text())["attributes"]["ome"]
    assert mask_ome["image-label"]["version"] == "0.5"
    assert [a["name"] for a in mask_ome["multiscales"][0]["axes"]] == ["y", "x"]
    assert mask_ome["multiscales"][0]["datasets"][1]["coordinateTransformations"] == level_transforms(
        OUT_MPP, SLIDE_MPP, 1, ndim=2
    )


def test_region_table_timings_and_tissue_mask_object(tmp_path: Path) -> None:
    path = tmp_path / "s1.zarr"
    store = create(path)
    table = store.region_table(10, 2)
    assert table.shape == (10, 2) and np.all(np.isnan(table[:]))
    table[np.array([7, 2])] = np.array([[0.1, 0.9], [0.6, 0.4]])
    store.write_band(0, np.full((3, 256, 1100), 0.7, np.float32))
    # an interrupted run: the table survives into the resumed one
    again = create(path, resume=True)
    t2 = again.region_table(10, 2)
    np.testing.assert_array_equal(t2[np.array([2, 7])], np.array([[0.6, 0.4], [0.1, 0.9]], np.float32))
    assert np.isnan(t2[0]).all()
    for b in (1, 2):
        again.write_band(b, np.full((3, min(256, 700 - 256 * b), 1100), 0.7, np.float32))
    # a TissueMask-like object: mask at 20 um/px covering the slide from its corner
    tm = np.zeros((35, 55), bool)
    tm[5:30, 10:50] = True
    again.finalize({"p": 0.7}, tissue=types.SimpleNamespace(mask=tm, mpp=20.0))
    again.set_timings({"finalize": 0.5, "total": 3.0})
    s = HeatmapStore.open(path)
    assert s.provenance["timings"] == {"inference_s": 1.0, "finalize": 0.5, "total": 3.0}
    exp = np.zeros((700, 1100), np.uint8)
    exp[50:300, 100:500] = 1  # 20 um tissue pixels are 10 heatmap pixels of 2 um
    np.testing.assert_array_equal(s.tissue(), exp)
    np.testing.assert_array_equal(s.mask(), exp)  # M+ = 0.7 >= 0.5 everywhere


def test_transforms_overlay_the_slide() -> None:
    # napari draws pixel centres at index * scale + translate.  A heatmap pixel j of level i covers
    # slide pixels [j * k, (j + 1) * k) with k = 2**i * out_mpp / slide_mpp: its centre must land on the
    # mean of their centres, for every level.
    for out_mpp, slide_mpp in [(2.0, 0.5), (4.0, 0.25), (1.0, 1.0)]:
        for i in range(4):
            (sc, tr) = level_transforms(out_mpp, slide_mpp, i, ndim=2)
            k = round(2**i * out_mpp / slide_mpp)
            for j in (0, 1, 7):
                heat_centre = j * sc["scale"][0] + tr["translation"][0]
                slide_centre = np.mean(np.arange(j * k, (j + 1) * k) * slide_mpp)
                assert heat_centre == pytest.approx(slide_centre)


def test_level_shapes_stop_below_chunk() -> None:
    assert level_shapes((100, 200), 512) == [(100, 200)]
    shapes = level_shapes((5000, 3001), 512)
    assert max(shapes[-1]) < 512 and max(shapes[-2]) >= 512
    assert shapes[1] == (2500, 1501)


def test_readers_ome_zarr_py_and_napari(tmp_path: Path) -> None:
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    path = tmp_path / "s1.zarr"
    finished(path)
    nodes = list(Reader(parse_url(str(path)))())
    image = nodes[0]
    assert [d.shape for d in image.data] == [(3, *sh) for sh in level_shapes((700, 1100), 256)]
    assert [a["name"] for a in image.metadata["axes"]] == ["c", "y", "x"]
    assert image.metadata["coordinateTransformations"][0][0]["scale"] == [1.0, 2.0, 2.0]
    assert image.metadata["coordinateTransformations"][0][1]["translation"] == [0.0, 0.75, 0.75]
    assert image.metadata["name"] == "heatmap" and image.metadata["channel_names"] == NAMES
    labels = {n.zarr.path.rstrip("/").split("/")[-1]: n for n in nodes[1:]}
    assert {"mask", "tissue"} <= set(labels)
    assert labels["mask"].data[0].shape == (700, 1100)
    np.testing.assert_array_equal(np.asarray(labels["mask"].data[0]), HeatmapStore.open(path).mask())

    napari_ome_zarr = pytest.importorskip("napari_ome_zarr")
    reader = napari_ome_zarr.napari_get_reader(str(path))
    assert reader is not None
    layers = reader(str(path))
    kinds = [kind for _, _, kind in layers]
    assert kinds.count("image") == 1 and kinds.count("labels") == 2
    data, meta, _ = next(x for x in layers if x[2] == "image")
    assert len(data) == 4 and data[0].shape == (3, 700, 1100)
    assert meta["channel_axis"] == 0 and meta["scale"] == [OUT_MPP, OUT_MPP]
    assert [n.split(": ")[-1] for n in meta["name"]] == NAMES
    # napari-ome-zarr 0.10 applies only the first dataset transform (the scale) and drops the
    # translation; then the overlay is off by 0.5 * (out_mpp - slide_mpp) < half a heatmap pixel.
    translate = np.asarray(meta["affine"].translate)
    assert np.allclose(translate, 0.0) or np.allclose(translate, 0.75)
    for data, meta, kind in layers:
        if kind == "labels":
            assert data[0].shape == (700, 1100) and meta["scale"] == [OUT_MPP, OUT_MPP]


def test_complete_store_in_the_way(tmp_path: Path) -> None:
    path = tmp_path / "s1.zarr"
    finished(path, value=0.25)
    with pytest.raises(StoreExistsError, match="--overwrite") as e:
        create(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    assert isinstance(e.value, FileExistsError)
    # --resume on a finished store with the same settings: nothing to do
    same = create(path, resume=True)
    assert same.complete
    with pytest.raises(StoreError):
        same.write_band(0, np.zeros((3, 256, 1100), np.float32))
    # ... with other settings: refused
    with pytest.raises(StoreExistsError, match="model"):
        create(path, resume=True, provenance={**PROV, "model": {"fingerprint": "sha256:other"}})
    # something else in the way
    other = tmp_path / "notes.zarr"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(StoreExistsError, match="not a wsltool"):
        create(other)
    with pytest.raises(StoreExistsError, match="not a wsltool"):
        create(other, overwrite=True)  # never replaced: it could be any folder of the user's
    assert (other / "notes.txt").read_text() == "mine"
    empty = tmp_path / "empty.zarr"
    empty.mkdir()
    assert create(empty).state == "incomplete"


def test_incomplete_store_resume_rules(tmp_path: Path) -> None:
    path = tmp_path / "s1.zarr"
    store = create(path)
    store.write_band(0, np.full((3, 256, 1100), 0.5, np.float32))
    # timings and worker counts may change between runs; the model may not
    changed = {**PROV, "timings": {"inference_s": 99.0}, "config": {"batch": 32, "workers": 8}}
    again = create(path, resume=True, provenance=changed)
    assert again.final_bands() == {0}
    with pytest.raises(StoreError, match=r"provenance\.model\.fingerprint"):
        create(path, resume=True, provenance={**PROV, "model": {"fingerprint": "x", "method": "minmax"}})
    with pytest.raises(StoreError, match=r"grid\.shape_yx"):
        create(path, shape=(700, 1000), resume=True)
    # without --resume an interrupted store is started over
    fresh = create(path)
    assert fresh.final_bands() == set() and fresh.state == "incomplete"
    with pytest.raises(StoreError, match="2 of 3 row bands"):
        fresh.write_band(0, np.zeros((3, 256, 1100), np.float32))
        fresh.finalize({})


def test_overwrite_keeps_the_old_store_until_the_new_one_is_complete(tmp_path: Path) -> None:
    path = tmp_path / "s1.zarr"
    finished(path, value=0.25)
    new = create(path, overwrite=True)
    assert new.write_path != path and new.write_path.parent == path.parent
    with pytest.raises(RuntimeError, match="simulated crash"):
        fill(new, 0.75, stop_after=2)
    old = HeatmapStore.open(path)
    assert old.complete and np.all(old.mplus() == np.float16(0.25))
    # a second --overwrite run finishes and swaps in; nothing is left beside it
    new = create(path, overwrite=True)
    fill(new, 0.75)
    new.finalize({"p_malignant": 0.1})
    s = HeatmapStore.open(path)
    assert s.complete and np.all(s.mplus() == np.float16(0.75)) and s.result == {"p_malignant": 0.1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s1.zarr"]


def test_overwrite_run_can_be_resumed(tmp_path: Path) -> None:
    path = tmp_path / "s1.zarr"
    finished(path, value=0.25)
    new = create(path, overwrite=True)
    with pytest.raises(RuntimeError):
        fill(new, 0.75, stop_after=2)
    resumed = create(path, overwrite=True, resume=True)
    assert resumed.final_bands() == {0, 1}
    resumed.write_band(2, np.full((3, 700 - 512, 1100), 0.75, np.float32))
    resumed.finalize({})
    assert np.all(HeatmapStore.open(path).mplus() == np.float16(0.75))


def test_open_errors(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="does not exist"):
        HeatmapStore.open(tmp_path / "missing.zarr")
    (tmp_path / "plain").mkdir()
    with pytest.raises(StoreError, match="not a wsltool heatmap store"):
        HeatmapStore.open(tmp_path / "plain")
    with pytest.raises(DataError, match="start with 'M\\+'"):
        HeatmapStore.create(
            tmp_path / "x.zarr", shape_yx=(10, 10), out_mpp=1, slide_mpp=1, channel_names=["a"], provenance={}
        )
    with pytest.raises(DataError, match="JSON"):
        create(tmp_path / "y.zarr", provenance={"bad": object()})


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (lambda p: shutil.rmtree(p / "1"), "level array '1' missing"),
        (lambda p: (p / "0" / "zarr.json").unlink(), "level array '0' missing"),
        (lambda p: shutil.rmtree(p / "labels" / "mask"), "label image 'mask' missing or unreadable"),
        (lambda p: (p / "labels" / "zarr.json").write_text("{"), "label image 'mask' missing or unreadable"),
        (lambda p: (p / "0" / "zarr.json").write_text("{"), "level array '0' unreadable (JSONDecodeError)"),
        (lambda p: shutil.rmtree(p / "labels" / "tissue" / "2"), "level array '2' of label image 'tissue' missing"),
        (lambda p: _edit_attrs(p, lambda w: w.pop("grid")), "wsltool attribute 'grid' missing"),
        (lambda p: _edit_attrs(p, lambda w: w["grid"].pop("chunk")), "wsltool attribute 'grid.chunk' missing"),
        (
            lambda p: _edit_attrs(p, lambda w: w["progress"].pop("n_bands")),
            "wsltool attribute 'progress.n_bands' missing",
        ),
        # a lost chunk would read as zeros (no malignancy there): 3 channels x 5 x 7 chunks at level 0
        (lambda p: (p / "0" / "c" / "0" / "2" / "3").unlink(), "1 of 105 chunk files of array '0' missing"),
        (lambda p: shutil.rmtree(p / "0" / "c" / "1"), "35 of 105 chunk files of array '0' missing"),
        (
            lambda p: (p / "labels" / "tissue" / "0" / "c" / "1" / "1").unlink(),
            "1 of 24 chunk files of array 'labels/tissue/0' missing",
        ),
        (lambda p: shutil.rmtree(p / "wsltool" / "region_probs" / "c"), "of array 'wsltool/region_probs' missing"),
        # a link whose target is gone (git-annex/DVC content dropped) reads as zeros too: not a chunk
        (lambda p: _dangle(p / "0" / "c" / "0" / "2" / "3"), "1 of 105 chunk files of array '0' missing"),
        # a stray file beside a lost chunk does not stand in for it
        (
            lambda p: ((p / "0" / "c" / "0" / "2" / "3").unlink(), (p / "0" / "c" / "0" / "2" / ".DS_Store").touch()),
            "1 of 105 chunk files of array '0' missing",
        ),
    ],
)
def test_a_damaged_store_is_refused_at_open_naming_what_is_missing(
    tmp_path: Path, damage: Callable[[Path], object], problem: str
) -> None:
    p = tmp_path / "h.zarr"
    finished(p, 0.25, shape=(70, 110), chunk=16)
    assert len(HeatmapStore.open(p).levels) >= 3
    damage(p)
    with pytest.raises(StoreError) as ei:
        HeatmapStore.open(p)
    assert str(ei.value).startswith(f"{p}: corrupt heatmap store: ") and str(ei.value).endswith(problem)
    assert "\n" not in str(ei.value)
    # infer's resume finds it in the way: the message says how to replace it
    with pytest.raises(StoreExistsError, match=r"; use --overwrite to replace it$"):
        create(p, shape=(70, 110), chunk=16, resume=True)


def test_chunks_a_store_never_wrote_are_not_missing_and_older_stores_are_not_counted(tmp_path: Path) -> None:
    # all-zero maps and an empty mask: zarr writes no chunk for them, and the store is whole
    p = finished(tmp_path / "zero.zarr", 0.0, shape=(70, 110), chunk=16).path
    counts = json.loads((p / "zarr.json").read_text())["attributes"]["wsltool"]["chunk_files"]
    assert counts["0"] == 0 and counts["labels/mask/0"] == 0 and counts["labels/tissue/0"] == 24
    opened = HeatmapStore.open(p)
    assert opened.complete and np.all(opened.mplus() == 0)
    assert np.array_equal(opened.tissue() > 0, np.pad(np.ones((50, 80), bool), ((10, 10), (20, 10))))
    # a store finished before the count was recorded opens as before, even with a chunk gone
    q = finished(tmp_path / "old.zarr", 0.25, shape=(70, 110), chunk=16).path
    _edit_attrs(q, lambda w: w.pop("chunk_files"))
    (q / "0" / "c" / "0" / "2" / "3").unlink()
    assert HeatmapStore.open(q).complete


def test_a_damaged_chunk_is_a_one_line_store_error_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from wsltool.cli import main

    p = finished(tmp_path / "h.zarr", 0.25, shape=(70, 110), chunk=16).path
    (p / "0" / "c" / "0" / "2" / "3").write_bytes(b"not blosc")  # bit rot: the file is there, its bytes are not
    (p / "labels" / "tissue" / "0" / "c" / "1" / "1").write_bytes(b"")
    st = HeatmapStore.open(p)  # the files are all there: open() cannot know
    assert np.all(st.channel("tumour") == np.float16(0.25))  # the other channels and levels still read
    assert st.mplus(1).shape == (35, 55) and np.all(st.mplus(1) == np.float16(0.25))
    with pytest.raises(StoreError) as ei:
        st.mplus()
    assert str(ei.value) == (
        f"{p}: corrupt heatmap store: chunk 0/2/3 of array '0' unreadable"
        " (RuntimeError: error during blosc decompression: -1)"
    )
    with pytest.raises(StoreError, match=r"chunk 1/1 of array 'labels/tissue/0' unreadable \("):
        st.tissue()
    with pytest.raises(StoreError, match=r"chunk 0/2/3 of array '0' unreadable"):
        st.channel(-3)  # M+ counted from the end: the same chunk, named by its index
    with pytest.raises(IndexError, match=r"channel 3 out of range \(the store has 3: M\+, tumour, normal\)"):
        st.channel(3)  # the caller's mistake, not a damaged store
    # the CLI says it in one line, not with zarr's traceback
    assert main(["export", str(p), "--png", str(tmp_path / "x.png")]) != 0
    err = capsys.readouterr().err.strip()
    assert err == f"wsltool export: error: {ei.value}" and not (tmp_path / "x.png").exists()


def test_a_store_interrupted_while_being_created_is_named_so(tmp_path: Path) -> None:
    p = tmp_path / "h.zarr"
    create(p, shape=(70, 110), chunk=16)
    meta = json.loads((p / "zarr.json").read_text())
    del meta["attributes"]["ome"]  # killed before the multiscales metadata and the level arrays were written
    (p / "zarr.json").write_text(json.dumps(meta))
    shutil.rmtree(p / "0")
    with pytest.raises(StoreError, match="interrupted while being created, before any data"):
        HeatmapStore.open(p)
    assert not create(p, shape=(70, 110), chunk=16, resume=True).complete  # and a run starts it over


def _dangle(chunk: Path) -> None:
    chunk.unlink()
    chunk.symlink_to(chunk.with_name("gone"))


def test_chunks_behind_symlinks_count(tmp_path: Path) -> None:
    """A store whose chunk folders live elsewhere (linked in) is whole: the links are followed."""
    p = finished(tmp_path / "h.zarr", 0.25, shape=(70, 110), chunk=16).path
    elsewhere = tmp_path / "bulk" / "c"
    elsewhere.parent.mkdir()
    shutil.move(p / "0" / "c", elsewhere)
    (p / "0" / "c").symlink_to(elsewhere, target_is_directory=True)
    (elsewhere / "0" / "loop").symlink_to(elsewhere, target_is_directory=True)  # a loop is walked once
    st = HeatmapStore.open(p)
    assert st.complete and np.all(st.mplus() == np.float16(0.25))
    linked = tmp_path / "linked.zarr"
    linked.symlink_to(p, target_is_directory=True)
    assert np.all(HeatmapStore.open(linked).mplus() == np.float16(0.25))


def _edit_attrs(p: Path, edit: Callable[[dict[str, Any]], object]) -> None:
    meta = json.loads((p / "zarr.json").read_text())
    edit(meta["attributes"]["wsltool"])
    (p / "zarr.json").write_text(json.dumps(meta))


# ------------------------------------------------------------------------------------------------
# real failures: a read-only folder, a full disk, a file system that turns read-only mid-run
# ------------------------------------------------------------------------------------------------
def _mount_tmpfs(where: Path, options: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    where.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True)
    return r.returncode == 0


def _umount(where: Path) -> None:
    subprocess.run(["umount", str(where)], capture_output=True)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A tiny real file system (200 KiB tmpfs); needs root and mount."""
    where = tmp_path / f"tmpfs-{uuid.uuid4().hex[:6]}"
    if not _mount_tmpfs(where, "size=200k,mode=0755"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield where
    _umount(where)


@pytest.fixture
def readonly_dir(tmp_path: Path) -> Iterator[Path]:
    """A folder nobody may write to: chmod 555, or (as root, who ignores modes) a read-only tmpfs."""
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o555)
    try:
        (d / "probe").touch()
    except OSError:
        yield d
        d.chmod(0o755)
        return
    (d / "probe").unlink()
    d.chmod(0o755)
    if not _mount_tmpfs(d, "ro,size=64k"):
        pytest.skip("cannot make a read-only folder here (root without mount)")
    yield d
    _umount(d)


def test_readonly_folder_fails_before_any_work(readonly_dir: Path) -> None:
    with pytest.raises(StoreError, match="cannot create") as e:
        create(readonly_dir / "s1.zarr")
    assert str(readonly_dir / "s1.zarr") in str(e.value) and "\n" not in str(e.value)
    assert not (readonly_dir / "s1.zarr").exists()


def test_disk_full_is_a_store_error_and_the_store_stays_incomplete(tmpfs: Path) -> None:
    path = tmpfs / "s1.zarr"
    store = create(path, shape=(512, 512), chunk=64)  # 3 x 512 x 512 float16 noise: 1.5 MB > 200 KiB
    boxes = [(y, x, 64, 64) for y in range(0, 512, 64) for x in range(0, 512, 64)]
    rng = np.random.default_rng(0)
    with pytest.raises(StoreError, match="failed") as e, Stitcher(store, boxes) as st:
        for i in st.pending_indices():
            st.add(i, rng.random((3, 64, 64), np.float32))
    assert str(path) in str(e.value)
    assert isinstance(e.value.__cause__, OSError)
    s = HeatmapStore.open(path)
    assert s.state == "incomplete" and len(s.final_bands()) < s.n_bands


def test_file_system_turning_read_only_mid_run(tmp_path: Path) -> None:
    where = tmp_path / "fs"
    if not _mount_tmpfs(where, "size=20m"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        path = where / "s1.zarr"
        store = create(path)
        store.write_band(0, np.full((3, 256, 1100), 0.5, np.float32))
        subprocess.run(["mount", "-o", "remount,ro", str(where)], check=True, capture_output=True)
        with pytest.raises(StoreError, match="row band 1"):
            store.write_band(1, np.full((3, 256, 1100), 0.5, np.float32))
        s = HeatmapStore.open(path)
        assert s.state == "incomplete" and s.final_bands() == {0}
        with pytest.raises(StoreError):
            create(path, resume=True)  # resuming probes the location before any work
    finally:
        _umount(where)


def test_failure_during_finalize_never_looks_complete(tmp_path: Path) -> None:
    where = tmp_path / "fs"
    if not _mount_tmpfs(where, "size=20m"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        path = where / "s1.zarr"
        store = create(path)
        fill(store, 0.6)
        subprocess.run(["mount", "-o", "remount,ro", str(where)], check=True, capture_output=True)
        with pytest.raises(StoreError, match="pyramid"):
            store.finalize({"p": 1.0})
        assert HeatmapStore.open(path).state == "incomplete"
        subprocess.run(["mount", "-o", "remount,rw", str(where)], check=True, capture_output=True)
        create(path, resume=True).finalize({"p": 1.0})
        assert HeatmapStore.open(path).complete
    finally:
        _umount(where)
