"""Evaluation metrics against direct computations."""

from __future__ import annotations

import numpy as np
import pytest

from wsltool.evaluate import PixelCurve, chance_dice, dice, image_metrics, overlay_png


def test_dice_and_chance() -> None:
    a = np.array([[1, 1, 0, 0]], bool)
    b = np.array([[1, 0, 0, 0]], bool)
    assert dice(a, b) == pytest.approx(2 * 1 / 3)
    assert dice(np.zeros(4, bool), np.zeros(4, bool)) == 1.0
    assert chance_dice(0.5, 0.5) == pytest.approx(0.5)
    # all-ones mask: Dice = 2g / (1 + g)
    assert chance_dice(1.0, 0.5) == pytest.approx(2 * 0.5 / 1.5)


def test_chance_matches_random_masks() -> None:
    rng = np.random.default_rng(0)
    gt = np.zeros((200, 200), bool)
    gt[:, :90] = True  # 45 %
    vals = [dice(rng.random((200, 200)) < 0.2, gt) for _ in range(20)]
    assert np.mean(vals) == pytest.approx(chance_dice(0.2, 0.45), abs=0.01)


def test_image_metrics() -> None:
    heat = np.array([[0.9, 0.6, 0.2, 0.1]])
    gt = np.array([[1, 0, 0, 0]], bool)
    m = image_metrics(heat, gt, 0.5)
    assert m["f1_pos"] == pytest.approx(2 / 3)
    assert m["f1_neg"] == pytest.approx(2 * 2 / 5)
    assert m["area"] == 0.5 and m["gt_area"] == 0.25


def brute_auc(s: np.ndarray, y: np.ndarray) -> float:
    pos, neg = s[y], s[~y]
    gt = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return gt / (len(pos) * len(neg))


def brute_ap(s: np.ndarray, y: np.ndarray) -> float:
    order = np.argsort(-s, kind="stable")
    ys = y[order]
    tp = np.cumsum(ys)
    prec = tp / np.arange(1, len(ys) + 1)
    return float((prec * ys).sum() / ys.sum())


def test_pixel_curve_matches_brute_force() -> None:
    rng = np.random.default_rng(1)
    # values on bin centres so the histogram is exact; distinct values per bin
    s = (rng.permutation(1000)[:300] + 0.5) / 1000
    y = rng.random(300) < 0.4 + 0.5 * s  # informative scores
    c = PixelCurve()
    c.add(s[:150], y[:150])
    c.add(s[150:], y[150:])
    assert c.auc() == pytest.approx(brute_auc(s, y), abs=1e-9)
    assert c.ap() == pytest.approx(brute_ap(s, y), abs=1e-9)
    perfect = PixelCurve()
    perfect.add(np.array([0.9, 0.8, 0.1]), np.array([True, True, False]))
    assert perfect.auc() == 1.0 and perfect.ap() == 1.0


def test_overlay_png(tmp_path) -> None:
    from PIL import Image

    img = np.zeros((20, 30, 3), np.uint8)
    heat = np.linspace(0, 1, 600).reshape(20, 30)
    overlay_png(img, heat > 0.3, heat, heat > 0.5, tmp_path / "o.png", scale=1.0)
    with Image.open(tmp_path / "o.png") as im:
        assert im.size == (4 * 30 + 3 * 6, 20)


def test_jet_colour_map_ends_and_middle() -> None:
    from wsltool.evaluate import jet

    rgb = jet(np.array([[0.0, 0.5, 1.0]]))
    assert rgb.shape == (1, 3, 3)
    np.testing.assert_allclose(rgb[0, 0], [0, 0, 0.5])  # dark blue
    np.testing.assert_allclose(rgb[0, 1], [0.5, 1, 0.5])  # green in the middle
    np.testing.assert_allclose(rgb[0, 2], [0.5, 0, 0])  # dark red


def test_evaluate_uses_the_mask_column_and_matches_direct_metrics(tmp_path) -> None:
    """Per-image metrics of a real (untrained) model equal image_metrics on its own M+, with the mask column's
    mask, not the ``<name>_anno.png`` decoy next to the image; the pooled curve equals a direct PixelCurve."""
    import torch
    from PIL import Image

    from wsltool.config import ModelConfig
    from wsltool.evaluate import evaluate
    from wsltool.models import build_model
    from wsltool.train.labels import read_labels

    rng = np.random.default_rng(0)
    rows = ["path,label,mask"]
    truth = {}
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 56, 3), np.uint8)).save(tmp_path / f"im{i}.png")
        gt = np.zeros((40, 56), bool)
        gt[5 + i : 25 + i, 10:40] = True
        Image.fromarray(gt.astype(np.uint8) * 255).save(tmp_path / f"gt{i}.png")
        Image.fromarray(np.full((40, 56), 255, np.uint8)).save(tmp_path / f"im{i}_anno.png")  # decoy: all glands
        rows.append(f"im{i}.png,{['a', 'b'][i % 2]},gt{i}.png")
        truth[f"im{i}.png"] = gt
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    items = read_labels(tmp_path / "labels.csv")
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="tiny", pretrained="none", output_stride=8, minmax_start=0)).eval()
    got, summary = evaluate(model, items, ["a", "b"])
    curve = PixelCurve()
    for row, it in zip(got, items, strict=True):
        img = np.array(Image.open(it.path))
        with torch.inference_mode():
            heat = model.localize(torch.from_numpy(img).permute(2, 0, 1)[None], size=img.shape[:2])["mplus"][0]
        want = image_metrics(heat.numpy(), truth[it.path.name], 0.5)
        assert {k: row[k] for k in want} == pytest.approx(want)
        assert row["gt_area"] == pytest.approx(truth[it.path.name].mean())  # the column's mask, not the decoy
        curve.add(heat.numpy(), truth[it.path.name])
    assert summary["pxap"] == pytest.approx(100 * curve.ap()) and summary["pixel_auc"] == pytest.approx(
        100 * curve.auc()
    )
    assert summary["n_masks"] == 3
