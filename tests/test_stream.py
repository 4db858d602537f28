from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from wsltool.config import TilingConfig
from wsltool.errors import SlideReadError
from wsltool.slide import open_slide
from wsltool.stream import RegionStream, make_loader
from wsltool.tiling import Grid


@pytest.fixture(scope="module")
def grid_and_path(synthetic_slides: dict[str, Path]) -> tuple[Grid, Path]:
    p = synthetic_slides["svs"]
    with open_slide(p) as s:
        return Grid.for_slide(s, TilingConfig(mpp=1.0, region=128, overlap=32)), p


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_stream_yields_every_region_once_with_right_pixels(grid_and_path, workers: int) -> None:
    grid, path = grid_and_path
    stream = RegionStream.from_grid(path, grid)
    seen: dict[int, torch.Tensor] = {}
    for x, meta in make_loader(stream, batch_size=5, num_workers=workers):
        assert x.dtype == torch.uint8 and x.shape[1:] == (3, 128, 128)
        for t, (i, gx, gy) in zip(x, meta.tolist(), strict=True):
            assert i not in seen
            assert (gx, gy) == (grid[i].gx, grid[i].gy)
            seen[i] = t
    assert sorted(seen) == list(range(len(grid)))
    with open_slide(path) as s:
        for i in (0, len(grid) // 2, len(grid) - 1):
            r = grid[i]
            ref = s.read_region(r.x, r.y, 128, 128, mpp=1.0)
            np.testing.assert_array_equal(seen[i].permute(1, 2, 0).numpy(), ref)


def test_persistent_workers_two_epochs(grid_and_path) -> None:
    grid, path = grid_and_path
    loader = make_loader(RegionStream.from_grid(path, grid), batch_size=8, num_workers=2, persistent_workers=True)
    epochs = [sorted(int(i) for _, m in loader for i in m[:, 0]) for _ in range(2)]
    assert epochs[0] == epochs[1] == list(range(len(grid)))


def test_subset_indices(grid_and_path) -> None:
    grid, path = grid_and_path
    want = [3, 1, 7]
    stream = RegionStream.from_grid(path, grid, indices=want)
    assert len(stream) == 3
    got = [int(m[0]) for _, m in stream]
    assert got == want


def test_stream_pickles_without_handle(grid_and_path) -> None:
    grid, path = grid_and_path
    stream = RegionStream.from_grid(path, grid)
    next(iter(stream))
    assert stream._slide is not None
    clone = pickle.loads(pickle.dumps(stream))
    assert clone._slide is None
    assert len(clone) == len(stream)


def test_unreadable_regions_raise_or_skip(tmp_path: Path, content) -> None:
    import tifffile

    from wsltool.testing import write_svs

    p = write_svs(tmp_path / "bad.svs", content.rgb, factors=())
    with tifffile.TiffFile(p) as tf:
        offs, cnts = tf.pages[0].dataoffsets, tf.pages[0].databytecounts
    raw = bytearray(p.read_bytes())
    for off, n in zip(offs[-8:], cnts[-8:], strict=True):
        raw[off + 20 : off + n] = bytes(n - 20)
    p.write_bytes(bytes(raw))
    with open_slide(p) as s:
        grid = Grid.for_slide(s, TilingConfig(mpp=0.5, region=256, overlap=0))
    with pytest.raises(SlideReadError):
        list(RegionStream.from_grid(p, grid))
    got = [int(m[0]) for _, m in RegionStream.from_grid(p, grid, on_error="skip")]
    assert len(got) == len(grid) - 8  # the bottom row of 256-px tiles is gone
    # read in reader processes, the error reaches the caller as raised there: one line naming the slide
    for workers in (0, 2):
        with pytest.raises(SlideReadError) as ei:
            list(make_loader(RegionStream.from_grid(p, grid), batch_size=4, num_workers=workers))
        msg = str(ei.value)
        assert msg.startswith(f"{p}: cannot read") and "\n" not in msg and "Traceback" not in msg
    # a plain DataLoader over the stream still gets the error (as torch wraps it), never a silent gap
    from torch.utils.data import DataLoader

    with pytest.raises(RuntimeError, match="SlideReadError"):
        list(DataLoader(RegionStream.from_grid(p, grid), batch_size=None, num_workers=2))


def test_wsltool_errors_survive_pickling() -> None:
    """Errors cross process boundaries (reader processes, Dask workers) as raised: type, path and message."""
    from wsltool.errors import LabelsError, MppError

    for err in (SlideReadError("a.svs", "cannot read tile 3"), MppError(None, "no mpp"), LabelsError("l.csv", ["x"])):
        back = pickle.loads(pickle.dumps(err))
        assert type(back) is type(err) and str(back) == str(err) and back.path == err.path
