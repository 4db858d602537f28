"""GPU path benchmark: mixed precision, channels_last, throughput, and whether the pipeline keeps the GPU fed.

Run: ``.venv/bin/python tools/bench/gpu.py [--quick] [--json out.json]``. Prints figures; asserts nothing. Without
a CUDA device it prints the CPU rows only (so ``make bench`` exercises the code everywhere). Slides are written
uncompressed (``write_large_svs(compression="none")``) so the script also runs where imagecodecs is absent.

1. Model alone, the inference network exactly as ``infer_slide`` prepares it (BatchNorm folded): regions/s at
   512 px for ResNet-18 (the anchors' setting) and the default EfficientNet-Lite0 (stride 16), float32 NCHW,
   float32 channels_last, bfloat16 / float16 autocast in both layouts (and with cudnn.benchmark), batch 8 and
   64; the relative error
   ||maps - ref|| / ||ref|| of the localizer's class maps against float32 NCHW on the same inputs (random
   pixels, never zeros). Not M+: per-image min-max normalisation of an untrained network's nearly flat map
   amplifies 3e-7 float32 differences into 0.2 (measured on CPU).
2. Training step of the default min-max model (three passes: X, X+, X-): images/s, float32 vs bfloat16
   autocast, with and without channels_last, at the GlaS budget (batch 8, 224 px) and a GPU budget (32, 384 px).
3. End to end: ``infer_slide`` on the anchors' slide size (16000 x 12000, 40 % tissue, 512 px at 0.5 um/px)
   with 2 and 8 reader workers, batch 8 and 32, channels_last and NCHW (``wsltool.infer.run.MEMORY_FORMAT``):
   regions/s, and its ratio to the best model-alone rate (how much of the time the GPU is fed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine

OUT = Path("bench-out")


def _sync(dev: Any) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _median_time(fn: Any, dev: Any, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        fn()
    _sync(dev)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def model_alone(dev: Any, quick: bool) -> list[dict[str, Any]]:
    """Section 1: regions/s of the inference network alone, per precision and memory layout."""
    import torch

    from wsltool.infer.run import _load_model
    from wsltool.testing.models import make_checkpoint

    rows: list[dict[str, Any]] = []
    nets = {
        "resnet18": {"backbone": "resnet18", "output_stride": 32},
        "lite0": {"backbone": "efficientnet_lite0", "head_conv": True},
    }
    cuda = dev.type == "cuda"
    modes: list[tuple[str, bool, Any, bool]] = [("fp32", False, None, False), ("fp32", True, None, False)]
    if cuda:
        for label, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
            modes += [(label, False, dtype, False), (label, True, dtype, False)]
        modes += [("bf16", False, torch.bfloat16, True), ("bf16", True, torch.bfloat16, True)]
    batches = (8, 64) if cuda and not quick else (8,)
    reps = (3 if quick else 10) if cuda else 2
    gen = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        for name, kw in nets.items():
            ck = make_checkpoint(Path(tmp) / f"{name}.pt", input_size=512, mpp=0.5, **kw)  # type: ignore[arg-type]
            net, _ = _load_model(str(ck), dev)
            for b in batches:
                x_cpu = torch.randint(0, 256, (b, 3, 512, 512), dtype=torch.uint8, generator=gen)
                x_nchw = x_cpu.to(dev)
                x_cl = x_nchw.contiguous(memory_format=torch.channels_last)
                ref = None
                for label, cl, dtype, tuned in modes:
                    torch.backends.cudnn.benchmark = tuned
                    net = net.to(memory_format=torch.channels_last if cl else torch.contiguous_format)
                    x = x_cl if cl else x_nchw

                    def run(net: Any = net, x: Any = x, dtype: Any = dtype) -> Any:
                        with torch.inference_mode(), torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
                            return net.localize(x, size=(128, 128))

                    t = _median_time(run, dev, warmup=2 if cuda else 1, reps=reps)
                    m = run()["class_maps"].float()
                    ref = m if ref is None else ref
                    rows.append(
                        {
                            "net": name,
                            "batch": b,
                            "mode": label
                            + (" channels_last" if cl else " NCHW")
                            + (" cudnn.benchmark" if tuned else ""),
                            "regions_s": b / t,
                            "rel_err": float((m - ref).norm() / ref.norm()),
                        }
                    )
                    print(
                        f"  {name:8s} batch {b:3d} {rows[-1]['mode']:36s} {rows[-1]['regions_s']:8.1f} regions/s"
                        f"   rel. error of the class maps vs fp32 NCHW {rows[-1]['rel_err']:.1e}",
                        flush=True,
                    )
            torch.backends.cudnn.benchmark = False
            del net
            if cuda:
                torch.cuda.empty_cache()
    return rows


def train_step(dev: Any, quick: bool) -> list[dict[str, Any]]:
    """Section 2: images/s of one optimisation step of the default min-max model."""
    import torch

    from wsltool.config import ModelConfig
    from wsltool.models import build_model

    cuda = dev.type == "cuda"
    rows: list[dict[str, Any]] = []
    settings = [(8, 224)] + ([(32, 384)] if cuda and not quick else [])
    modes: list[tuple[str, bool, Any]] = [("fp32", False, None)]
    if cuda:
        modes += [("fp32", True, None), ("bf16", False, torch.bfloat16), ("bf16", True, torch.bfloat16)]
    for b, crop in settings:
        for label, cl, dtype in modes:
            torch.manual_seed(0)
            model = build_model(ModelConfig(pretrained="none", minmax_start=0)).to(dev)  # min-max passes at once
            if cl:
                model = model.to(memory_format=torch.channels_last)
            model.train()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            x = torch.randint(0, 256, (b, 3, crop, crop), dtype=torch.uint8).to(dev)
            if cl:
                x = x.contiguous(memory_format=torch.channels_last)
            y = torch.arange(b, device=dev) % 2

            def step(model: Any = model, opt: Any = opt, x: Any = x, y: Any = y, dtype: Any = dtype) -> None:
                with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
                    losses = model.training_losses(model.normalize(x), y, epoch=15, barrier_t=5.0)
                opt.zero_grad(set_to_none=True)
                losses["total"].backward()
                opt.step()

            t = _median_time(step, dev, warmup=2 if cuda else 1, reps=(3 if quick else 10) if cuda else 2)
            rows.append({"batch": b, "crop": crop, "mode": f"{label}{' channels_last' if cl else ''}", "img_s": b / t})
            print(f"  batch {b:3d} crop {crop} {rows[-1]['mode']:18s} {b / t:8.1f} images/s", flush=True)
            del model, opt
    return rows


def end_to_end(dev: Any, quick: bool, alone: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Section 3: ``infer_slide`` regions/s against the model-alone rate."""
    from wsltool.config import InferConfig
    from wsltool.infer.run import infer_slide
    from wsltool.testing.big import write_large_svs
    from wsltool.testing.models import make_checkpoint

    OUT.mkdir(exist_ok=True)
    w, h = (6000, 4000) if quick else (16000, 12000)
    sl = OUT / f"gpu_raw_{w}x{h}_40.svs"
    if not sl.exists():
        t0 = time.perf_counter()
        tmp = sl.with_suffix(".tmp.svs")
        write_large_svs(tmp, w, h, tissue_fraction=0.4, seed=11, compression="none")
        tmp.replace(sl)
        print(f"  generated {sl.name} ({sl.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - t0:.0f} s")
    import wsltool.infer.run as run_mod

    cuda = dev.type == "cuda"
    combos = (
        [(2, 8, "channels_last"), (8, 32, "channels_last"), (8, 32, "contiguous")]
        if cuda and not quick
        else [(2, 8, "channels_last")]
    )
    rows: list[dict[str, Any]] = []
    for name, kw in (
        ("resnet18", {"backbone": "resnet18", "output_stride": 32}),
        ("lite0", {"backbone": "efficientnet_lite0", "head_conv": True}),
    ):
        ck = OUT / f"gpu_{name}_512.pt"
        if not ck.exists():
            make_checkpoint(ck, input_size=512, mpp=0.5, **kw)  # type: ignore[arg-type]
        for workers, batch, layout in combos:
            run_mod.MEMORY_FORMAT[dev.type] = layout
            cfg = InferConfig(
                mpp=0.5, region=512, overlap=0, out_factor=8, batch_size=batch, workers=workers, device=dev.type
            )
            with tempfile.TemporaryDirectory() as tmp:
                res = infer_slide(sl, Path(tmp) / "h.zarr", str(ck), cfg)
            rate = res.regions / res.seconds
            ref = [r["regions_s"] for r in alone if r["net"] == name]
            fed = rate / max(ref) if ref else float("nan")
            rows.append(
                {
                    "net": name,
                    "workers": workers,
                    "batch": batch,
                    "layout": layout,
                    "regions": res.regions,
                    "seconds": res.seconds,
                    "regions_s": rate,
                    "of_model_alone": fed,
                    "timings": res.timings,
                }
            )
            print(
                f"  {name:8s} {workers} readers batch {batch:2d} {layout:13s}: {res.regions} regions in "
                f"{res.seconds:5.1f} s = {rate:6.1f} regions/s ({100 * fed:.0f} % of the model alone at its best)"
                f"  stages {', '.join(f'{k} {v:.1f}' for k, v in res.timings.items())}",
                flush=True,
            )
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes, few repetitions")
    ap.add_argument("--json", default=None, help="also write every figure to this JSON file")
    ap.add_argument("--skip", default="", help="comma list of sections to skip: model,train,e2e")
    args = ap.parse_args()
    import torch

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    skip = set(filter(None, args.skip.split(",")))
    print(f"machine: {machine()}; torch {torch.__version__}; device {dev}")
    if dev.type == "cpu":
        print("  no CUDA device: CPU rows only (the figures this script is for need a GPU)")
    res: dict[str, Any] = {"machine": machine(), "torch": torch.__version__}
    if "model" not in skip:
        print("1. model alone (inference network as infer_slide prepares it), 512 px regions")
        res["model"] = model_alone(dev, args.quick)
    if "train" not in skip:
        print("2. training step, default min-max (X, X+, X- passes + backward + AdamW)")
        res["train"] = train_step(dev, args.quick)
    if "e2e" not in skip:
        print("3. end to end infer_slide (read, tissue, model, stitch, OME-Zarr pyramid)")
        res["e2e"] = end_to_end(dev, args.quick, res.get("model", []))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
