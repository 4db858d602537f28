from __future__ import annotations

import math

import numpy as np
import pytest

from wsltool.config import TilingConfig
from wsltool.errors import ConfigError
from wsltool.tiling import Grid


class ArrayTissue:
    """A tissue mask given as a boolean array at ``mpp`` (the protocol Grid consumes)."""

    def __init__(self, mask: np.ndarray, mpp: float) -> None:
        self.mask, self.mpp = mask, mpp

    def fraction_in(self, x0: float, y0: float, x1: float, y1: float, base_mpp: float) -> float:
        f = base_mpp / self.mpp
        a, b = int(y0 * f), int(math.ceil(y1 * f))
        c, d = int(x0 * f), int(math.ceil(x1 * f))
        area = max((b - a) * (d - c), 1)
        return float(self.mask[max(a, 0) : b, max(c, 0) : d].sum()) / area


def test_grid_geometry_and_edges() -> None:
    cfg = TilingConfig(mpp=1.0, region=256, overlap=64)  # stride 192
    g = Grid((2220, 2967), 0.499, cfg)
    # slide is 1108 x 1481 grid px (ceil of 2220 * 0.499, 2967 * 0.499)
    assert g.grid_size == (1108, 1481)
    assert g.shape == (math.ceil((1481 - 256) / 192) + 1, math.ceil((1108 - 256) / 192) + 1) == (8, 6)
    assert len(g) == 48
    last = g[-1]
    assert (last.row, last.col, last.gx, last.gy) == (7, 5, 960, 1344)
    # the last region reaches the slide edge (and beyond: padded by the reader)
    assert last.gx + 256 >= 1108 and last.gy + 256 >= 1481
    assert last.x == pytest.approx(960 / 0.499) and last.y == pytest.approx(1344 / 0.499)
    # row-major, deterministic
    o = g.origins
    assert (np.lexsort((o[:, 0], o[:, 1])) == np.arange(len(g))).all()
    np.testing.assert_allclose(g.level0_origins, o / 0.499)
    assert [r.index for r in g] == list(range(48))


def test_grid_small_slide_single_region() -> None:
    g = Grid((100, 80), 0.5, TilingConfig(mpp=0.5, region=512, overlap=0))
    assert len(g) == 1 and g[0].gx == 0 and g[0].gy == 0


def test_grid_tissue_filter() -> None:
    mask = np.zeros((100, 100), bool)
    mask[:50, :50] = True  # top-left quarter, 8 um/px
    tissue = ArrayTissue(mask, 8.0)
    cfg = TilingConfig(mpp=2.0, region=100, overlap=0, min_tissue=0.5)
    g = Grid((1600, 1600), 0.5, cfg, tissue)  # 800 um square, mask covers 0-400 um
    kept = {(r.row, r.col) for r in g}
    assert kept == {(r, c) for r in range(2) for c in range(2)}
    assert np.allclose(g.tissue_fractions, 1.0)


def test_grid_empty_when_no_tissue(caplog) -> None:
    tissue = ArrayTissue(np.zeros((10, 10), bool), 8.0)
    g = Grid((1000, 1000), 0.5, TilingConfig(), tissue)
    assert len(g) == 0
    assert "grid is empty" in caplog.text


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"overlap": 512}, "overlap"),
        ({"region": 8}, "region"),
        ({"mpp": 0.0}, "mpp"),
        ({"min_tissue": 2.0}, "min_tissue"),
    ],
)
def test_tiling_config_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        TilingConfig(**kwargs)
