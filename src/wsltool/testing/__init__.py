"""Test and demo helpers that write real slide files (tifffile) with known content.

Used by the test suite, the benchmarks under ``tools/bench`` and ``make demo``.  Nothing here is
mocked: the files are real pyramidal TIFF/SVS that OpenSlide and tifffile read.
"""

from wsltool.testing.slides import (
    SyntheticContent,
    downsample,
    he_tissue,
    write_generic_tiff,
    write_ome_tiff,
    write_svs,
)

__all__ = [
    "SyntheticContent",
    "downsample",
    "he_tissue",
    "write_generic_tiff",
    "write_ome_tiff",
    "write_svs",
]
