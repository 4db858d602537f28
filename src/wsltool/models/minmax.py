"""The min-max entropy model and the WILDCAT / CAM baselines, behind one ``localize`` interface.

``MinMaxNet``: a backbone and a localizer head (WILDCAT) on X; a classifier head (WILDCAT) on X+ and X-, on the
shared backbone (method.md, default) or on its own copy of it (``classifier_backbone="own"``).
M+ = sum_c softmax(localizer scores)_c * map_c, min-max normalised per image; pseudo-binary mask
m = sigmoid(w (M+ - sigma)); X+ = X * m and X- = X * (1 - m) in normalised pixel space, resized by
``cls_scale`` for the classifier.  See method.md.

``BaselineNet``: backbone + one head (WILDCAT or CAM); its class maps give M+ by the same weighting.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from wsltool.config import ModelConfig
from wsltool.errors import ConfigError
from wsltool.models.backbones import build_backbone, set_padding_mode
from wsltool.models.erasing import recursive_erase
from wsltool.models.losses import ce_loss, size_loss, uniform_ce_loss
from wsltool.models.wildcat import CamHead, WildcatHead, wildcat_pool

log = logging.getLogger(__name__)


def normalize_per_image(maps: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Min-max normalise each image's map to [0, 1] independently of the rest of the batch.

    Parameters
    ----------
    maps
        ``(B, H, W)`` or ``(B, 1, H, W)``.
    eps
        Guard for constant maps (a range below ``eps``: they become 0); any larger range maps exactly onto
        [0, 1].

    Returns
    -------
    torch.Tensor
        Same shape, each image in [0, 1].
    """
    flat = maps.flatten(1)
    lo = flat.min(dim=1, keepdim=True).values
    hi = flat.max(dim=1, keepdim=True).values
    return ((flat - lo) / (hi - lo).clamp_min(eps)).view_as(maps)  # the max is exactly 1 unless constant


