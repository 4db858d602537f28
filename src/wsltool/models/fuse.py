"""Inference-only speed-up: fold BatchNorm layers into the convolutions that feed them.

In eval mode a BatchNorm after a convolution is an affine map per channel, so it can be folded into the
convolution's weights and bias (``torch.nn.utils.fusion.fuse_conv_bn_eval``) and replaced by an identity: the
outputs are the same up to float rounding and the network does one pass less over every feature map.
Never used for training (running statistics would no longer update).
"""

from __future__ import annotations

import itertools
import logging

from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

log = logging.getLogger(__name__)

# (convolution, BatchNorm) attribute pairs inside one module: torchvision ResNet blocks and stems, and
# wsltool's EfficientNet-Lite0 (stem/head and the three convolutions of an MBConv block)
_PAIRS = (
    ("conv1", "bn1"),
    ("conv2", "bn2"),
    ("conv3", "bn3"),
    ("_conv_stem", "_bn0"),
    ("_conv_head", "_bn1"),
    ("_expand_conv", "_bn0"),
    ("_depthwise_conv", "_bn1"),
    ("_project_conv", "_bn2"),
)


def _fold(conv: object, bn: object) -> nn.Conv2d | None:
    """The fused convolution when ``conv`` -> ``bn`` can be folded, else None."""
    if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)):
        return None
    if not bn.track_running_stats or bn.running_mean is None or conv.out_channels != bn.num_features:
        return None
    return fuse_conv_bn_eval(conv, bn)


def fuse_batchnorm(model: nn.Module) -> int:
    """Fold every BatchNorm2d that directly follows a Conv2d into it, in place (eval mode only).

    Pairs are found by attribute name (``conv1``/``bn1``... in ResNets, the EfficientNet-Lite0 names) and as
    consecutive ``Conv2d, BatchNorm2d`` children of ``nn.Sequential`` containers (ResNet downsample paths,
    the tiny test backbone).  Anything else is left as it is.

    Parameters
    ----------
    model
        A model in eval mode.

    Returns
    -------
    int
        The number of BatchNorm layers folded.

    Raises
    ------
    ValueError
        When the model is in training mode.
    """
    if model.training:
        msg = "fuse_batchnorm needs a model in eval mode (it is an inference-only transform)"
        raise ValueError(msg)
    n = 0
    for module in list(model.modules()):
        for conv_name, bn_name in _PAIRS:
            fused = _fold(getattr(module, conv_name, None), getattr(module, bn_name, None))
            if fused is not None:
                setattr(module, conv_name, fused)
                setattr(module, bn_name, nn.Identity())
                n += 1
        if isinstance(module, nn.Sequential):
            names = list(module._modules)
            for a, b in itertools.pairwise(names):
                fused = _fold(module._modules[a], module._modules[b])
                if fused is not None:
                    module._modules[a] = fused
                    module._modules[b] = nn.Identity()
                    n += 1
    log.debug("folded %d BatchNorm layers into their convolutions", n)
    return n
