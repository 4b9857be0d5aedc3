"""``open_slide``: every format path and every bad input."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import histoscope as hs
from histoscope.slide import sniff_format
from tests.slide.conftest import JPEG_TOL, MPP, TILE, half


# ------------------------------------------------------------------- formats
@dataclass(frozen=True)
class FormatCase:
    id: str
    fixture: str
    backend: str
    vendor: str
    mpp: float | None
    n_levels: int
    tol: float = JPEG_TOL
    plain: bool = False  # fixture holds `small_image`, not `image0`


FORMATS = [
    FormatCase("pyramidal-jpeg-tiff", "tiled_tiff", "tifffile", "generic-tiff", MPP, 4),
    FormatCase("ome-tiff-subifds", "ome_tiff", "tifffile", "ome-tiff", MPP, 3),
    FormatCase("aperio-svs", "svs", "tifffile", "aperio", MPP, 2),
    FormatCase("ome-zarr-yxc-um", "ome_zarr", "ome-zarr", "ome-zarr", MPP, 3, tol=0),
    FormatCase("ome-zarr-cyx-nm", "ome_zarr_cyx", "ome-zarr", "ome-zarr", MPP, 3, tol=0),
    FormatCase("png", "png", "image", "image", None, 1, tol=0, plain=True),
    FormatCase("jpeg", "jpeg", "image", "image", None, 1, plain=True),
    FormatCase(
        "untiled-tiff", "plain_tiff", "tifffile", "generic-tiff", None, 1, tol=0, plain=True
    ),
]


@pytest.mark.parametrize("case", FORMATS, ids=lambda c: c.id)
def test_format_opens_with_geometry_units_and_pixels(case, request, image0, small_image):
    path = request.getfixturevalue(case.fixture)
    truth = small_image if case.plain else image0
    with hs.open_slide(path) as slide:
        assert slide.backend == case.backend
        assert slide.vendor == case.vendor
        assert slide.mpp == pytest.approx(case.mpp) if case.mpp else slide.mpp is None
        assert len(slide.levels) == case.n_levels
        assert slide.levels[0].shape == (*truth.shape[:2], 3)
        assert all(lv.dtype == np.uint8 and lv.shape[2] == 3 for lv in slide.levels)
        shapes = [lv.shape[0] for lv in slide.levels]
        assert shapes == sorted(shapes, reverse=True) and len(set(shapes)) == len(shapes)
        got = slide.levels[0].compute()
        assert np.abs(got.astype(np.int16) - truth).mean() <= case.tol + 1e-9
        if case.n_levels > 1:
            lvl = len(slide.levels) - 1
            ref = half(truth, int(round(np.log2(slide.level_downsamples[lvl]))))
            got = slide.levels[lvl].compute()
            assert np.abs(got.astype(np.int16) - ref[: got.shape[0], : got.shape[1]]).mean() < 4


@pytest.mark.parametrize(
    "case", [c for c in FORMATS if c.n_levels > 1 and c.backend == "tifffile"], ids=lambda c: c.id
)
def test_tiled_levels_are_chunked_at_native_tile(case, request):
    slide = hs.open_slide(request.getfixturevalue(case.fixture))
    assert slide.levels[0].chunksize == (TILE, TILE, 3)


@pytest.mark.parametrize("case", [c for c in FORMATS if c.plain], ids=lambda c: c.id)
def test_user_mpp_sets_units_of_plain_images(case, request):
    slide = hs.open_slide(request.getfixturevalue(case.fixture), mpp=0.25)
    assert slide.mpp == 0.25
    assert slide.magnification == pytest.approx(40)
    assert slide.read_region(0, 0, 50, 40, mpp=0.5).shape == (40, 50, 3)


def test_user_mpp_overrides_the_file(tiled_tiff):
    assert hs.open_slide(tiled_tiff, mpp=0.123).mpp == 0.123


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf")])
def test_user_mpp_must_be_a_positive_number(tiled_tiff, bad):
    with pytest.raises(ValueError, match="mpp"):
        hs.open_slide(tiled_tiff, mpp=bad)


def test_unknown_tile_error_policy_is_rejected(tiled_tiff):
    with pytest.raises(ValueError, match="on_tile_error"):
        hs.open_slide(tiled_tiff, on_tile_error="ignore")


def test_open_accepts_str_and_pathlike(tiled_tiff):
    assert hs.open_slide(str(tiled_tiff)).shape == hs.open_slide(tiled_tiff).shape


# ---------------------------------------------------------------- bad inputs
@dataclass(frozen=True)
class BadCase:
    id: str
    name: str
    make: Callable[[Path, Path], None]  # (target, a good slide to derive from)
    reason: str  # lower-case words the message must hold


def _write(data: bytes) -> Callable[[Path, Path], None]:
    return lambda target, good: target.write_bytes(data)


def _truncate(frac: float) -> Callable[[Path, Path], None]:
    def make(target: Path, good: Path) -> None:
        data = good.read_bytes()
        target.write_bytes(data[: int(len(data) * frac)])

    return make


def _random(n: int) -> Callable[[Path, Path], None]:
    return _write(np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8).tobytes())


TIFF_HEAD_ONLY = b"II*\x00" + (8).to_bytes(4, "little") + b"\x00" * 8

BAD = [
    BadCase("missing", "nothing.svs", lambda t, g: None, "no such file"),
    BadCase("zero-bytes", "empty.svs", _write(b""), "empty"),
    BadCase("random-svs", "random.svs", _random(4096), "not a tiff"),
    BadCase("random-ndpi", "random.ndpi", _random(4096), "openslide"),
    BadCase("text-as-tif", "notes.tif", _write(b"patient notes\n" * 50), "not a tiff"),
    BadCase("tiff-header-only", "stub.tif", _write(TIFF_HEAD_ONLY), "tiff"),
    BadCase("truncated-half", "cut.tif", _truncate(0.5), "truncated"),
    BadCase("truncated-tail", "cut.svs", _truncate(0.995), "truncated"),
    BadCase("truncated-header", "cut.tiff", _truncate(0.0001), "truncated"),
    BadCase("czi", "scan.czi", _random(256), "unsupported format"),
    BadCase("txt", "scan.txt", _write(b"hello"), "unsupported format"),
    BadCase("no-extension-text", "scan", _write(b"hello"), "unsupported format"),
    BadCase("random-png", "fake.png", _random(512), "not a readable image"),
    BadCase("zarr-without-multiscales", "x.zarr", lambda t, g: _plain_zarr(t), "multiscales"),
    BadCase("zarr-bad-json", "y.zarr", lambda t, g: _bad_json_zarr(t), "json"),
]


def _plain_zarr(target: Path) -> None:
    target.mkdir()
    (target / ".zattrs").write_text("{}")
    (target / ".zgroup").write_text('{"zarr_format": 2}')


def _bad_json_zarr(target: Path) -> None:
    target.mkdir()
    (target / ".zattrs").write_text("{not json")


@pytest.mark.parametrize("case", BAD, ids=lambda c: c.id)
def test_bad_input_raises_slide_error_with_path_and_reason(case, tmp_path, tiled_tiff):
    target = tmp_path / case.name
    case.make(target, tiled_tiff)
    with pytest.raises(hs.SlideError) as info:
        slide = hs.open_slide(target)
        slide.levels[0].compute()  # when opening succeeds, the first read must fail
    msg = str(info.value)
    assert str(target) in msg
    assert case.reason in msg.replace(str(target), "").lower()


def test_directory_that_is_not_a_slide(tmp_path):
    with pytest.raises(hs.SlideError, match="unsupported format"):
        hs.open_slide(tmp_path)


# ----------------------------------------------------------------- sniffing
@pytest.mark.parametrize(
    ("name", "expected"),
    [("a.svs", "tiff"), ("a.ndpi", "openslide"), ("a.mrxs", "openslide"), ("a.png", "image"),
     ("a.JPG", "image"), ("a.ome.zarr", "ome-zarr"), ("a.czi", None), ("a.txt", None)],
)  # fmt: skip
def test_sniff_format_by_name(name, expected, tmp_path):
    assert sniff_format(tmp_path / name) == expected


def test_sniff_format_reads_tiff_magic_without_extension(tmp_path, tiled_tiff):
    target = tmp_path / "slide_without_ext"
    target.write_bytes(tiled_tiff.read_bytes())
    assert sniff_format(target) == "tiff"
    assert hs.open_slide(target).mpp == pytest.approx(MPP)


def test_sniff_format_never_raises():
    assert sniff_format("\x00bad") is None
