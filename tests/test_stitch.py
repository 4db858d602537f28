"""Stitcher: values of known functions across region borders, seams, bounded memory, resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from wsltool.errors import DataError, StoreError
from wsltool.infer.stitch import Stitcher, blend_window, ramp
from wsltool.store import HeatmapStore

NAMES = ["M+", "tumour"]
F16_HALF_ULP = 2.0**-12  # float16 rounding error bound for values in [0, 1)

Fn = Callable[[np.ndarray, np.ndarray], np.ndarray]


def make_store(path: Path, shape: tuple[int, int], chunk: int = 64, **kw: object) -> HeatmapStore:
    return HeatmapStore.create(
        path,
        shape_yx=shape,
        out_mpp=2.0,
        slide_mpp=0.5,
        channel_names=NAMES,
        provenance={"slide": "syn.svs", "model": "stub"},
        chunk=chunk,
        **kw,  # type: ignore[arg-type]
    )


def grid_boxes(shape: tuple[int, int], size: int, overlap: int, clip: bool = False) -> list[tuple[int, int, int, int]]:
    """Regions of ``size`` with ``overlap`` from (0, 0); the last row/column reaches beyond the grid
    (or is clipped to it: the partial edge region)."""
    stride = size - overlap
    h, w = shape

    def starts(n: int) -> list[int]:
        out = [0]
        while out[-1] + size < n:
            out.append(out[-1] + stride)
        return out

    boxes = []
    for y in starts(h):
        for x in starts(w):
            bh, bw = (min(size, h - y), min(size, w - x)) if clip else (size, size)
            boxes.append((y, x, bh, bw))
    return boxes


def ramp_fn(shape: tuple[int, int]) -> Fn:
    h, w = shape
    return lambda yy, xx: 0.1 + 0.4 * yy / h + 0.45 * xx / w


def disk_fn(shape: tuple[int, int]) -> Fn:
    h, w = shape
    cy, cx, r = 0.45 * h, 0.55 * w, 0.3 * min(h, w)
    return lambda yy, xx: ((yy - cy) ** 2 + (xx - cx) ** 2 <= r**2).astype(np.float64)


def region_maps(box: tuple[int, int, int, int], fns: list[Fn], shape: tuple[int, int], pad: float) -> np.ndarray:
    """The model stub: each channel is a known function of the pixel-centre position; outside the
    slide the region is padding (``pad``), which the stitcher must ignore."""
    y0, x0, h, w = box
    yy, xx = np.meshgrid(np.arange(y0, y0 + h) + 0.5, np.arange(x0, x0 + w) + 0.5, indexing="ij")
    out = np.stack([f(yy, xx) for f in fns]).astype(np.float32)
    outside = (yy >= shape[0]) | (xx >= shape[1]) | (yy < 0) | (xx < 0)
    out[:, outside] = pad
    return out


def truth(fns: list[Fn], shape: tuple[int, int]) -> np.ndarray:
    return region_maps((0, 0, *shape), fns, shape, 0.0).astype(np.float64)


def level0(store: HeatmapStore) -> np.ndarray:
    return np.asarray(store.levels[0][...])


def run(store: HeatmapStore, boxes: list, fns: list[Fn], order: list[int] | None = None, **kw: object) -> Stitcher:
    st = Stitcher(store, boxes, **kw)  # type: ignore[arg-type]
    for i in st.pending_indices() if order is None else order:
        st.add(i, region_maps(boxes[i], fns, store.shape_yx, pad=1.0))
    return st


# ------------------------------------------------------------------------------------------------
def test_window_is_smooth_positive_and_partition_of_unity_without_floor() -> None:
    r = ramp(64, 16, floor=0.1)
    assert r.min() >= 0.1 and r.max() == 1.0 and np.allclose(r, r[::-1])
    assert np.all(np.diff(r[:16]) > 0) and np.all(r[16:48] == 1.0)
    # two neighbours overlapping by 16 px: without a floor the ramps sum to exactly 1
    r0 = ramp(64, 16, floor=0.0)
    assert np.allclose(r0[48:] + r0[:16], 1.0)
    assert np.all(ramp(10, 0) == 1.0)
    assert blend_window(8, 12, 4, 0.2).shape == (8, 12) and blend_window(8, 12, 4, 0.2).min() > 0


@pytest.mark.parametrize("overlap", [0, 32, 128])
@pytest.mark.parametrize("clip", [False, True], ids=["beyond-edge", "partial-edge"])
def test_known_functions_are_reproduced(tmp_path: Path, overlap: int, clip: bool) -> None:
    # float16 storage is the only error that is allowed to show: |stored - f| <= half a float16 ulp
    # (2.4e-4 for values < 1), well inside the 1e-3 requirement; the fixed-point blend adds ~1e-6.
    shape = (300, 421)  # not a multiple of the chunk (64) nor of the stride
    fns = [ramp_fn(shape), disk_fn(shape)]
    store = make_store(tmp_path / "h.zarr", shape)
    boxes = grid_boxes(shape, 160, overlap, clip=clip)
    st = run(store, boxes, fns, overlap=overlap)
    assert st.done and st.pending_indices() == []
    st.finalize({"p": 1.0})
    got = level0(store).astype(np.float64)
    err = np.abs(got - truth(fns, shape))
    assert err.max() < 1e-3
    assert err.max() <= F16_HALF_ULP + 1e-5
    assert np.array_equal(got[1], truth(fns, shape)[1])  # the disk is 0/1: exact, also at the slide border


def test_uncovered_pixels_are_zero(tmp_path: Path) -> None:
    shape = (256, 256)
    fns = [ramp_fn(shape), disk_fn(shape)]
    store = make_store(tmp_path / "h.zarr", shape)
    boxes = [b for b in grid_boxes(shape, 64, 16) if not (96 <= b[0] < 144 and 96 <= b[1] < 144)]
    run(store, boxes, fns, overlap=16).finalize({})
    got = level0(store).astype(np.float64)
    cover = np.zeros(shape, bool)
    for y, x, h, w in boxes:
        cover[y : y + h, x : x + w] = True
    assert (~cover).sum() > 0
    assert np.all(got[:, ~cover] == 0.0)
    assert np.abs(got[:, cover] - truth(fns, shape)[:, cover]).max() <= F16_HALF_ULP + 1e-5


def test_no_seams_between_disagreeing_regions(tmp_path: Path) -> None:
    # every region predicts its own constant; the blend must ramp smoothly across overlaps, and a
    # region alone at the slide border keeps its value (weight floor > 0, no fade to zero)
    shape = (200, 200)
    rng = np.random.default_rng(3)
    boxes = grid_boxes(shape, 80, 32)
    consts = rng.uniform(0.0, 1.0, len(boxes))
    store = make_store(tmp_path / "h.zarr", shape)
    st = Stitcher(store, boxes, overlap=32)
    written = [st.add(i, np.full((2, h, w), consts[i], np.float32)) for i, (_, _, h, w) in enumerate(boxes)]
    assert sum(written) == store.n_bands == 4 and written[0] == 0  # each band written once, when final
    st.finalize({})
    m = level0(store)[0].astype(np.float64)
    jump = np.abs(np.diff(consts.reshape(4, 4), axis=1)).max()
    assert jump > 0.5
    assert max(np.abs(np.diff(m, axis=0)).max(), np.abs(np.diff(m, axis=1)).max()) < 0.15
    assert abs(m[0, 0] - consts[0]) <= F16_HALF_ULP  # corner covered by region 0 only

    # the same regions without a ramp show the seams
    store2 = make_store(tmp_path / "flat.zarr", shape)
    st2 = Stitcher(store2, boxes, overlap=0)
    for i, (_, _, h, w) in enumerate(boxes):
        st2.add(i, np.full((2, h, w), consts[i], np.float32))
    m2 = level0(store2)[0].astype(np.float64)
    assert np.abs(np.diff(m2, axis=1)).max() > 0.2


def interleaved(n: int, batch: int, workers: int, prefetch: int, rng: np.random.Generator) -> list[int]:
    """Arrival order of regions from ``workers`` DataLoader workers taking batches round-robin, with
    batches arriving out of order within the prefetch window."""
    batches = [list(range(s, min(s + batch, n))) for s in range(0, n, batch)]
    order: list[int] = []
    window = workers * prefetch
    for s in range(0, len(batches), window):
        chunk = batches[s : s + window]
        for k in rng.permutation(len(chunk)):
            order += chunk[k]
    return order


def test_memory_is_bounded_by_a_few_bands(tmp_path: Path) -> None:
    # a tall slide (40 bands); a batch of 8 regions is less than a row of regions, as on real slides
    shape = (64 * 40, 400)
    fns = [ramp_fn(shape), disk_fn(shape)]
    boxes = grid_boxes(shape, 48, 16)
    rng = np.random.default_rng(0)

    row_major = make_store(tmp_path / "a.zarr", shape)
    st = run(row_major, boxes, fns, overlap=16)
    assert row_major.n_bands == 40 and st.max_open_bands <= 3

    two_workers = make_store(tmp_path / "b.zarr", shape)
    order = interleaved(len(boxes), batch=8, workers=2, prefetch=2, rng=rng)
    st = run(two_workers, boxes, fns, order=order, overlap=16)
    assert st.done and st.max_open_bands <= 4

    shuffled = make_store(tmp_path / "c.zarr", shape)
    st = run(shuffled, boxes, fns, order=list(rng.permutation(len(boxes))), overlap=16)
    assert st.done

    ref = level0(row_major)
    assert np.abs(ref.astype(np.float64) - truth(fns, shape)).max() <= F16_HALF_ULP + 1e-5
    # fixed-point sums: the arrival order does not change a single bit
    assert np.array_equal(ref.view(np.uint16), level0(two_workers).view(np.uint16))
    assert np.array_equal(ref.view(np.uint16), level0(shuffled).view(np.uint16))


def test_resume_is_bit_identical_and_skips_done_regions(tmp_path: Path) -> None:
    shape = (64 * 6 + 10, 230)
    fns = [ramp_fn(shape), disk_fn(shape)]
    boxes = grid_boxes(shape, 72, 24)
    clean = make_store(tmp_path / "clean.zarr", shape)
    run(clean, boxes, fns, overlap=24).finalize({"p": 0.5})

    path = tmp_path / "resumed.zarr"
    store = make_store(path, shape)
    st = Stitcher(store, boxes, overlap=24)
    half = len(boxes) // 2
    for i in range(half):
        st.add(i, region_maps(boxes[i], fns, shape, pad=1.0))
    written = store.final_bands()
    assert 0 < len(written) < store.n_bands
    del st  # the process "dies": no finalize, no close
    assert HeatmapStore.open(path).state == "incomplete"
    with pytest.raises(StoreError, match="incomplete"):
        HeatmapStore.open(path).mplus()

    again = make_store(path, shape, resume=True)
    assert again.final_bands() == written
    st2 = Stitcher(again, boxes, overlap=24, resume=True)
    pending = st2.pending_indices()
    assert 0 < len(pending) < len(boxes) and set(pending) <= set(range(len(boxes)))
    assert all(
        any(b not in written for b in range(y // 64, (y + h - 1) // 64 + 1))
        for y, _, h, _ in (boxes[i] for i in pending)
    )
    for i in np.random.default_rng(1).permutation(pending):  # another order than the clean run
        st2.add(int(i), region_maps(boxes[i], fns, shape, pad=1.0))
    assert HeatmapStore.open(path).state == "incomplete"
    st2.finalize({"p": 0.5})
    assert HeatmapStore.open(path).complete
    assert np.array_equal(level0(clean).view(np.uint16), level0(again).view(np.uint16))


def test_resume_keeps_the_fixed_point_scale_when_the_densest_band_is_done(tmp_path: Path) -> None:
    # 40 regions pile up in band 0: the accumulator scale is chosen from all regions, so the resumed
    # run (whose pending regions are sparse) accumulates in exactly the same units
    shape = (64 * 4, 128)
    boxes = [(0, 0, 32, 32)] * 40 + grid_boxes(shape, 48, 16)
    rng = np.random.default_rng(5)
    maps = [rng.random((2, h, w), np.float32) for _, _, h, w in boxes]
    clean = Stitcher(make_store(tmp_path / "clean.zarr", shape), boxes, overlap=16)
    for i, m in enumerate(maps):
        clean.add(i, m)
    path = tmp_path / "resumed.zarr"
    st = Stitcher(make_store(path, shape), boxes, overlap=16)
    for i in range(len(boxes) * 3 // 4):
        st.add(i, maps[i])
    assert 0 in st.store.final_bands() and not st.done
    st2 = Stitcher(make_store(path, shape, resume=True), boxes, overlap=16, resume=True)
    assert st2._scale == clean._scale  # the units of the fixed-point sums
    for i in st2.pending_indices():
        st2.add(i, maps[i])
    assert np.array_equal(level0(clean.store).view(np.uint16), level0(st2.store).view(np.uint16))


def test_resume_after_sigkill(tmp_path: Path) -> None:
    # a real kill -9 in the middle of a run: the store stays readable, incomplete, and a resumed run
    # gives the bytes of a clean run
    path = tmp_path / "killed.zarr"
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_stitch import grid_boxes, make_store, region_maps, ramp_fn, disk_fn
        from pathlib import Path
        from wsltool.infer.stitch import Stitcher
        shape = (64 * 5, 150)
        fns = [ramp_fn(shape), disk_fn(shape)]
        boxes = grid_boxes(shape, 48, 16)
        st = Stitcher(make_store(Path({str(path)!r}), shape), boxes, overlap=16)
        for i in range(len(boxes) * 3 // 5):
            st.add(i, region_maps(boxes[i], fns, shape, pad=1.0))
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    shape = (64 * 5, 150)
    fns = [ramp_fn(shape), disk_fn(shape)]
    boxes = grid_boxes(shape, 48, 16)
    killed = HeatmapStore.open(path)
    assert killed.state == "incomplete" and 0 < len(killed.final_bands()) < killed.n_bands

    store = make_store(path, shape, resume=True)
    run(store, boxes, fns, overlap=16, resume=True).finalize({})
    clean = make_store(tmp_path / "clean.zarr", shape)
    run(clean, boxes, fns, overlap=16).finalize({})
    assert np.array_equal(level0(clean).view(np.uint16), level0(store).view(np.uint16))


def test_resume_refuses_another_region_list(tmp_path: Path) -> None:
    shape = (200, 100)
    path = tmp_path / "h.zarr"
    boxes = grid_boxes(shape, 64, 16)
    st = Stitcher(make_store(path, shape), boxes, overlap=16)
    for i in range(len(boxes) // 2):
        st.add(i, np.zeros((2, 64, 64), np.float32))
    with pytest.raises(StoreError, match="different region list"):
        Stitcher(make_store(path, shape, resume=True), grid_boxes(shape, 64, 8), overlap=8, resume=True)


def test_overlap_is_inferred_from_the_boxes(tmp_path: Path) -> None:
    shape = (300, 300)
    store = make_store(tmp_path / "h.zarr", shape)
    assert Stitcher(store, grid_boxes(shape, 96, 32)).overlap == 32
    assert Stitcher(store, grid_boxes(shape, 96, 0)).overlap == 0
    assert Stitcher(store, grid_boxes(shape, 96, 0), overlap=8).overlap == 8


def test_bad_input(tmp_path: Path) -> None:
    shape = (100, 100)
    store = make_store(tmp_path / "h.zarr", shape)
    with pytest.raises(DataError, match="integral"):
        Stitcher(store, [(0.5, 0, 10, 10)])
    with pytest.raises(DataError, match="positive"):
        Stitcher(store, [(0, 0, 0, 10)])
    st = Stitcher(store, [(0, 0, 64, 64), (50, 50, 64, 64)])
    with pytest.raises(DataError, match="shape"):
        st.add(0, np.zeros((2, 32, 64), np.float32))
    with pytest.raises(DataError, match="NaN"):
        st.add(0, np.full((2, 64, 64), np.nan, np.float32))
    st2 = Stitcher(store, [(0, 0, 64, 64), (50, 50, 64, 64)])
    st2.add(0, np.zeros((2, 64, 64), np.float32))
    with pytest.raises(DataError, match="twice"):
        st2.add(0, np.zeros((2, 64, 64), np.float32))
    with pytest.raises(StoreError, match="not added"):
        st2.finalize({})


def test_store_and_stitcher_work_without_torch_or_qt(tmp_path: Path) -> None:
    code = textwrap.dedent(
        f"""
        import sys
        for m in ("torch", "torchvision", "qtpy", "PyQt5", "PyQt6", "napari"):
            sys.modules[m] = None  # any import of these fails
        import numpy as np
        from wsltool.infer.stitch import Stitcher
        from wsltool.store import HeatmapStore
        store = HeatmapStore.create({str(tmp_path / "h.zarr")!r}, shape_yx=(40, 50), out_mpp=2.0, slide_mpp=0.5,
                                    channel_names=["M+"], provenance={{}}, chunk=16)
        st = Stitcher(store, [(0, 0, 40, 50)])
        st.add(0, np.full((1, 40, 50), 0.5, np.float32))
        st.finalize({{}})
        assert HeatmapStore.open(store.path).complete
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
