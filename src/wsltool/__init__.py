"""wsltool: weakly supervised pixel-level localization of malignancy in whole-slide images.

The core (``wsltool.slide``, ``wsltool.tissue``, ``wsltool.tiling``, ``wsltool.store``) imports neither
torch nor Qt; the model, training and inference layers import torch; only ``wsltool.napari_plugin``
imports Qt/napari.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
