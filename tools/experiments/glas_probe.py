"""Which backbone features *can* locate GlaS glands?  A supervised upper bound per feature layer.

For each EfficientNet-Lite0 (ImageNet) feature layer, a linear probe (logistic regression on standardised
features) is trained *with the gland masks* of the 67 `train` images on a 16 px grid and scored on the 18 `valid`
images (pixel ROC AUC / PxAP, the same pooled metrics as ``wsltool eval``).  No weakly supervised method can
localise better than what its feature map carries, so this bounds what a head on that layer can do.  Also prints
two colour baselines with no learning at all (smoothed darkness, smoothed haematoxylin).

This is how we found that Lite0's 1280-channel head convolution (the ImageNet classifier input, which wsltool
used until then) carries almost nothing about glands (probe AUC ~62) while the last MBConv block carries ~85
and the stride-16 stage + last block ~90 (README, "GlaS").

Usage::

    .venv/bin/python tools/experiments/glas_probe.py [--data ../shared/data/glas] [--stride 16]

About 3 min on 2 CPU cores.  Uses the valid masks for evaluation only; never reads test images.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

import wsltool  # noqa: F401  (sets OMP_WAIT_POLICY before torch loads)


def main() -> int:
    import torch
    import torch.nn.functional as F
    from scipy import ndimage as ndi
    from skimage.color import rgb2hed

    from wsltool.evaluate import PixelCurve
    from wsltool.models.backbones import efficientnet_lite0
    from wsltool.train.data import find_mask, read_image, read_mask
    from wsltool.train.glas import glas_items

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[3] / "shared" / "data" / "glas"))
    ap.add_argument("--stride", type=int, default=16, choices=(8, 16, 32), help="backbone output stride")
    ap.add_argument("--grid", type=int, default=16, help="probe grid (px)")
    args = ap.parse_args()
    torch.manual_seed(0)

    items = glas_items(args.data)

    def load(split: str) -> list[tuple[np.ndarray, np.ndarray]]:
        out = []
        for it in items:
            if it.split == split:
                img = read_image(it.path)
                mp = find_mask(it)
                assert mp is not None, it.path
                out.append((img, read_mask(mp, img.shape[:2])))
        return out

    train, valid = load("train"), load("valid")

    def report(name: str, heats: list[np.ndarray]) -> None:
        c = PixelCurve()
        for (_, gt), h in zip(valid, heats, strict=True):
            c.add((h - h.min()) / (h.max() - h.min() + 1e-8), gt)
        print(f"{name:48s} pixel AUC {100 * c.auc():5.1f}  PxAP {100 * c.ap():5.1f}")

    for s in (8, 16):
        report(f"colour: darkness, gaussian sigma {s} px", [-ndi.gaussian_filter(i.mean(2), s) for i, _ in valid])
        report(
            f"colour: haematoxylin, gaussian sigma {s} px",
            [ndi.gaussian_filter(rgb2hed(i)[..., 0], s) for i, _ in valid],
        )

    net = efficientnet_lite0("imagenet", args.stride).eval()
    mid_block = 10  # last block of the stride-16 stage (112 channels)

    def layers(img: np.ndarray) -> dict[str, torch.Tensor]:
        x = (torch.from_numpy(img.copy()).permute(2, 0, 1)[None].float() / 255 - 0.5) / 0.5
        with torch.inference_mode():
            h = F.relu6(net._bn0(net._conv_stem(x)))
            out: dict[str, torch.Tensor] = {}
            for i, b in enumerate(net._blocks):
                h = b(h)
                if i in (3, 7, mid_block):
                    out[f"block {i} ({h.shape[1]} ch)"] = h
            out[f"last block 15 ({h.shape[1]} ch)"] = h
            out["head conv (1280 ch)"] = F.relu6(net._bn1(net._conv_head(h)))
            m = out[f"block {mid_block} (112 ch)"]
            out["block 10 + last block (432 ch)"] = torch.cat([F.adaptive_avg_pool2d(m, h.shape[-2:]), h], 1)
        return out

    ft = [layers(i) for i, _ in train]
    fv = [layers(i) for i, _ in valid]

    def on_grid(f: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        hh, ww = shape[0] // args.grid, shape[1] // args.grid
        if f.shape[-2] >= hh:
            return F.adaptive_avg_pool2d(f, (hh, ww))[0]
        return F.interpolate(f, (hh, ww), mode="bilinear", align_corners=False)[0]

    for key in ft[0]:
        xs, ys = [], []
        for f, (img, gt) in zip(ft, train, strict=True):
            z = on_grid(f[key], img.shape)
            g = F.adaptive_avg_pool2d(torch.from_numpy(gt.astype(np.float32))[None, None], z.shape[-2:])[0, 0]
            xs.append(z.reshape(z.shape[0], -1).T)
            ys.append(g.reshape(-1))
        x, y = torch.cat(xs), torch.cat(ys)
        mu, sd = x.mean(0), x.std(0) + 1e-6
        lin = torch.nn.Linear(x.shape[1], 1)
        opt = torch.optim.Adam(lin.parameters(), 1e-2, weight_decay=1e-4)
        xn = (x - mu) / sd
        for _ in range(300):
            opt.zero_grad()
            loss = F.binary_cross_entropy_with_logits(lin(xn)[:, 0], y)
            loss.backward()
            opt.step()
        heats = []
        for f, (img, _) in zip(fv, valid, strict=True):
            z = on_grid(f[key], img.shape)
            with torch.no_grad():
                s = lin((z.reshape(z.shape[0], -1).T - mu) / sd)[:, 0].reshape(1, 1, *z.shape[-2:])
            heats.append(F.interpolate(s, size=img.shape[:2], mode="bilinear", align_corners=False)[0, 0].numpy())
        report(f"probe (supervised): {key}", heats)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
