"""Slide inference end to end: stitching exactness, exports, resume after SIGKILL, bad input."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wsltool.cli import main as cli_main
from wsltool.config import InferConfig
from wsltool.errors import CheckpointError, ConfigError, MppError, SlideFormatError, StoreError, StoreExistsError
from wsltool.export import store_geojson
from wsltool.infer.run import infer_slide
from wsltool.store import HeatmapStore
from wsltool.testing import write_svs
from wsltool.testing.models import make_checkpoint

SLIDE_MPP = 0.5
H0, W0 = 1280, 1792  # level-0 px of the ramp slide


def ramp_image() -> np.ndarray:
    """H&E-coloured everywhere (pink to purple: all 'tissue'); R is a linear ramp in x and y, B marks a disk."""
    yy, xx = np.mgrid[0:H0, 0:W0].astype(np.float64)
    r = 120 + 120 * (0.6 * xx / W0 + 0.4 * yy / H0)
    g = np.full_like(r, 60.0)
    b = np.where((xx - 1100) ** 2 + (yy - 600) ** 2 < 260**2, 250.0, 170.0)
    return np.stack([r, g, b], axis=-1).round().astype(np.uint8)


def expected_ramp(out_mpp: float, shape: tuple[int, int]) -> np.ndarray:
    """R/255 averaged over each output pixel = the ramp at the pixel centre (the ramp is linear)."""
    f = out_mpp / SLIDE_MPP
    yc = (np.arange(shape[0]) + 0.5) * f - 0.5
    xc = (np.arange(shape[1]) + 0.5) * f - 0.5
    yy, xx = np.meshgrid(yc, xc, indexing="ij")
    return (120 + 120 * (0.6 * xx / W0 + 0.4 * yy / H0)) / 255.0


class PositionStub(torch.nn.Module):
    """A 'model' whose M+ is the input's red channel (0-1), area-averaged to the output size.

    Class maps: the disk indicator from the blue channel (malignant) and its complement; probs fixed so that
    the region gate is 1.
    """

    def __init__(self) -> None:
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def localize(self, x: torch.Tensor, size: tuple[int, int]) -> dict[str, torch.Tensor]:
        xf = x.float() / 255.0
        pooled = F.adaptive_avg_pool2d(xf, size)
        b = x.shape[0]
        probs = torch.tensor([[0.0, 1.0]]).repeat(b, 1)
        g = (pooled[:, 2] - 170 / 255) / (80 / 255) - 0.5  # +0.5 inside the disk, -0.5 outside
        maps = torch.stack([-g * 20, g * 20], dim=1)
        return {"probs": probs, "mplus": pooled[:, 0], "class_maps": maps}


STUB_META = {
    "class_names": ["benign", "malignant"],
    "mpp": 1.0,
    "input_size": 256,
    "method": "stub",
    "fingerprint": "stub",
}


@pytest.fixture(scope="module")
def ramp_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("ramp")
    return write_svs(d / "ramp.svs", ramp_image(), mpp=SLIDE_MPP, compression="none", factors=(2, 4))


@pytest.mark.parametrize("overlap", [0, 64, 128])
def test_stitching_reproduces_position_function(tmp_path: Path, ramp_slide: Path, overlap: int) -> None:
    cfg = InferConfig(
        mpp=1.0, region=256, overlap=overlap, out_factor=8, workers=0, batch_size=4, chunk=32, min_tissue=0.05
    )
    res = infer_slide(ramp_slide, tmp_path / "r.zarr", (PositionStub(), STUB_META), cfg)
    st = HeatmapStore.open(res.store)
    assert st.complete and st.out_mpp == 8.0 and st.slide_mpp == SLIDE_MPP
    # the slide score's top-k covers the same tissue area at any overlap: 5 regions at stride region/2
    k = {0: 1, 64: 2, 128: 5}[overlap]
    assert st.result["aggregation"] == f"top-{k} mean of region class probabilities"
    got = st.mplus(0).astype(np.float64)
    want = expected_ramp(8.0, got.shape)
    # compare every output pixel lying wholly inside the slide, one pixel away from its edge
    # (the Lanczos read pads the slide with white beyond its edge)
    inner = (slice(1, int(H0 * SLIDE_MPP / 8.0) - 1), slice(1, int(W0 * SLIDE_MPP / 8.0) - 1))
    err = np.abs(got[inner] - want[inner])
    assert err.max() < 1e-3, (err.max(), np.unravel_index(err.argmax(), err.shape))
    # region borders are inside the compared area: seams would show up as errors
    assert res.regions > 4 and res.computed == res.regions
    assert st.provenance["tiling"]["overlap"] == overlap


def test_default_overlap_is_half_the_region(tmp_path: Path, ramp_slide: Path) -> None:
    cfg = InferConfig(mpp=1.0, region=256, out_factor=8, workers=0, chunk=32)
    assert cfg.overlap is None
    st = HeatmapStore.open(infer_slide(ramp_slide, tmp_path / "d.zarr", (PositionStub(), STUB_META), cfg).store)
    assert st.provenance["tiling"]["overlap"] == 128 and st.provenance["config"]["overlap"] == 128
    assert st.result["aggregation"].startswith("top-5 ")


def test_geojson_contours_land_on_the_disk_in_level0_pixels(tmp_path: Path, ramp_slide: Path) -> None:
    cfg = InferConfig(mpp=1.0, region=256, overlap=64, out_factor=8, workers=0, chunk=32)
    res = infer_slide(ramp_slide, tmp_path / "d.zarr", (PositionStub(), STUB_META), cfg)
    st = HeatmapStore.open(res.store)
    # channel "malignant" = softmax of the stub's class maps: ~1 inside the disk, ~0 outside
    mal = st.channel("malignant")
    assert mal.max() > 0.99 and mal.min() < 0.01
    gj = store_geojson(res.store, threshold=0.5)  # M+ = red ramp: re-threshold to exercise the path
    assert gj["type"] == "FeatureCollection" and gj["features"]

    # now contours of the disk: threshold the malignant channel via a store whose M+ is the disk
    class DiskStub(PositionStub):
        def localize(self, x: torch.Tensor, size: tuple[int, int]) -> dict[str, torch.Tensor]:
            out = super().localize(x, size)
            out["mplus"] = (F.adaptive_avg_pool2d(x.float() / 255.0, size)[:, 2] > 210 / 255).float()
            return out

    res2 = infer_slide(ramp_slide, tmp_path / "disk.zarr", (DiskStub(), STUB_META), cfg)
    feats = store_geojson(res2.store)["features"]
    assert len(feats) == 1
    ring = np.asarray(feats[0]["geometry"]["coordinates"][0])
    x, y = ring[:-1, 0], ring[:-1, 1]  # the ring is closed: drop the repeated point
    cross = x * np.roll(y, -1) - np.roll(x, -1) * y
    a = cross.sum() / 2
    cx = ((x + np.roll(x, -1)) * cross).sum() / (6 * a)
    cy = ((y + np.roll(y, -1)) * cross).sum() / (6 * a)
    assert abs(cx - 1100) < 20 and abs(cy - 600) < 20  # level-0 pixels of the disk centre
    radii = np.hypot(ring[:, 0] - 1100, ring[:, 1] - 600)
    assert np.all(np.abs(radii - 260) < 24)  # within 1.5 output pixels (16 level-0 px each) of the circle
    area_um2 = feats[0]["properties"]["area_um2"]
    assert abs(area_um2 - np.pi * (260 * SLIDE_MPP) ** 2) / (np.pi * (260 * SLIDE_MPP) ** 2) < 0.1
    assert feats[0]["properties"]["classification"]["name"] == "malignant"


def test_store_metadata_and_napari_ome_zarr(tmp_path: Path, ramp_slide: Path) -> None:
    cfg = InferConfig(mpp=1.0, region=256, overlap=64, out_factor=8, workers=0, chunk=64)
    res = infer_slide(ramp_slide, tmp_path / "m.zarr", (PositionStub(), STUB_META), cfg, slide_mpp=None)
    st = HeatmapStore.open(res.store)
    prov = st.provenance
    assert prov["slide"]["dimensions"] == [W0, H0] and prov["slide"]["mpp_source"] == "metadata"
    assert prov["mpp"] == {"requested": 1.0, "effective": 1.0, "out": 8.0}
    assert prov["model"]["fingerprint"] == "stub" and prov["model"]["class_names"] == ["benign", "malignant"]
    assert st.result["predicted"] == "malignant" and st.result["probs"] == pytest.approx([0.0, 1.0])
    assert st.channel_names == ["M+", "benign", "malignant"]
    from napari_ome_zarr import napari_get_reader

    layers = napari_get_reader(str(res.store))(str(res.store))
    image = next(ly for ly in layers if ly[2] == "image")
    scale = np.asarray(image[1]["scale"])[-2:]
    np.testing.assert_allclose(scale, [8.0, 8.0])  # micrometres: overlays a slide shown at scale 0.5


def test_resume_after_sigkill_equals_clean_run(tmp_path: Path) -> None:
    from wsltool.testing import he_tissue

    c = he_tissue(1024, 1024, seed=5, lesion_fraction=0.2)
    slide = write_svs(tmp_path / "s.svs", c.rgb, compression="none", factors=(4,))
    ckpt = make_checkpoint(tmp_path / "m.pt", input_size=128)
    args = [
        "infer",
        str(slide),
        "--model",
        str(ckpt),
        "--mpp",
        "1.0",
        "--overlap",
        "0",
        "--out-factor",
        "4",
        "--batch",
        "1",
        "--workers",
        "0",
        "--chunk",
        "16",
        "--quiet",
    ]
    clean = tmp_path / "clean.zarr"
    env = dict(os.environ)
    code = [sys.executable, "-c", "import sys; from wsltool.cli import main; sys.exit(main(sys.argv[1:]))"]
    subprocess.run([*code, *args, "-o", str(clean)], check=True, env=env, capture_output=True)
    killed = tmp_path / "killed.zarr"
    proc = subprocess.Popen([*code, *args, "-o", str(killed)], env=env, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    # kill as soon as one row of regions is final: a region (32 output px) spans two 16-px row bands
    while time.time() < deadline:
        try:
            meta = json.loads((killed / "zarr.json").read_text())["attributes"]["wsltool"]
            if len(meta["progress"]["final_bands"]) >= 2:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    st = HeatmapStore.open(killed)
    assert not st.complete and st.state == "incomplete"
    done_before = len(st.final_bands())
    assert 2 <= done_before < st.n_bands
    r = subprocess.run([*code, *args, "-o", str(killed)], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "reused" in r.stdout  # regions of final bands were not recomputed
    a, b = HeatmapStore.open(clean), HeatmapStore.open(killed)
    assert b.complete
    np.testing.assert_array_equal(a.levels[0][:], b.levels[0][:])
    np.testing.assert_array_equal(a.mask(0), b.mask(0))
    assert a.result["probs"] == b.result["probs"]


def test_finished_store_is_protected(tmp_path: Path, ramp_slide: Path) -> None:
    cfg = InferConfig(mpp=1.0, region=256, overlap=0, out_factor=8, workers=0, chunk=64)
    out = tmp_path / "p.zarr"
    infer_slide(ramp_slide, out, (PositionStub(), STUB_META), cfg, resume=False)
    before = HeatmapStore.open(out).mplus(0)
    with pytest.raises(StoreExistsError, match="--overwrite"):
        infer_slide(ramp_slide, out, (PositionStub(), STUB_META), cfg, resume=False)

    # an overwrite that fails midway leaves the finished store untouched
    class Boom(PositionStub):
        calls = 0

        def localize(self, x: torch.Tensor, size: tuple[int, int]) -> dict[str, torch.Tensor]:
            Boom.calls += 1
            if Boom.calls > 2:
                raise RuntimeError("simulated crash")
            return super().localize(x, size)

    with pytest.raises(RuntimeError, match="simulated crash"):
        infer_slide(ramp_slide, out, (Boom(), STUB_META), dataclasses.replace(cfg, batch_size=2), overwrite=True)
    after = HeatmapStore.open(out)
    assert after.complete
    np.testing.assert_array_equal(after.mplus(0), before)


def test_a_finished_store_is_kept_when_only_threshold_or_top_k_change(
    tmp_path: Path, ramp_slide: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = InferConfig(mpp=1.0, region=256, out_factor=8, workers=0, chunk=64, top_k=2)  # overlap: half
    out = tmp_path / "k.zarr"
    first = infer_slide(ramp_slide, out, (PositionStub(), STUB_META), cfg)
    mask = HeatmapStore.open(out).label("mask").copy()
    again = dataclasses.replace(cfg, threshold=0.7, top_k=3)  # no change to the maps
    with caplog.at_level("WARNING", logger="wsltool.infer.run"):
        res = infer_slide(ramp_slide, out, (PositionStub(), STUB_META), again)
    assert res.computed == 0 and res.probs == first.probs
    st = HeatmapStore.open(out)
    assert st.threshold == 0.5 and st.result["aggregation"] == "top-2 mean of region class probabilities"
    np.testing.assert_array_equal(st.label("mask"), mask)
    msg = caplog.text
    assert "threshold 0.5 (asked: 0.7)" in msg and "top-2 mean" in msg and "--overwrite" in msg


def test_export_refuses_bad_targets_and_another_slide_and_keeps_what_was_there(
    tmp_path: Path, ramp_slide: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = InferConfig(mpp=1.0, region=256, out_factor=8, workers=0, chunk=32)
    store = infer_slide(ramp_slide, tmp_path / "r.zarr", (PositionStub(), STUB_META), cfg).store
    slide_copy = tmp_path / "copy.svs"
    slide_copy.write_bytes(ramp_slide.read_bytes())
    (tmp_path / "folder.png").mkdir()
    other = write_svs(tmp_path / "other.svs", ramp_image()[:512, :640], mpp=SLIDE_MPP, factors=())
    before = sorted(p.name for p in tmp_path.iterdir())
    for args, needle in (
        (["--png", str(slide_copy)], "copy.svs: a png export must end in .png"),  # never replaces a slide
        (["--geojson", str(store)], "r.zarr: a geojson export must end in .geojson or .json"),
        (["--png", str(tmp_path / "folder.png")], "folder.png: is a folder, not a file"),
        (["--png", str(tmp_path / "no" / "x.png")], "no/x.png: No such file or directory"),  # the target, no temp
        (["--geojson", str(tmp_path / "g.geojson"), "--threshold", "1.5"], "--threshold must be in (0, 1)"),
        (["--png", str(tmp_path / "p.png"), "--slide", str(other)], "other.svs: not the slide"),
        # nothing is written when either target or the slide is wrong
        (["--geojson", str(tmp_path / "g.geojson"), "--png", str(tmp_path / "x.jpg")], "x.jpg: a png export"),
        (["--geojson", str(tmp_path / "g.geojson"), "--png", str(tmp_path / "p.png"), "--slide", str(other)], "other"),
    ):
        _one_line_error(capsys, ["export", str(store), *args], needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no temporary, no partial file left
    assert slide_copy.read_bytes() == ramp_slide.read_bytes()
    assert cli_main(["export", str(store), "--png", str(tmp_path / "p.png"), "--slide", str(slide_copy)]) == 0
    assert (tmp_path / "p.png").stat().st_size > 1000  # the same slide, moved: fine


@pytest.mark.parametrize(
    ("kw", "hint"),
    [
        ({"out_factor": 3}, "try --out-factor 2"),
        ({"out_factor": 3, "overlap": 15}, "try --out-factor 1"),  # the old hint (--overlap 15) went in circles
        ({"out_factor": 1000}, "try --out-factor 64"),
        ({"out_factor": 16, "overlap": 8}, "try --overlap 16 or --out-factor 8"),
    ],
)
def test_an_out_factor_that_does_not_fit_suggests_values_that_do(kw: dict[str, int], hint: str) -> None:
    from wsltool.infer.run import region_geometry

    meta = {"input_size": 128}
    with pytest.raises(ConfigError, match="must divide") as ei:
        region_geometry(InferConfig(**kw), meta)
    assert str(ei.value).endswith(hint)
    for suggestion in hint.removeprefix("try ").split(" or "):  # each suggestion, followed, is accepted
        flag, value = suggestion.split()
        key = {"--out-factor": "out_factor", "--overlap": "overlap"}[flag]
        region, overlap, f = region_geometry(InferConfig(**{**kw, key: int(value)}), meta)
        assert region % f == 0 and (region - overlap) % f == 0


def _one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str], needle: str) -> str:
    rc = cli_main(argv)
    err = capsys.readouterr().err.strip()
    assert rc != 0
    assert len(err.splitlines()) == 1, err
    assert needle in err, err
    return err


def test_bad_inputs_give_one_line_errors(tmp_path: Path, ramp_slide: Path, capsys) -> None:
    ckpt = make_checkpoint(tmp_path / "m.pt", input_size=128)
    txt = tmp_path / "notes.svs"
    txt.write_text("not a slide")
    _one_line_error(
        capsys, ["infer", str(txt), "-o", str(tmp_path / "a.zarr"), "--model", str(ckpt)], f"{txt}: not a slide"
    )
    fake_ckpt = tmp_path / "fake.pt"
    fake_ckpt.write_text("hello")
    _one_line_error(
        capsys, ["infer", str(ramp_slide), "-o", str(tmp_path / "b.zarr"), "--model", str(fake_ckpt)], str(fake_ckpt)
    )
    _one_line_error(
        capsys,
        ["infer", str(ramp_slide), "-o", str(tmp_path / "c.zarr"), "--model", str(ckpt), "--region", "1024"],
        "input size 128",
    )
    nompp = write_svs(tmp_path / "nompp.svs", ramp_image()[:256, :256], mpp=None, mag=None, factors=())
    _one_line_error(
        capsys, ["infer", str(nompp), "-o", str(tmp_path / "d.zarr"), "--model", str(ckpt)], "--slide-mpp (infer)"
    )
    assert not (tmp_path / "a.zarr").exists() and not (tmp_path / "d.zarr").exists()
    with pytest.raises(SlideFormatError):
        infer_slide(txt, tmp_path / "e.zarr", str(ckpt))
    with pytest.raises(MppError):
        infer_slide(nompp, tmp_path / "e.zarr", str(ckpt))
    with pytest.raises(CheckpointError):
        infer_slide(ramp_slide, tmp_path / "e.zarr", str(fake_ckpt))


@pytest.mark.skipif(os.geteuid() != 0, reason="read-only folders do not stop root; needs a tmpfs mount")
def test_read_only_and_full_disk(tmp_path: Path, ramp_slide: Path) -> None:
    cfg = InferConfig(mpp=1.0, region=256, overlap=0, out_factor=8, workers=0, chunk=16)
    ro = tmp_path / "ro"
    ro.mkdir()
    full = tmp_path / "full"
    full.mkdir()
    mounted = []
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,ro", "tmpfs", str(ro)], check=True)
        mounted.append(ro)
        with pytest.raises(StoreError, match=str(ro)):
            infer_slide(ramp_slide, ro / "x.zarr", (PositionStub(), STUB_META), cfg)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40k", "tmpfs", str(full)], check=True)
        mounted.append(full)
        with pytest.raises(StoreError) as ei:
            infer_slide(ramp_slide, full / "x.zarr", (PositionStub(), STUB_META), cfg)
        assert "\n" not in str(ei.value)
        if (full / "x.zarr").exists():
            assert not HeatmapStore.open(full / "x.zarr").complete
    finally:
        for m in mounted:
            subprocess.run(["umount", str(m)], check=False)


def test_float16_overflow_is_recomputed_in_float32() -> None:
    """Inference autocast is float16 (faster and closer to float32 than bfloat16 on the GPU); a batch whose
    outputs overflow float16 is recomputed without autocast, and a finite one is not.  Runs on the CPU, where
    torch's autocast takes float16 too."""
    import torch

    from wsltool.infer.run import localize_batch

    class Overflowing(torch.nn.Module):
        def __init__(self, overflow: bool) -> None:
            super().__init__()
            self.overflow = overflow
            self.calls: list[bool] = []

        def localize(self, x: torch.Tensor, size: tuple[int, int]) -> dict[str, torch.Tensor]:
            under = torch.is_autocast_enabled("cpu")
            self.calls.append(under)
            v = torch.full((x.shape[0], 1, *size), 7.0e4 if under and self.overflow else 0.25)
            v = v.to(torch.get_autocast_dtype("cpu") if under else torch.float32)  # 7e4 -> inf in float16
            return {"mplus": v[:, 0], "class_maps": v, "probs": torch.full((x.shape[0], 2), 0.5)}

    x = torch.zeros(2, 3, 8, 8)
    bad = Overflowing(True)
    with torch.autocast("cpu", enabled=False):
        out, redone = localize_batch(bad, x, (4, 4), amp=True)
    assert redone and bad.calls == [True, False]
    assert torch.isfinite(out["class_maps"]).all() and out["class_maps"].dtype == torch.float32
    good = Overflowing(False)
    out, redone = localize_batch(good, x, (4, 4), amp=True)
    assert not redone and good.calls == [True] and float(out["mplus"][0, 0, 0]) == 0.25
    plain = Overflowing(True)
    out, redone = localize_batch(plain, x, (4, 4), amp=False)
    assert not redone and plain.calls == [False]


