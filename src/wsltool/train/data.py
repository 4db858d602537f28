"""Image datasets for image-level training and evaluation, and the training augmentation.

Augmentation (uint8 in, uint8 out, on ``(3, H, W)`` tensors): random crop (reflect padding when the image is
smaller), flips, 90-degree rotations, and an H&E-appropriate colour perturbation in optical-density space
(per-channel scale and shift of the stain absorbances) with mild brightness/contrast changes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from wsltool.errors import DataError
from wsltool.slide.image_backend import pil_to_rgb8
from wsltool.train.labels import LabeledItem

log = logging.getLogger(__name__)

MASK_SUFFIXES = ("_anno.png", "_anno.bmp", "_anno.tif", "_mask.png")


def read_image(path: str | Path) -> np.ndarray:
    """Read an RGB image as ``uint8 (H, W, 3)``.

    Raises
    ------
    DataError
        When the file cannot be decoded.
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            arr = pil_to_rgb8(im)
    except (OSError, ValueError) as exc:
        msg = f"{path}: cannot read image ({type(exc).__name__}: {exc})"
        raise DataError(msg) from exc
    return arr


def find_mask(item: LabeledItem) -> Path | None:
    """Ground-truth mask of an item: its ``mask`` column, else ``<stem>_anno.png`` (or .bmp/.tif) next to it."""
    if item.mask is not None:
        return item.mask
    for suf in MASK_SUFFIXES:
        p = item.path.with_name(item.path.stem + suf)
        if p.exists():
            return p
    return None


def read_mask(path: str | Path, shape: tuple[int, int]) -> np.ndarray:
    """Read a mask as ``bool (H, W)`` (non-zero = foreground); its shape must match the image.

    Raises
    ------
    DataError
        When unreadable or of another size.
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            arr = np.asarray(im)
    except (OSError, ValueError) as exc:
        msg = f"{path}: cannot read mask ({type(exc).__name__})"
        raise DataError(msg) from exc
    if arr.ndim == 3:
        arr = arr.max(axis=2)
    if arr.shape != shape:
        msg = f"{path}: mask is {arr.shape[1]}x{arr.shape[0]}, image is {shape[1]}x{shape[0]}"
        raise DataError(msg)
    return arr > 0


class ImageSet(torch.utils.data.Dataset):
    """Labelled images held in memory (``uint8 (3, H, W)`` tensors).

    Parameters
    ----------
    items
        Labelled items.
    class_names
        Class order (index = label id).
    crop
        Training crop side; None = whole images, no augmentation.
    color_jitter
        Strength of the colour augmentation.
    """

    def __init__(
        self,
        items: Sequence[LabeledItem],
        class_names: Sequence[str],
        crop: int | None = None,
        color_jitter: float = 1.0,
    ) -> None:
        self.items = list(items)
        self.class_names = list(class_names)
        self.crop = crop
        self.color_jitter = color_jitter
        self.images = [torch.from_numpy(read_image(it.path).copy()).permute(2, 0, 1).contiguous() for it in items]
        self.labels = [self.class_names.index(it.label) for it in items]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = self.images[i]
        if self.crop is not None:
            img = augment(img, self.crop, self.color_jitter)
        return img, self.labels[i]


def random_crop(img: torch.Tensor, size: int, gen: torch.Generator | None = None) -> torch.Tensor:
    """Random ``size x size`` crop of ``(C, H, W)``, reflect-padded first when the image is smaller."""
    _, h, w = img.shape
    if h < size or w < size:
        ph, pw = max(0, size - h), max(0, size - w)
        mode = "reflect" if ph < h and pw < w else "replicate"
        img = F.pad(img[None].float(), [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2], mode=mode)[0].to(img.dtype)
        _, h, w = img.shape
    y = int(torch.randint(0, h - size + 1, (1,), generator=gen))
    x = int(torch.randint(0, w - size + 1, (1,), generator=gen))
    return img[:, y : y + size, x : x + size]


def color_augment(img: torch.Tensor, strength: float = 1.0, gen: torch.Generator | None = None) -> torch.Tensor:
    """H&E colour perturbation of a ``uint8 (3, H, W)`` image.

    Optical density ``od = -log((I + 1) / 256)`` per RGB channel is scaled by ``U(1 - 0.1 s, 1 + 0.1 s)`` and
    shifted by ``U(-0.03 s, 0.03 s)``; then brightness ``U(+-0.05 s)`` and contrast ``U(1 +- 0.1 s)``.
    """
    if strength <= 0:
        return img

    def u(lo: float, hi: float, n: int = 1) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=gen)

    x = img.float()
    od = -torch.log((x + 1) / 256)
    od = od * u(1 - 0.1 * strength, 1 + 0.1 * strength, 3).view(3, 1, 1) + u(-0.03 * strength, 0.03 * strength, 3).view(
        3, 1, 1
    )
    x = 256 * torch.exp(-od) - 1
    x = x + 255 * u(-0.05 * strength, 0.05 * strength)
    mean = x.mean()
    x = (x - mean) * u(1 - 0.1 * strength, 1 + 0.1 * strength) + mean
    return x.clamp(0, 255).round().to(torch.uint8)


def augment(
    img: torch.Tensor, crop: int, color_jitter: float = 1.0, gen: torch.Generator | None = None
) -> torch.Tensor:
    """Crop, random flips and 90-degree rotations, colour perturbation."""
    out = random_crop(img, crop, gen)
    if bool(torch.rand(1, generator=gen) < 0.5):
        out = out.flip(-1)
    k = int(torch.randint(0, 4, (1,), generator=gen))
    if k:
        out = torch.rot90(out, k, dims=(-2, -1))
    return color_augment(out, color_jitter, gen).contiguous()
