"""The paired-seed comparison behind the README's "above" / "clearly above" wording."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_tool(name: str = "glas_paired"):
    spec = importlib.util.spec_from_file_location(name, ROOT / f"tools/experiments/{name}.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _runs(root: Path, tag: str, pxap: list[float], names: list[str] | None = None) -> None:
    for i, v in enumerate(pxap):
        d = root / (names[i] if names else f"{tag}_seed{i}")
        d.mkdir(parents=True)
        r = {m: 50.0 for m in ("pixel_auc", "f1_pos", "f1_neg", "area", "error")}
        (d / "result.json").write_text(json.dumps({**r, "pxap": v, "train": {"seed": i}}))


def test_sign_flip_p_exact() -> None:
    gp = _load_tool()
    assert gp.sign_flip_p([1.0, 1.0, 1.0]) == pytest.approx(2 / 8)  # all + or all - are as extreme
    assert gp.sign_flip_p([float(i) for i in range(1, 9)]) == pytest.approx(2 / 256)
    # 3, -1: flips with |sum| >= 2 are (3,-1), (-3,1), (3,1), (-3,-1) -> 4 of 4
    assert gp.sign_flip_p([3.0, -1.0]) == pytest.approx(1.0)
    # beyond 20 seeds: random flips, close to the exact value (24 positive differences: p = 2 / 2^24)
    assert gp.sign_flip_p([1.0] * 24) == pytest.approx(0.0, abs=1e-4)
    mixed = [1.0] * 14 + [-1.0] * 10  # exact: P(|sum of 24 signs| >= 4) = 0.5413
    assert gp.sign_flip_p(mixed) == pytest.approx(0.5413, abs=0.005)


def test_pairs_by_the_seed_in_result_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gp = _load_tool()
    a = [70.0 + i for i in range(8)]
    b = [v - 2.0 - 0.1 * i for i, v in enumerate(a)]  # A higher on every seed, by 2.0-2.7
    _runs(tmp_path, "A", a)
    # B's seed 0 has an irregular name, as WILDCAT's seed-0 run at the CPU budget does
    _runs(tmp_path, "B", b, names=["B_blocks"] + [f"B_seed{i}" for i in range(1, 8)])
    r = gp.compare(gp.load_family([str(tmp_path / "A_seed*")]), gp.load_family([str(tmp_path / "B_*")]), "pxap")
    assert r["n"] == 8 and r["higher"] == 8
    assert r["diff"] == pytest.approx(2.35)
    assert r["lo"] > 0 and r["p"] == pytest.approx(2 / 256)
    assert gp.main(["--a", str(tmp_path / "A_seed*"), "--b", str(tmp_path / "B_*"), "--metrics", "pxap"]) == 0
    assert "PxAP: A is clearly above B" in capsys.readouterr().out
    # five seeds cannot be "clearly" above, however consistent
    assert gp.main(["--a", str(tmp_path / "A_seed[0-4]"), "--b", str(tmp_path / "B_*"), "--metrics", "pxap"]) == 0
    assert "PxAP: A is above B" in capsys.readouterr().out


def test_duplicate_seed_refused(tmp_path: Path) -> None:
    gp = _load_tool()
    _runs(tmp_path / "x", "A", [70.0])
    _runs(tmp_path / "y", "A", [71.0])
    with pytest.raises(SystemExit, match="seed 0 twice"):
        gp.load_family([str(tmp_path / "x/A_seed*"), str(tmp_path / "y/A_seed*")])


def _load_ensemble_paired():
    return _load_tool("glas_ensemble_paired")


def test_seed_groups_are_disjoint_and_drop_the_remainder() -> None:
    ge = _load_ensemble_paired()
    assert ge.seed_groups([5, 0, 3, 1, 2, 4, 6], 2) == [(0, 1), (2, 3), (4, 5)]
    assert ge.seed_groups(list(range(8)), 4) == [(0, 1, 2, 3), (4, 5, 6, 7)]
    assert ge.seed_groups([0, 1, 2], 4) == []


def test_ensemble_maps_average_then_renormalise() -> None:
    import numpy as np

    ge = _load_ensemble_paired()
    a = [np.array([[0.0, 1.0], [0.5, 0.5]])]
    b = [np.array([[0.0, 0.0], [1.0, 0.0]])]
    (m,) = ge.ensemble_maps([a, b])  # mean [[0, .5], [.75, .25]] -> / 0.75
    np.testing.assert_allclose(m, [[0.0, 2 / 3], [1.0, 1 / 3]], atol=1e-6)
    # a perfect map scores PxAP and pixel AUC 100, its complement pixel AUC 0
    gt = np.array([[False, True], [True, False]])
    perfect = ge.score([gt.astype(float)], [gt])
    assert perfect["pxap"] == pytest.approx(100.0) and perfect["pixel_auc"] == pytest.approx(100.0)
    assert perfect["f1_pos"] == pytest.approx(100.0) and perfect["area"] == pytest.approx(50.0)
    assert ge.score([1.0 - gt.astype(float)], [gt])["pixel_auc"] == pytest.approx(0.0)


def test_checkpoint_maps_are_cached_per_checkpoint_version(tmp_path: Path) -> None:
    """Maps come from the real model on the given device, are cached, and are recomputed when the file changes."""
    import os

    import numpy as np

    from wsltool.testing.models import make_checkpoint

    ge = _load_ensemble_paired()
    run = tmp_path / "W10_seed0"
    run.mkdir()
    make_checkpoint(run / "best.pt", seed=0)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (64, 96, 3), dtype=np.uint8) for _ in range(2)]
    first = ge.checkpoint_maps(run, "best.pt", "none", images, "cpu")
    assert [m.shape for m in first] == [(64, 96), (64, 96)]
    assert all(m.min() >= 0.0 and m.max() <= 1.0 and m.std() > 0.01 for m in first)  # a real, non-constant M+
    cache = run / "maps_best_none.npz"
    assert cache.is_file()
    # a cache hit returns the stored (float16) maps, not a recomputation: poison the cache to prove it
    z = dict(np.load(cache))
    z["m0"] = np.full_like(z["m0"], 0.25)
    np.savez(cache, **z)
    assert np.all(ge.checkpoint_maps(run, "best.pt", "none", images)[0] == 0.25)
    # a new checkpoint (another mtime) is recomputed from the model, and the cache rewritten
    make_checkpoint(run / "best.pt", seed=1)
    st = (run / "best.pt").stat()
    os.utime(run / "best.pt", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    again = ge.checkpoint_maps(run, "best.pt", "none", images)
    assert not np.all(again[0] == 0.25)
    assert str(np.load(cache)["stamp"]) == str((run / "best.pt").stat().st_mtime_ns)


def test_evidence_variants_are_perfect_masks_in_normalised_space() -> None:
    ev = _load_tool("glas_evidence")
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (64, 48, 3), dtype=np.uint8)
    gt = np.zeros((64, 48), bool)
    gt[16:48, 8:40] = True
    flat = np.array([200, 150, 190], np.uint8)
    glands = ev.variant_image(img, gt, "glands", flat)
    stroma = ev.variant_image(img, gt, "stroma", flat)
    sil = ev.variant_image(img, gt, "silhouette", flat)
    # X+ keeps the gland pixels and fills the rest with 0 in normalised space (grey 128); X- the other way
    assert np.array_equal(glands[gt], img[gt]) and (glands[~gt] == ev.GREY).all()
    assert np.array_equal(stroma[~gt], img[~gt]) and (stroma[gt] == ev.GREY).all()
    # the outline alone: no texture left anywhere
    assert (sil[gt] == ev.GREY).all() and (sil[~gt] == flat).all()
    with pytest.raises(ValueError, match="unknown variant"):
        ev.variant_image(img, gt, "nope", flat)


def test_evidence_map_mask_is_the_models_pseudo_binary_mask_at_stride_16() -> None:
    ev = _load_tool("glas_evidence")
    gt = np.zeros((64, 64), bool)
    gt[:, :32] = True  # cells 0-1 of 4 are glands, on the 16 px grid
    m = ev.map_mask(gt)
    s = 1 / (1 + np.exp(-8 * 0.5))  # sigmoid(w (1 - sigma)) with w 8, sigma 0.5
    assert m[:, :8] == pytest.approx(s, abs=1e-6)  # inside a gland cell, away from the bilinear ramp
    assert m[:, -8:] == pytest.approx(1 - s, abs=1e-6)
    # the boundary stays where the glands end, blurred by the cells
    assert (m[:, 31] > 0.5).all() and (m[:, 32] < 0.5).all()
    stroma16 = ev.variant_image(np.full((64, 64, 3), 228, np.uint8), gt, "stroma16", np.zeros(3, np.uint8))
    # 128 + 100 (1 - m): nearly grey over the glands, nearly the image over the stroma
    assert stroma16[0, 0, 0] == round(128 + 100 * (1 - s)) and stroma16[0, -1, 0] == round(128 + 100 * s)


def test_synthetic_evidence_conditions_differ_only_in_the_malignant_stroma() -> None:
    se = _load_tool("synthetic_evidence")
    for seed in (3, 4):
        b_obj, b_les = se.synthetic_image(96, seed, False, "object")
        b_both, _ = se.synthetic_image(96, seed, False, "both")
        assert not b_les.any() and np.array_equal(b_obj, b_both)  # benign: no lesion, same image in both
        m_obj, les = se.synthetic_image(96, seed, True, "object")
        m_both, les2 = se.synthetic_image(96, seed, True, "both")
        assert les.any() and np.array_equal(les, les2)  # the same lesions in both conditions

        def dark(img: np.ndarray) -> np.ndarray:
            return img.sum(2) < 150  # the stroma's small dark cells (nuclei are lighter)

        assert dark(m_both)[~les].sum() > 2 * dark(m_obj)[~les].sum()  # evidence outside the lesion
        # the lesion grades from its rim to its core: darker inside than in the stroma around it
        assert m_obj[les].mean() < m_obj[~les].mean() - 10
    with pytest.raises(ValueError, match="unknown condition"):
        se.synthetic_image(96, 0, True, "nope")


def test_evidence_entropy_and_the_max_entropy_term() -> None:
    ev = _load_tool("glas_evidence")
    h, ce = ev._entropy([{"p_pred": 0.5}, {"p_pred": 0.5}])
    assert h == pytest.approx(np.log(2)) and ce == pytest.approx(np.log(2))  # uniform: both at their ln 2
    h, ce = ev._entropy([{"p_pred": 0.9}])
    assert h == pytest.approx(-(0.9 * np.log(0.9) + 0.1 * np.log(0.1)))
    assert ce == pytest.approx(-0.5 * (np.log(0.9) + np.log(0.1)))  # 1.204: confident = far from the term's floor


def test_heatmap_definitions_pick_the_right_class_map() -> None:
    hd = _load_tool("glas_heatmap_definition")
    cm = np.zeros((1, 2, 2, 3), np.float32)
    cm[0, 0] = [[0, 1, 2], [3, 4, 5]]  # class 0 map
    cm[0, 1] = [[5, 5, 1], [1, 1, 3]]  # class 1 map
    out = {"probs": np.array([[0.2, 0.8]]), "mplus": np.full((1, 2, 3), 0.5), "class_maps": cm}
    h = hd.heatmaps(out, label=0)
    np.testing.assert_allclose(h["predicted"], [[1, 1, 0], [0, 0, 0.5]], atol=1e-6)  # class 1, normalised
    np.testing.assert_allclose(h["true"], [[0, 0.2, 0.4], [0.6, 0.8, 1.0]], atol=1e-6)  # class 0, normalised
    np.testing.assert_array_equal(h["weighted"], out["mplus"][0])  # the shipped M+, unchanged
