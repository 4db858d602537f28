"""wsltool: weakly supervised pixel-level localization of malignancy in whole-slide images.

The core (``wsltool.slide``, ``wsltool.tissue``, ``wsltool.tiling``, ``wsltool.store``) imports neither
torch nor Qt; the model, training and inference layers import torch; only ``wsltool.napari_plugin``
imports Qt/napari.
"""

from __future__ import annotations

import os as _os

# OpenMP threads that spin-wait are catastrophic when the cores are shared (DataLoader reader processes
# beside the model's threads, Dask workers, other jobs): measured on 2 cores under load, a training
# step took 10-25 s with the default policy and 2-3 s with PASSIVE, and inference 2.6 s vs 0.16 s.
# libgomp reads this once, when torch loads, so it must be set before ``import torch``; an explicit
# user setting wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

__all__ = ["__version__"]
