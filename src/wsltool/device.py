"""Which torch device a run uses: one rule for training, evaluation and inference.

Torch is imported inside the function, so importing this module stays light.
"""

from __future__ import annotations

from typing import Any

from wsltool.errors import ConfigError


def resolve_device(name: str) -> Any:
    """``"auto"`` -> CUDA when available else CPU; validates explicit requests.

    Raises
    ------
    ConfigError
        ``name`` is not a device torch knows, or names a CUDA or MPS device this machine does not have.
    """
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError) as exc:
        msg = f"device {name!r} is not a device (auto, cpu, cuda, cuda:N): {str(exc).splitlines()[0]}"
        raise ConfigError(msg) from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            msg = f"device {name!r} requested but CUDA is not available on this machine"
            raise ConfigError(msg)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            msg = f"device {name!r} requested but this machine has {torch.cuda.device_count()} CUDA device(s)"
            raise ConfigError(msg)
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            msg = f"device {name!r} requested but MPS (Apple silicon) is not available on this machine"
            raise ConfigError(msg)
    elif dev.type != "cpu":
        msg = f"device {name!r}: wsltool runs on cpu, cuda or mps"
        raise ConfigError(msg)
    return dev


__all__ = ["resolve_device"]
