"""Tissue detection: Dice against known masks, real slides, empty slides and box fractions."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from skimage.color import rgb2hsv

from wsltool.errors import DataError
from wsltool.slide import open_slide
from wsltool.testing import downsample, write_svs
from wsltool.testing.tissue_fixtures import TissueScene, tissue_scene
from wsltool.tissue import TissueMask, detect_tissue, tissue_mask_rgb

# Scenes are generated at 4 um/px (768 x 1024 px = 3 x 4 mm) and detected at 8 um/px (2x smaller).
SCENE_MPP = 4.0
DS = 2
H, W = 768, 1024
REAL_INK_MPP = 2.0  # the overview has no mpp; a biopsy core (~1 mm) is ~500 px high, so about 2 um/px


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))


def coarse(mask: np.ndarray, f: int = DS) -> np.ndarray:
    return downsample(mask.astype(np.uint8) * 255, f) >= 128


SCENES = {
    "white": {},
    "grey": {"background": 208},
    "grey_tinted": {"background": (200, 206, 216)},
    "black_border": {"border_px": 30 * DS},  # 30 px at the detection resolution
    "ink": {"inks": ("blue", "green", "black")},
    "everything": {"background": 205, "border_px": 20 * DS, "inks": ("blue", "green", "black"), "seed": 4},
}


@pytest.fixture(scope="module", params=list(SCENES))
def scene(request: pytest.FixtureRequest) -> tuple[str, TissueScene]:
    kw = {"seed": 3, **SCENES[request.param]}
    return request.param, tissue_scene(H, W, **kw)


def test_dice_on_synthetic_scenes(scene: tuple[str, TissueScene]) -> None:
    name, sc = scene
    rgb, truth = downsample(sc.rgb, DS), coarse(sc.tissue)
    mask = tissue_mask_rgb(rgb, mpp=SCENE_MPP * DS)
    assert mask.dtype == bool and mask.shape == truth.shape
    assert dice(mask, truth) >= 0.95, name
    assert abs(mask.mean() - truth.mean()) < 0.02, name
    if sc.border.any():  # nothing of the black border is tissue
        assert not (mask & coarse(sc.border, DS)).any()
    if sc.ink.any():
        ink, stained = coarse(sc.ink), coarse(sc.stained)
        on_glass, on_tissue = ink & ~stained, ink & stained
        assert on_glass.sum() > 500 and on_tissue.sum() > 500
        assert (mask & on_glass).sum() <= 0.01 * on_glass.sum()
        assert (mask & on_tissue).sum() <= 0.10 * on_tissue.sum()  # ink over tissue is not tissue either


def test_svs_file_end_to_end(tmp_path: Path) -> None:
    sc = tissue_scene(H, W, seed=5, background=212, inks=("blue",))
    p = write_svs(tmp_path / "scene.svs", sc.rgb, mpp=SCENE_MPP, factors=(2,))  # JPEG, like scanners
    with open_slide(p) as slide:
        tm = detect_tissue(slide)  # 8 um/px: read from the 2x level
    assert isinstance(tm, TissueMask) and tm.mpp == 8.0 and tm.shape == (H // 2, W // 2)
    truth = coarse(sc.tissue)
    assert dice(tm.mask, truth) >= 0.95
    assert tm.fraction == pytest.approx(truth.mean(), abs=0.02)
    assert tm.area_mm2 == pytest.approx(truth.sum() * 0.008**2, rel=0.05)
    assert tm.slide_dimensions == (W, H) and tm.base_mpp == SCENE_MPP
    assert not tm.mask.flags.writeable
    with open_slide(p) as slide:
        fine = detect_tissue(slide, mpp=1.0)  # finer than the slide: detected at the slide's own mpp
    assert fine.mpp == SCENE_MPP and fine.shape == (H, W)
    assert fine.fraction == pytest.approx(tm.fraction, abs=0.01)


def test_resolution_independent_defaults() -> None:
    sc = tissue_scene(H, W, seed=7, inks=("green",))
    m4 = tissue_mask_rgb(sc.rgb, mpp=4.0)
    m8 = tissue_mask_rgb(downsample(sc.rgb, 2), mpp=8.0)
    assert dice(coarse(m4, 2), m8) >= 0.97


def test_real_ink_overview_excludes_blue_ink(real_ink_jpeg: Path) -> None:
    with open_slide(real_ink_jpeg, mpp=REAL_INK_MPP) as slide:
        tm = detect_tissue(slide, mpp=8.0)
        rgb = slide.read_at_mpp(8.0)
    hsv = rgb2hsv(rgb)
    hue, sat = hsv[..., 0] * 360, hsv[..., 1]
    chroma = rgb.max(-1).astype(int) - rgb.min(-1)
    blue = (hue > 200) & (hue < 238) & (sat > 0.3) & (chroma > 40)  # clearly blue ink
    assert blue.sum() > 1000  # the ink is there ...
    assert (tm.mask & blue).sum() < 0.01 * blue.sum()  # ... and not in the mask
    # one long biopsy core: measured 29.0% of the overview (4 um/px: 29.2%)
    assert 0.26 < tm.fraction < 0.32
    pink = (hue > 300) & (sat > 0.2)
    assert (tm.mask & pink).sum() > 0.97 * pink.sum()  # the stained tissue is all found


def test_real_svs_fraction_plausible_and_stable(real_svs: Path) -> None:
    with open_slide(real_svs) as slide:
        f4 = detect_tissue(slide, mpp=4.0)
        f8 = detect_tissue(slide, mpp=8.0)
    # skin biopsy over about 40% of the 1.1 x 1.5 mm field (measured 39.2% at 4, 37.5% at 8 um/px)
    assert 0.34 < f4.fraction < 0.44 and 0.34 < f8.fraction < 0.44
    assert abs(f4.fraction - f8.fraction) < 0.03
    assert f4.area_mm2 == pytest.approx(f8.area_mm2, rel=0.08)
    assert dice(coarse(f4.mask, 2), f8.mask[: f4.shape[0] // 2, : f4.shape[1] // 2]) > 0.9


def test_empty_white_slide_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rng = np.random.default_rng(0)
    glass = np.clip(rng.normal(243, 3, (512, 768, 3)), 0, 255).astype(np.uint8)
    p = write_svs(tmp_path / "empty.svs", glass, mpp=2.0, factors=(4,))
    with caplog.at_level(logging.WARNING, logger="wsltool.tissue"), open_slide(p) as slide:
        tm = detect_tissue(slide)
    assert tm.empty and tm.fraction == 0.0 and tm.area_mm2 == 0.0 and tm.tissue_pixels == 0
    assert tm.fraction_in(0, 0, 768, 512, 2.0) == 0.0
    assert any("no tissue" in r.getMessage() and "empty.svs" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("background", [255, 242, 208, 180])
def test_blank_images_give_empty_masks(background: int) -> None:
    rng = np.random.default_rng(background)
    img = np.clip(rng.normal(background, 4, (200, 300, 3)), 0, 255).astype(np.uint8)
    img[:12] = 8  # scanner border
    img[:, -20:] = (25, 22, 40)  # dark slide edge with a blue cast
    assert not tissue_mask_rgb(img, mpp=8.0).any()


def test_bad_input() -> None:
    with pytest.raises(DataError, match="RGB image"):
        tissue_mask_rgb(np.zeros((10, 10), np.uint8))
    with pytest.raises(DataError, match="mpp"):
        tissue_mask_rgb(np.zeros((10, 10, 3), np.uint8), mpp=0)
    with pytest.raises(DataError):
        TissueMask(np.zeros((2, 2, 2), bool), mpp=8.0)


def _brute_fraction(up: np.ndarray, x0: int, y0: int, x1: int, y1: int) -> float:
    """Fraction of a level-0 box in an upsampled raster (outside it counts as background)."""
    h, w = up.shape
    inside = up[max(y0, 0) : max(min(y1, h), 0), max(x0, 0) : max(min(x1, w), 0)].sum()
    return float(inside) / ((x1 - x0) * (y1 - y0))


def test_fraction_in_matches_brute_force() -> None:
    rng = np.random.default_rng(1)
    mask = rng.random((37, 53)) < 0.4
    tm = TissueMask(mask, mpp=8.0)
    f = 16  # base mpp 0.5: one mask pixel = 16 x 16 level-0 pixels
    up = np.repeat(np.repeat(mask, f, axis=0), f, axis=1)
    boxes = []
    for _ in range(300):
        x0, y0 = rng.integers(-100, 53 * f), rng.integers(-100, 37 * f)
        x1, y1 = x0 + rng.integers(1, 400), y0 + rng.integers(1, 400)
        boxes.append((x0, y0, x1, y1))
    boxes += [(0, 0, 53 * f, 37 * f), (-50, -50, 53 * f + 50, 37 * f + 50), (7, 9, 8, 10), (5000, 0, 5100, 100)]
    expected = np.array([_brute_fraction(up, *b) for b in boxes])
    got = np.array([tm.fraction_in(*b, base_mpp=0.5) for b in boxes])
    np.testing.assert_allclose(got, expected, atol=1e-9)
    np.testing.assert_allclose(tm.fractions_in(np.array(boxes), base_mpp=0.5), expected, atol=1e-9)
    assert tm.fraction_in(10, 10, 10, 20, 0.5) == 0.0  # empty box
    assert tm.fraction == pytest.approx(mask.mean())


def test_fraction_in_with_slide_size() -> None:
    mask = np.zeros((10, 10), bool)
    mask[:5] = True
    # slide of 150 x 150 level-0 px at 0.5 um/px; the 8 um/px mask overhangs it (160 px)
    tm = TissueMask(mask, mpp=8.0, slide_dimensions=(150, 150), base_mpp=0.5)
    assert tm.fraction == pytest.approx(80 / 150)
    assert tm.fraction_in(0, 0, 160, 80, 0.5) == 1.0
    assert tm.fraction_in(0, 72, 160, 88, 0.5) == pytest.approx(0.5)
    assert tm.area_mm2 == pytest.approx(50 * 0.008**2)
    assert "10x10 px at 8 um/px" in repr(tm)


def test_no_torch_no_qt() -> None:
    code = (
        "import sys\n"
        "for m in ('torch', 'torchvision', 'qtpy', 'PyQt5', 'PyQt6', 'PySide2', 'PySide6', 'napari'):\n"
        "    sys.modules[m] = None\n"
        "import wsltool.tissue, wsltool.testing.tissue_fixtures\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_hue_matches_skimage() -> None:
    from wsltool.tissue import _hue_degrees

    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 256, (5000, 3)).astype(np.float32)
    rgb[:50] = rgb[:50, :1]  # neutral pixels
    r, g, b = rgb.T
    vmax, vmin = rgb.max(1), rgb.min(1)
    got = _hue_degrees(r, g, b, vmax, vmax - vmin)
    expected = rgb2hsv(rgb[None] / 255.0)[0, :, 0] * 360
    diff = np.abs(got - expected)
    np.testing.assert_array_less(np.minimum(diff, 360 - diff), 1e-3)
