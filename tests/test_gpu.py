"""GPU path (skipped without CUDA): mixed precision + channels_last inference agrees with the CPU result."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from wsltool.config import InferConfig
from wsltool.infer.run import infer_slide
from wsltool.store import HeatmapStore
from wsltool.testing import he_tissue, write_svs
from wsltool.testing.models import make_checkpoint

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_cuda_amp_matches_cpu(tmp_path: Path) -> None:
    c = he_tissue(1024, 1024, seed=2, lesion_fraction=0.2)
    slide = write_svs(tmp_path / "s.svs", c.rgb, factors=(4,))
    ckpt = make_checkpoint(tmp_path / "m.pt", input_size=128)
    base = {"mpp": 1.0, "overlap": 32, "out_factor": 4, "workers": 2, "chunk": 64}
    cpu = infer_slide(slide, tmp_path / "cpu.zarr", str(ckpt), InferConfig(device="cpu", **base))
    gpu = infer_slide(slide, tmp_path / "gpu.zarr", str(ckpt), InferConfig(device="cuda", amp=True, **base))
    a, b = HeatmapStore.open(cpu.store).mplus(0), HeatmapStore.open(gpu.store).mplus(0)
    assert np.abs(a.astype(float) - b.astype(float)).mean() < 0.02  # bfloat16/float16 autocast vs float32
    assert np.allclose(cpu.probs, gpu.probs, atol=0.02)
