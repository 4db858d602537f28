"""Models: backbone registry, WILDCAT head, the min-max entropy model and the WILDCAT / CAM baselines.

>>> from wsltool.config import ModelConfig
>>> from wsltool.models import build_model
>>> model = build_model(ModelConfig(pretrained="none")).eval()  # doctest: +SKIP
>>> out = model.localize(x_uint8, size=(h, w))  # doctest: +SKIP
"""

from __future__ import annotations

from wsltool.models.backbones import available_backbones, build_backbone
from wsltool.models.ensemble import Ensemble, TestTimeAugmentation, with_tta
from wsltool.models.minmax import BaselineNet, MinMaxNet, build_model, normalize_per_image, pseudo_binary
from wsltool.models.wildcat import CamHead, WildcatHead, wildcat_pool

__all__ = [
    "BaselineNet",
    "CamHead",
    "Ensemble",
    "MinMaxNet",
    "TestTimeAugmentation",
    "WildcatHead",
    "available_backbones",
    "build_backbone",
    "build_model",
    "normalize_per_image",
    "pseudo_binary",
    "wildcat_pool",
    "with_tta",
]
