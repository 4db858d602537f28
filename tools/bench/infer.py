"""Slide inference benchmark (issue 5): pipeline overhead, flat memory, a naive baseline, the anchor setting.

Run: ``.venv/bin/python tools/bench/infer.py [--quick]``. Prints figures; asserts nothing. Slides are generated
once into ``bench-out/`` (Aperio-style JPEG SVS, ~30% tissue, 0.5 um/px). Every measurement runs in a fresh
subprocess so peak RSS (process tree: main + reader workers) is not polluted by earlier runs.

1. Overhead (CPU): end-to-end ``infer_slide`` wall / (read-only wall + model-only wall) over the same regions.
2. Peak RSS of ``infer_slide`` on a >= 2-gigapixel slide vs one 16x smaller (same settings).
3. Naive baseline in the same run: read each region with openslide, run the model, paste the upsampled M+ into
   a full-slide float32 canvas in RAM, save it (what CLAM-style scripts do): wall and peak RSS ratios.
4. The anchors' TIAToolbox setting (16000x12000, 40% tissue, 512 px at 0.5 mpp, ResNet-18, batch 8, 2 workers):
   our end-to-end patches/s with the stitched multiscale store written, next to TIAToolbox's 6.84 measured on
   this kind of machine (shared/anchors.md).
5. What averaging costs on a slide: end-to-end wall with test-time augmentation (``flips``, ``d4``) and with a
   two-member ensemble, each against one model without augmentation, side by side in one run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import TreeRSS, machine, timer

OUT = Path("bench-out")


def slide(w: int, h: int, tissue: float = 0.3) -> Path:
    from wsltool.testing.big import write_large_svs

    p = OUT / f"bench_{w}x{h}_{int(tissue * 100)}.svs"
    if not p.exists():
        t0 = time.perf_counter()
        tmp = p.with_suffix(".tmp.svs")
        write_large_svs(tmp, w, h, tissue_fraction=tissue, seed=11)
        tmp.replace(p)
        print(f"  generated {p.name} ({p.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - t0:.0f} s")
    return p


def checkpoint(name: str, **kw: object) -> Path:
    from wsltool.testing.models import make_checkpoint

    p = OUT / f"{name}.pt"
    kw.setdefault("head_conv", True)  # the network slide training builds (SLIDE_MODEL_DEFAULTS), as measured
    if not p.exists():
        make_checkpoint(p, **kw)  # type: ignore[arg-type]
    return p


# -- measurements (each in its own process) ---------------------------------------------------------


def warm_imports() -> float:
    """Import what ``infer_slide`` imports lazily (torch, ome-zarr, scipy...); returns the seconds it took.

    Every measured process imports its libraries before its timer starts, so the figures compare pipelines,
    not interpreter start-up (reported on its own line).
    """
    t0 = time.perf_counter()
    import ome_zarr.writer  # noqa: F401
    import scipy.ndimage  # noqa: F401
    import torch  # noqa: F401
    import tqdm  # noqa: F401

    import wsltool.infer.stitch
    import wsltool.store
    import wsltool.stream
    import wsltool.tissue
    import wsltool.train.checkpoint  # noqa: F401

    return time.perf_counter() - t0


def m_e2e(sl: str, ck: str, cfg: dict) -> dict:
    imports = warm_imports()
    from wsltool.config import InferConfig
    from wsltool.infer.run import infer_slide

    out = OUT / (Path(sl).stem + "_e2e.zarr")
    # the memory sampler reads /proc/*/smaps of every process 10 times a second: real CPU on 2 cores, so the
    # timing run ("e2e_time") goes without it
    sampler = TreeRSS(interval=0.1) if cfg.pop("_rss", True) else contextlib.nullcontext(TreeRSS())
    with sampler as rss, timer() as t:
        res = infer_slide(sl, out, ck, InferConfig(**cfg), overwrite=True, resume=False)
    return {
        "wall": t[0],
        "regions": res.regions,
        "rss_mb": rss.peak / 2**20,
        "timings": res.timings,
        "imports": imports,
        "store_mb": sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20,
    }


def _grid(sl: str, ck: str, cfg: dict):
    from wsltool.config import InferConfig, TilingConfig
    from wsltool.slide import open_slide
    from wsltool.tiling import Grid
    from wsltool.tissue import detect_tissue

    c = InferConfig(**cfg)
    with open_slide(sl) as s:
        t = detect_tissue(s, mpp=c.tissue_mpp)
        return Grid.for_slide(
            s, TilingConfig(mpp=c.mpp or 1.0, region=c.region or 256, overlap=c.overlap, min_tissue=c.min_tissue), t
        ), c


def m_read(sl: str, ck: str, cfg: dict) -> dict:
    warm_imports()
    from wsltool.stream import RegionStream, make_loader

    grid, c = _grid(sl, ck, cfg)
    n = 0
    with timer() as t:
        for x, _ in make_loader(RegionStream.from_grid(sl, grid), batch_size=c.batch_size, num_workers=c.workers):
            n += len(x)
    return {"wall": t[0], "regions": n}


def m_model(sl: str, ck: str, cfg: dict) -> dict:
    warm_imports()
    import torch

    from wsltool.train.checkpoint import load_checkpoint

    grid, c = _grid(sl, ck, cfg)
    from wsltool.models.fuse import fuse_batchnorm

    net, _ = load_checkpoint(ck)
    net = net.eval()
    fuse_batchnorm(net)  # the model exactly as infer_slide runs it
    net = net.to(memory_format=torch.channels_last)
    r = c.region or 256
    x = torch.randint(0, 255, (c.batch_size, 3, r, r), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    n, size = len(grid), (r // c.out_factor, r // c.out_factor)
    with torch.inference_mode(), timer() as t:
        for k in range(0, n, c.batch_size):
            net.localize(x[: min(c.batch_size, n - k)], size=size)
    return {"wall": t[0], "regions": n}


def m_naive(sl: str, ck: str, cfg: dict) -> dict:
    warm_imports()
    import numpy as np
    import openslide
    import torch

    from wsltool.train.checkpoint import load_checkpoint

    grid, c = _grid(sl, ck, cfg)
    from wsltool.models.fuse import fuse_batchnorm

    net, _ = load_checkpoint(ck)
    net.eval()
    fuse_batchnorm(net)  # same model as infer_slide: the comparison is about the pipeline
    r = c.region or 256
    with TreeRSS(interval=0.1) as rss, timer() as t:
        osr = openslide.OpenSlide(sl)
        w, h = grid.grid_size
        canvas = np.zeros((h + r, w + r), np.float32)  # full slide at the input mpp, in RAM
        ds = grid.scale
        lvl = osr.get_best_level_for_downsample(ds)
        from PIL import Image

        with torch.inference_mode():
            for reg in grid:
                lds = osr.level_downsamples[lvl]
                size = (round(r * ds / lds),) * 2
                img = osr.read_region((int(reg.x), int(reg.y)), lvl, size).convert("RGB").resize((r, r))
                x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[None]
                m = net.localize(x, size=(r, r))["mplus"][0].numpy()
                canvas[reg.gy : reg.gy + r, reg.gx : reg.gx + r] = m
        np.save(OUT / "naive_canvas.npy", canvas[:h, :w])
        del Image
    return {
        "wall": t[0],
        "regions": len(grid),
        "rss_mb": rss.peak / 2**20,
        "file_mb": (OUT / "naive_canvas.npy").stat().st_size / 2**20,
    }


MODES = {"e2e": m_e2e, "read": m_read, "model": m_model, "naive": m_naive}


def sub(mode: str, sl: Path, ck: Path, cfg: dict) -> dict:
    r = subprocess.run(
        [sys.executable, __file__, "--mode", mode, "--slide", str(sl), "--ckpt", str(ck), "--cfg", json.dumps(cfg)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", default="main")
    ap.add_argument("--slide")
    ap.add_argument("--ckpt")
    ap.add_argument("--cfg", default="{}")
    ap.add_argument("--quick", action="store_true", help="smaller slides (a smoke run of the script)")
    ap.add_argument("--skip", default="", help="comma list of sections to skip: overhead,rss,naive,anchor,averaging")
    a = ap.parse_args()
    if a.mode != "main":
        print(json.dumps(MODES[a.mode](a.slide, a.ckpt, json.loads(a.cfg))))
        return
    OUT.mkdir(exist_ok=True)
    skip = set(a.skip.split(","))
    print(f"machine: {machine()}")
    big_wh = (12_800, 10_000) if a.quick else (51_200, 40_000)  # 2.05 gigapixels
    small_wh = (big_wh[0] // 4, big_wh[1] // 4)
    ck = checkpoint("effnet_lite0_128", input_size=256, mpp=1.0)
    mid = slide(12_800, 10_000)
    cfg = {"mpp": 1.0, "region": 256, "overlap": 32, "out_factor": 8, "batch_size": 8, "workers": 2}
    if "overhead" not in skip:
        print(f"1. overhead on {mid.name} (256 px at 1 um/px, overlap 32, EfficientNet-Lite0, batch 8, 2 readers)")
        e2e = sub("e2e", mid, ck, {**cfg, "_rss": False})
        rd, md = sub("read", mid, ck, cfg), sub("model", mid, ck, cfg)
        n = e2e["regions"]
        print(
            f"   end to end {e2e['wall']:.1f} s ({n / e2e['wall']:.1f} regions/s, store written); read-only "
            f"{rd['wall']:.1f} s; model-only {md['wall']:.1f} s"
        )
        tm = e2e["timings"]
        print(
            "   end-to-end phases: "
            + ", ".join(f"{k} {v:.2f} s" for k, v in tm.items())
            + f"; library imports before the timers {e2e['imports']:.1f} s (a CLI run pays them once)"
        )
        print(
            f"   overhead = e2e / (read + model) = {e2e['wall'] / (rd['wall'] + md['wall']):.3f} (target <= 1.10); "
            f"e2e / max(read, model) = {e2e['wall'] / max(rd['wall'], md['wall']):.3f}"
        )
    cfg_rss = {**cfg, "mpp": 4.0}  # coarse input mpp keeps the region count small; memory is what is measured
    if "rss" not in skip:
        big, small = slide(*big_wh), slide(*small_wh)
        print(
            f"2. peak RSS of infer_slide (256 px at 4 um/px): {big.name} ({big_wh[0] * big_wh[1] / 1e9:.2f} Gpx) "
            f"vs {small.name} (16x smaller)"
        )
        rb, rs = sub("e2e", big, ck, cfg_rss), sub("e2e", small, ck, cfg_rss)
        print(
            f"   big: {rb['rss_mb']:.0f} MB ({rb['regions']} regions, {rb['wall']:.0f} s, "
            f"store {rb['store_mb']:.1f} MB); "
            f"small: {rs['rss_mb']:.0f} MB ({rs['regions']} regions): ratio {rb['rss_mb'] / rs['rss_mb']:.2f} "
            "(target within 25%)"
        )
    if "naive" not in skip:
        big = slide(*big_wh)
        cfg_n = {**cfg, "mpp": 2.0, "workers": 2}
        print(f"3. naive baseline vs wsltool on {big.name} (256 px at 2 um/px)")
        ours, naive = sub("e2e", big, ck, cfg_n), sub("naive", big, ck, cfg_n)
        print(
            f"   wsltool: {ours['wall']:.0f} s, peak {ours['rss_mb']:.0f} MB, store {ours['store_mb']:.1f} MB "
            f"(multiscale OME-Zarr); naive: {naive['wall']:.0f} s, peak {naive['rss_mb']:.0f} MB, "
            f"{naive['file_mb']:.0f} MB float32 array"
        )
        print(
            f"   naive / wsltool: wall {naive['wall'] / ours['wall']:.2f}x, "
            f"peak RSS {naive['rss_mb'] / ours['rss_mb']:.2f}x"
        )
    if "anchor" not in skip:
        an = slide(16_000, 12_000, tissue=0.4)
        ck18 = checkpoint("resnet18_512", backbone="resnet18", output_stride=32, input_size=512, mpp=0.5)
        cfg_a = {"mpp": 0.5, "region": 512, "overlap": 0, "out_factor": 8, "batch_size": 8, "workers": 2}
        r = sub("e2e", an, ck18, cfg_a)
        print(
            f"4. anchor setting ({an.name}, 512 px at 0.5 um/px, ResNet-18, batch 8, 2 readers): {r['regions']} "
            f"patches, {r['regions'] / r['wall']:.2f} patches/s end to end with the store written "
            f"(TIAToolbox SemanticSegmentor measured here: 6.84; ratio {r['regions'] / r['wall'] / 6.84:.2f}); "
            f"peak {r['rss_mb']:.0f} MB (TIAToolbox 5.7 GB); store {r['store_mb']:.1f} MB (TIAToolbox 378 MB)"
        )
    if "averaging" not in skip:
        from wsltool.train.checkpoint import save_ensemble

        ens = OUT / "effnet_lite0_128_x2.pt"
        if not ens.exists():
            save_ensemble(ens, [ck, checkpoint("effnet_lite0_128_s1", input_size=256, mpp=1.0, seed=1)])
        cfg_v = {**cfg, "mpp": 2.0}
        base = sub("e2e", mid, ck, {**cfg_v, "_rss": False})
        print(
            f"5. averaging on {mid.name} (256 px at 2 um/px, {base['regions']} regions): one model {base['wall']:.1f} s"
        )
        for name, model, extra in (
            ("tta flips (4 views)", ck, {"tta": "flips"}),
            ("tta d4 (8 views)", ck, {"tta": "d4"}),
            ("ensemble of 2", ens, {}),
        ):
            r = sub("e2e", mid, model, {**cfg_v, **extra, "_rss": False})
            print(f"   {name}: {r['wall']:.1f} s, {r['wall'] / base['wall']:.2f}x one model")


if __name__ == "__main__":
    main()
