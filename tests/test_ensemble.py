"""Seed ensembles and test-time augmentation: exact averaging, geometry, checkpoints, CLI and slide inference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wsltool.cli import main
from wsltool.config import InferConfig
from wsltool.errors import CheckpointError
from wsltool.infer.run import infer_slide
from wsltool.models import Ensemble, TestTimeAugmentation, build_model, normalize_per_image, with_tta
from wsltool.models.ensemble import average_outputs
from wsltool.store import HeatmapStore
from wsltool.testing import write_svs
from wsltool.testing.models import make_checkpoint
from wsltool.train.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint, save_ensemble

TINY = {"backbone": "tiny", "output_stride": 8}


def _tiny(seed: int, method: str = "minmax") -> torch.nn.Module:
    from wsltool.config import ModelConfig

    torch.manual_seed(seed)
    return build_model(ModelConfig(method=method, pretrained="none", **TINY)).eval()  # type: ignore[arg-type]


def _image(h: int = 40, w: int = 56, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (1, 3, h, w), np.uint8))


def test_average_outputs_means_probs_and_renormalises_mplus() -> None:
    a = {"probs": torch.tensor([[0.2, 0.8]]), "mplus": torch.tensor([[[0.0, 1.0], [0.5, 0.5]]])}
    b = {"probs": torch.tensor([[0.6, 0.4]]), "mplus": torch.tensor([[[0.0, 0.0], [1.0, 0.5]]])}
    for o in (a, b):
        o["class_maps"] = torch.stack([o["mplus"], 1 - o["mplus"]], dim=1)
    out = average_outputs([a, b])
    assert torch.allclose(out["probs"], torch.tensor([[0.4, 0.6]]))
    # mean [[0, .5], [.75, .5]] -> min-max normalised per image
    assert torch.allclose(out["mplus"], torch.tensor([[[0.0, 2 / 3], [1.0, 2 / 3]]]), atol=1e-6)
    assert torch.allclose(out["class_maps"][:, 0], torch.tensor([[[0.0, 0.5], [0.75, 0.5]]]))


@pytest.mark.parametrize("mode", ["flips", "d4"])
def test_tta_map_turns_with_the_image(mode: str) -> None:
    """Averaging over a group of views makes the map follow the image exactly, for any network.

    A plain CNN is not rotation-equivariant; the averaged one is, if every view's map is turned back the right
    way.  Non-square input, so a turn that forgets to swap the output size fails too.
    """
    model = TestTimeAugmentation(_tiny(0), mode)
    x = _image()
    plain = _tiny(0).localize(x)
    with torch.inference_mode():
        base = model.localize(x)
        assert base["mplus"].shape == (1, 40, 56) and base["class_maps"].shape == (1, 2, 40, 56)
        flipped = model.localize(x.flip(-1))
        assert torch.allclose(flipped["mplus"], base["mplus"].flip(-1), atol=1e-5)
        assert torch.allclose(flipped["probs"], base["probs"], atol=1e-6)
        if mode == "d4":
            turned = model.localize(torch.rot90(x, 1, dims=(-2, -1)))
            assert turned["mplus"].shape == (1, 56, 40)
            assert torch.allclose(turned["mplus"], torch.rot90(base["mplus"], 1, dims=(-2, -1)), atol=1e-5)
    # and it is not the plain map (the network is not equivariant by itself)
    assert (base["mplus"] - plain["mplus"]).abs().max() > 1e-3
    assert float(base["mplus"].min()) == 0.0 and abs(float(base["mplus"].max()) - 1.0) < 1e-6


def test_tta_none_is_the_model_and_bad_mode_is_refused() -> None:
    m = _tiny(0)
    assert with_tta(m, "none") is m
    with pytest.raises(ValueError, match="test-time augmentation"):
        TestTimeAugmentation(m, "d8")


def test_ensemble_localize_is_the_members_average() -> None:
    a, b = _tiny(0), _tiny(1)
    x = _image(seed=3)
    with torch.inference_mode():
        oa, ob, oe = a.localize(x), b.localize(x), Ensemble([a, b]).localize(x)
    assert torch.allclose(oe["probs"], (oa["probs"] + ob["probs"]) / 2)
    assert torch.allclose(oe["mplus"], normalize_per_image((oa["mplus"] + ob["mplus"]) / 2), atol=1e-6)
    assert not torch.allclose(oa["mplus"], ob["mplus"])  # two different members


def test_ensemble_checkpoint_round_trip_and_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p0 = make_checkpoint(tmp_path / "a.pt", seed=0, input_size=64, **TINY)
    p1 = make_checkpoint(tmp_path / "b.pt", seed=1, input_size=64, method="wildcat", **TINY)
    out = tmp_path / "ens.pt"
    assert main(["ensemble", str(p0), str(p1), "-o", str(out)]) == 0
    assert "2 members (minmax+wildcat)" in capsys.readouterr().out
    model, meta = load_checkpoint(out)
    assert isinstance(model, Ensemble) and len(model.members) == 2
    assert [e["source"] for e in meta["ensemble"]] == [str(p0), str(p1)]
    assert [e["config"]["method"] for e in meta["ensemble"]] == ["minmax", "wildcat"]
    assert meta["class_names"] == ["benign", "malignant"] and meta["input_size"] == 64 and meta["mpp"] == 1.0
    assert meta["fingerprint"] != read_checkpoint(p0)["meta"]["fingerprint"]
    m0, _ = load_checkpoint(p0)
    m1, _ = load_checkpoint(p1)
    x = _image(seed=5)
    with torch.inference_mode():
        want = normalize_per_image((m0.localize(x)["mplus"] + m1.localize(x)["mplus"]) / 2)
        got = model.localize(x)["mplus"]
    assert torch.allclose(got, want, atol=1e-6)


def test_ensemble_refuses_what_cannot_be_averaged(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p0 = make_checkpoint(tmp_path / "a.pt", seed=0, **TINY)
    other = make_checkpoint(tmp_path / "c.pt", class_names=("normal", "tumour"), **TINY)
    coarse = make_checkpoint(tmp_path / "m.pt", mpp=2.0, **TINY)
    ens = tmp_path / "e.pt"
    save_ensemble(ens, [p0, make_checkpoint(tmp_path / "b.pt", seed=1, **TINY)])
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    cases = [
        ([p0], "at least two"),
        ([p0, other], "classes"),
        ([p0, coarse], "um/px"),
        ([p0, ens], "is an ensemble already"),
        ([p0, junk], "junk.pt: corrupt"),
        ([p0, tmp_path / "missing.pt"], "missing.pt: checkpoint not found"),
    ]
    for sources, words in cases:
        dst = tmp_path / "out.pt"
        rc = main(["ensemble", *map(str, sources), "-o", str(dst)])
        err = capsys.readouterr().err
        assert rc != 0 and words in err and len(err.strip().splitlines()) == 1, (words, err)
        assert not dst.exists() and not list(tmp_path.glob("*.tmp"))
    before = p0.read_bytes()
    with pytest.raises(CheckpointError, match="overwrite one of its members"):
        save_ensemble(p0, [p0, coarse])
    assert p0.read_bytes() == before


def test_ensemble_never_replaces_an_existing_file_unless_asked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    p0 = make_checkpoint(tmp_path / "a.pt", seed=0, **TINY)
    p1 = make_checkpoint(tmp_path / "b.pt", seed=1, **TINY)
    p2 = make_checkpoint(tmp_path / "c.pt", seed=2, **TINY)
    dst = tmp_path / "shipped.pt"
    assert main(["ensemble", str(p0), str(p1), "-o", str(dst)]) == 0
    capsys.readouterr()
    before = dst.read_bytes()
    assert main(["ensemble", str(p0), str(p2), "-o", str(dst)]) != 0
    err = capsys.readouterr().err.strip()
    assert str(dst) in err and "already exists" in err and "--overwrite" in err and len(err.splitlines()) == 1
    assert dst.read_bytes() == before
    assert main(["ensemble", str(p0), str(p2), "-o", str(dst), "--overwrite"]) == 0
    assert [e["source"] for e in read_checkpoint(dst)["meta"]["ensemble"]] == [str(p0), str(p2)]


class NormalisedPositionStub(torch.nn.Module):
    """M+ = the input's red channel area-averaged to the output size, min-max normalised per region."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def localize(self, x: torch.Tensor, size: tuple[int, int]) -> dict[str, torch.Tensor]:
        pooled = F.adaptive_avg_pool2d(x.float() / 255.0, size)
        m = normalize_per_image(pooled[:, 0])
        return {"probs": torch.tensor([[0.0, 1.0]]).repeat(x.shape[0], 1), "mplus": m, "class_maps": pooled[:, :2]}


