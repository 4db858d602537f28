"""Image-level training, labels CSV parsing, checkpoints.

The heavy parts (torch) are imported by the submodules that need them: ``wsltool.train.labels`` stays light.
"""

from __future__ import annotations