def weighted_map(scores: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """``M+ = sum_c softmax(scores)_c * maps_c``: ``(B, C)``, ``(B, C, h, w)`` -> ``(B, 1, h, w)``."""
    p = scores.float().softmax(dim=1)
    return (p[:, :, None, None] * maps.float()).sum(dim=1, keepdim=True)


def pseudo_binary(mplus: torch.Tensor, w: float, sigma: float) -> torch.Tensor:
    """Pseudo-binary mask ``sigmoid(w (M+ - sigma))`` (in (0, 1))."""
    return torch.sigmoid(w * (mplus - sigma))


@contextlib.contextmanager
def _bn_eval(module: nn.Module, active: bool) -> Iterator[None]:
    """Temporarily put every BatchNorm layer in eval mode (running statistics, no update)."""
    if not active:
        yield
        return
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    for m in bns:
        m.eval()
    try:
        yield
    finally:
        for m in bns:
            m.train()


class _Base(nn.Module):
    """Backbone, input normalisation and the shared parts of ``localize``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone, info = build_backbone(
            cfg.backbone, cfg.pretrained, cfg.output_stride, cfg.head_conv, cfg.multi_level
        )
        if cfg.padding != "zeros":
            set_padding_mode(self.backbone, cfg.padding)
        self.channels = info.channels
        mean = cfg.mean or info.mean
        std = cfg.std or info.std
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def train(self, mode: bool = True) -> _Base:
        """Set training mode; BatchNorm stays in eval mode when ``bn_mode == "frozen"``."""
        super().train(mode)
        if mode and self.cfg.bn_mode == "frozen":
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 ``(B, 3, H, W)`` (0-255) or float in [0, 1] -> normalised float32."""
        xf = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        return (xf - self.mean) / self.std  # type: ignore[operator]

    def heads_out(self, xn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover - abstract
        """Localizer scores and class maps."""
        raise NotImplementedError

    def mplus(self, scores: torch.Tensor, maps: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """Per-image normalised M+ ``(B, 1, h, w)``, upsampled bilinearly to ``size`` when given."""
        m = weighted_map(scores, maps)
        if size is not None:
            m = F.interpolate(m, size=size, mode="bilinear", align_corners=False)
        return normalize_per_image(m)

    def localize(
        self, x: torch.Tensor, size: tuple[int, int] | None = None, autocast: bool = False
    ) -> dict[str, torch.Tensor]:
        """Class probabilities and heatmaps for a batch (inference).

        Parameters
        ----------
        x
            ``torch.uint8 (B, 3, H, W)`` (or float in [0, 1]) on the model's device.
        size
            Output size ``(h, w)`` of the maps; default the input size.
        autocast
            Run the network under ``torch.autocast`` (CUDA: float16; CPU: bfloat16).

        Returns
        -------
        dict
            ``"probs"`` (B, C) float32; ``"mplus"`` (B, h, w) float32 in [0, 1] (per-image normalised M+);
            ``"class_maps"`` (B, C, h, w) float32 (upsampled localizer class maps).
        """
        if size is None:
            size = (int(x.shape[-2]), int(x.shape[-1]))
        xn = self.normalize(x)
        dev = xn.device.type
        ctx = (
            torch.autocast(dev, dtype=torch.float16 if dev == "cuda" else torch.bfloat16)
            if autocast
            else contextlib.nullcontext()
        )
        with ctx:
            scores, maps, probs = self._infer(xn)
        maps = maps.float()
        mp = self.mplus(scores.float(), maps, size)[:, 0]
        cm = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
        return {"probs": probs.float(), "mplus": mp.float(), "class_maps": cm}

    def _infer(self, xn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        scores, maps = self.heads_out(xn)
        return scores, maps, scores.float().softmax(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits of the method's classifier for a normalised batch."""
        return self._infer(x)[2].log()


class BaselineNet(_Base):
    """WILDCAT (``method="wildcat"``) or CAM (``method="cam"``) on the same backbone.

    Parameters
    ----------
    cfg
        Model configuration.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        if cfg.method == "cam":
            self.head: nn.Module = CamHead(self.channels, cfg.num_classes)
        else:
            self.head = WildcatHead(
                self.channels, cfg.num_classes, cfg.modalities, cfg.kmax, cfg.kmin, cfg.alpha, cfg.head_dropout
            )

    def heads_out(self, xn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores and class maps of the single head."""
        out: tuple[torch.Tensor, torch.Tensor] = self.head(self.backbone(xn))
        return out

    def training_losses(
        self, xn: torch.Tensor, y: torch.Tensor, *, epoch: int = 0, barrier_t: float = 5.0, sigma: float | None = None
    ) -> dict[str, torch.Tensor]:
        """Cross-entropy of the head; returns ``{"total", "loc"}``."""
        scores, _ = self.heads_out(xn)
        loss = ce_loss(scores, y)
        return {"total": loss, "loc": loss.detach(), "_scores": scores.detach()}


class MinMaxNet(_Base):
    """Min-max entropy localizer/classifier (method.md).

    Parameters
    ----------
    cfg
        Model configuration (``method="minmax"``).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        c = cfg.num_classes
        self.loc_head = WildcatHead(self.channels, c, cfg.modalities, cfg.kmax, cfg.kmin, cfg.alpha, cfg.head_dropout)
        self.cls_head = WildcatHead(self.channels, c, cfg.modalities, cfg.kmax, cfg.kmin, cfg.alpha, cfg.head_dropout)
        self.cls_backbone: nn.Module | None = None
        if cfg.classifier_backbone == "own":
            self.cls_backbone = copy.deepcopy(self.backbone)
            # 1 once the classifier's backbone was set to the warmed-up localizer's (saved, so --resume keeps it)
            self.register_buffer("cls_synced", torch.zeros((), dtype=torch.uint8))
        self._synced_seen = False  # host-side cache of cls_synced: no device sync per training step once set
        #: Pseudo-binary sigma of the classifier's X+ at inference and validation (None: ``cfg.sigma``).  Set by
        #: training when ``TrainConfig.sigma_end`` moves sigma over the epochs, so a model classifies with the
        #: mask it was last trained with; checkpoints save it (``meta["infer_sigma"]``).
        self.infer_sigma: float | None = None

    @property
    def classifier_features(self) -> nn.Module:
        """The backbone the classifier runs on X+ / X- (the shared one unless ``classifier_backbone="own"``)."""
        return self.backbone if self.cls_backbone is None else self.cls_backbone

    def _sync_classifier_backbone(self) -> None:
        """Copy the localizer's backbone into the classifier's own, once, when the min-max terms start."""
        if self.cls_backbone is None or self._synced_seen:
            return
        self._synced_seen = True
        if bool(self.cls_synced):  # synced before this object saw it (a resumed run): the buffer is read once
            return
        with torch.no_grad():
            src = self.backbone.state_dict()
            for k, v in self.cls_backbone.state_dict().items():
                v.copy_(src[k])
            self.cls_synced.fill_(1)  # type: ignore[operator]

    def heads_out(self, xn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Localizer scores ``(B, C)`` and class maps ``(B, C, h, w)`` on X."""
        out: tuple[torch.Tensor, torch.Tensor] = self.loc_head(self.backbone(xn))
        return out

    def soft_mask(
        self, scores: torch.Tensor, maps: torch.Tensor, size: tuple[int, int], sigma: float | None = None
    ) -> torch.Tensor:
        """Pseudo-binary mask ``(B, 1, H, W)`` from the localizer output, at input size ``size``."""
        s = self.cfg.sigma if sigma is None else sigma
        return pseudo_binary(self.mplus(scores, maps, size), self.cfg.w, s)

    def classify(self, xn_masked: torch.Tensor, fixed_params: bool = False) -> torch.Tensor:
        """Classifier logits on a masked normalised image (resized by ``cls_scale``).

        Parameters
        ----------
        xn_masked
            X+ or X- (normalised pixel space).
        fixed_params
            Use detached copies of the backbone and classifier parameters: the loss then reaches only
            what produced the input (the mask, hence the localizer), not the classifier.
        """
        if self.cfg.cls_scale != 1:
            xn_masked = F.interpolate(
                xn_masked, scale_factor=self.cfg.cls_scale, mode="bilinear", align_corners=False, antialias=False
            )
        features = self.classifier_features
        with _bn_eval(features, self.training and self.cfg.bn_mode in ("masked_running", "frozen")):
            if fixed_params:
                from torch.func import functional_call

                params = {k: v.detach() for k, v in features.named_parameters()}
                f = functional_call(features, params, (xn_masked,))
                w, b = self.cls_head.conv.weight.detach(), self.cls_head.conv.bias
                raw = F.conv2d(f, w, None if b is None else b.detach())
                n, _, h, wd = raw.shape
                maps = raw.view(n, self.cls_head.num_classes, self.cls_head.modalities, h, wd).mean(dim=2)
                hd = self.cls_head
                return wildcat_pool(maps, hd.kmax, hd.kmin, hd.alpha, hd.dropout, self.training)
            f = features(xn_masked)
        scores, _ = self.cls_head(f)
        return scores

    def _infer(self, xn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        scores, maps = self.heads_out(xn)
        m = self.soft_mask(scores, maps, (xn.shape[-2], xn.shape[-1]), self.infer_sigma)
        probs = self.classify(xn * m.to(xn.dtype)).float().softmax(dim=1)
        return scores, maps, probs

    def training_losses(
        self, xn: torch.Tensor, y: torch.Tensor, *, epoch: int = 0, barrier_t: float = 5.0, sigma: float | None = None
    ) -> dict[str, torch.Tensor]:
        """All loss terms for one minibatch.

        Parameters
        ----------
        xn
            Normalised images ``(B, 3, H, W)``.
        y
            Labels ``(B,)``.
        epoch
            Current epoch (erasing starts at ``cfg.erase_start``).
        barrier_t
            Log-barrier parameter of the size prior.
        sigma
            Pseudo-binary sigma for this epoch (default ``cfg.sigma``).

        Returns
        -------
        dict
            ``"total"`` (with gradient) and the detached terms ``"loc"``, ``"pos"``, ``"neg"``, ``"size"``,
            ``"area"`` (mean soft-mask area), ``"passes"``.
        """
        cfg = self.cfg
        if not isinstance(cfg.minmax_start, int):
            msg = "ModelConfig.minmax_start='half' needs the run's epochs: see config.resolve_minmax_start"
            raise ConfigError(msg)
        if epoch < cfg.minmax_start:  # warm-up: the localizer learns class evidence alone (WILDCAT)
            scores, _ = self.heads_out(xn)
            loc = ce_loss(scores, y)
            return {"total": loc, "loc": loc.detach(), "_scores": scores.detach(), "_loc": loc}
        if self.training:
            self._sync_classifier_backbone()
        size = (xn.shape[-2], xn.shape[-1])
        detach = cfg.detach_mask

        def step(x_cur: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            scores, maps = self.heads_out(x_cur)
            m = self.soft_mask(scores, maps, size, sigma)
            return scores, (m.detach() if detach else m)

        passes = cfg.erase_passes if (cfg.erase_passes > 1 and epoch >= cfg.erase_start) else 1
        if passes > 1:
            er = recursive_erase(xn, y, step, passes, cfg.erase_sigma)
            a, loc, npass = er.accumulated, torch.stack(er.loc_losses).sum(), er.passes
            first = er.first_scores
        else:
            first, a = step(xn)
            loc, npass = ce_loss(first, y), 1
        pos = ce_loss(self.classify(xn * a), y)
        neg = uniform_ce_loss(self.classify(xn * (1 - a), fixed_params=cfg.neg_updates == "localizer"))
        total = loc + pos + cfg.neg_weight * neg
        out = {"loc": loc.detach(), "pos": pos.detach(), "neg": neg.detach()}
        if cfg.size_prior != "none" and not detach:
            sz = size_loss(a, barrier_t, cfg.size_prior, cfg.area_min, cfg.area_max)
            total = total + sz
            out["size"] = sz.detach()
        out["total"] = total
        out["area"] = a.detach().float().mean()
        out["passes"] = torch.tensor(float(npass))
        assert first is not None
        out["_scores"] = first.detach()
        out["_loc"], out["_pos"], out["_neg"] = loc, pos, neg
        return out


def build_model(cfg: ModelConfig) -> nn.Module:
    """Build the model a configuration names.

    Parameters
    ----------
    cfg
        ``cfg.method`` selects ``MinMaxNet`` (``"minmax"``) or ``BaselineNet`` (``"wildcat"``, ``"cam"``).

    Returns
    -------
    nn.Module
        A model with ``localize(x_uint8, size)``, ``normalize``, ``training_losses``.
    """
    if cfg.method == "minmax":
        return MinMaxNet(cfg)
    return BaselineNet(cfg)


def model_summary(model: nn.Module) -> dict[str, Any]:
    """Parameter counts of a model (for logs)."""
    n = sum(p.numel() for p in model.parameters())
    return {"parameters": n}