def test_slide_inference_with_tta_and_an_ensemble(tmp_path: Path) -> None:
    # a diagonal ramp: every view of a region gives a differently oriented map, which must be turned back
    yy, xx = np.mgrid[0:768, 0:1024].astype(np.float64)
    img = np.stack([40 + 200 * (0.7 * xx / 1024 + 0.3 * yy / 768), np.full_like(xx, 60), np.full_like(xx, 170)], -1)
    slide = write_svs(tmp_path / "ramp.svs", img.round().astype(np.uint8), mpp=0.5, compression="none", factors=(2,))
    meta = {"class_names": ["benign", "malignant"], "mpp": 1.0, "input_size": 128, "method": "stub"}
    cfg = InferConfig(mpp=1.0, region=128, out_factor=8, workers=0, chunk=32, min_tissue=0.05)
    plain = HeatmapStore.open(infer_slide(slide, tmp_path / "p.zarr", (NormalisedPositionStub(), meta), cfg).store)
    ens = (Ensemble([NormalisedPositionStub(), NormalisedPositionStub()]), meta)
    tta = HeatmapStore.open(
        infer_slide(slide, tmp_path / "t.zarr", ens, InferConfig(**{**cfg.__dict__, "tta": "d4"})).store
    )
    assert tta.provenance["config"]["tta"] == "d4" and plain.provenance["config"]["tta"] == "none"
    a, b = plain.mplus(0).astype(np.float64), tta.mplus(0).astype(np.float64)
    assert a.shape == b.shape and a.std() > 0.1
    assert np.abs(a - b).max() < 2e-3