def test_memory_format_per_device_type() -> None:
    """channels_last on the CPU (faster there), NCHW on CUDA (cuDNN's depthwise convolutions, the default
    Lite0's, ran 2x slower in channels_last on an H200: README "GPU path")."""
    import torch

    from wsltool.infer.run import memory_format

    assert memory_format("cpu") == torch.channels_last
    assert memory_format(torch.device("cuda", 0)) == torch.contiguous_format


def test_float16_batch_path_with_a_real_model_and_views() -> None:
    """The autocast branch of ``localize_batch`` (taken on the GPU) with a real network wrapped in 8-view
    test-time augmentation, run here under the CPU's float16 autocast: every output is checked for
    finiteness (all are tensors), nothing is redone, and the class maps stay close to float32."""
    import torch

    from wsltool.config import ModelConfig
    from wsltool.infer.run import localize_batch
    from wsltool.models import build_model, with_tta

    torch.manual_seed(0)
    net = with_tta(build_model(ModelConfig(backbone="tiny", pretrained="none", output_stride=8)).eval(), "d4")
    x = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    with torch.inference_mode():
        half, redone = localize_batch(net, x, (16, 16), amp=True)
        full, _ = localize_batch(net, x, (16, 16), amp=False)
    assert not redone and set(half) == {"probs", "mplus", "class_maps"}
    rel = float((half["class_maps"].float() - full["class_maps"]).norm() / full["class_maps"].norm())
    assert 0 < rel < 1e-2  # float16 rounding happened, and stayed small
    assert torch.allclose(half["probs"].float(), full["probs"], atol=1e-3)