def test_ensemble_checkpoint_runs_slide_inference_like_its_member(tmp_path: Path) -> None:
    """A real ensemble file through ``infer_slide`` (load, BatchNorm folding, autocast path): two models that
    differ by one nudged bias (an ensemble refuses identical weights) give the first one's heatmap; the
    provenance names the ensemble."""
    rng = np.random.default_rng(0)
    base = np.array([180.0, 60.0, 170.0])  # H&E pink-purple everywhere: all tissue, with texture for the model
    img = np.clip(base + rng.normal(0, 25, (512, 640, 3)), 0, 255).astype(np.uint8)
    slide = write_svs(tmp_path / "s.svs", img, mpp=0.5, compression="none", factors=(2,))
    one = make_checkpoint(tmp_path / "one.pt", input_size=64, mpp=1.0, **TINY)
    twin, _ = load_checkpoint(one)
    with torch.no_grad():
        twin.loc_head.conv.bias.add_(1e-6)
    save_checkpoint(tmp_path / "twin.pt", twin, class_names=["benign", "malignant"], mpp=1.0, input_size=64)
    two = tmp_path / "twin.pt"
    ens = tmp_path / "ens.pt"
    save_ensemble(ens, [one, two])
    cfg = InferConfig(mpp=1.0, out_factor=4, workers=0, chunk=32, min_tissue=0.0)
    a = HeatmapStore.open(infer_slide(slide, tmp_path / "a.zarr", str(one), cfg).store)
    b = HeatmapStore.open(infer_slide(slide, tmp_path / "b.zarr", str(ens), cfg).store)
    assert b.provenance["model"]["path"] == str(ens) and b.provenance["model"]["method"] == "minmax"
    assert b.provenance["model"]["fingerprint"] != a.provenance["model"]["fingerprint"]
    ma, mb = a.mplus(0).astype(np.float64), b.mplus(0).astype(np.float64)
    assert ma.shape == mb.shape and ma.std() > 0.01
    assert np.abs(ma - mb).max() < 2e-3
    np.testing.assert_allclose(a.result["probs"], b.result["probs"], atol=1e-4)
