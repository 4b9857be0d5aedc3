"""Space Ranger binned outputs: every bin placed in level-0 pixels, bad data named."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from tests.expression.conftest import write_spaceranger

from histoscope.expression import ExpressionDataError, bin_folders, read_binned


def test_bins_are_joined_by_barcode_and_placed_on_the_image(binned):
    root, counts, rows, cols = binned
    b = read_binned(root, image_shape=(64, 64), image_mpp=0.5)
    assert b.genes == ("G0", "G1", "G2") and b.bin_um == 2 and b.bin_px == 4
    np.testing.assert_array_equal(b.counts.toarray(), counts)  # positions were shuffled
    np.testing.assert_array_equal(b.array_row, rows)
    r, c = b.grid_index()
    np.testing.assert_array_equal(r, rows)
    np.testing.assert_array_equal(c, cols)
    # bin (2, 3) covers level-0 px [8, 12) x [12, 16): centre (14, 10); in µm (7, 5)
    assert (b.x_px[0], b.y_px[0]) == (14.0, 10.0)
    np.testing.assert_allclose(b.spatial_um()[0], [7.0, 5.0])


def test_eight_micron_bins_and_the_folders_found(binned):
    root, counts, rows, cols = binned
    assert sorted(bin_folders(root)) == [2, 8]
    b8 = read_binned(root / "binned_outputs", 8, image_shape=(64, 64), image_mpp=0.5)
    assert b8.bin_px == 16 and b8.counts.sum() == counts.sum()
    assert read_binned(root / "binned_outputs" / "square_008um").bin_um == 8
    with pytest.raises(ExpressionDataError, match="no 16 µm bins; found 2 µm, 8 µm"):
        read_binned(root, 16)


def test_positions_as_csv(tmp_path):
    counts = np.array([[1, 0], [0, 2]])
    write_spaceranger(tmp_path, counts, np.array([0, 0]), np.array([0, 1]), positions="csv")
    b = read_binned(tmp_path)
    np.testing.assert_array_equal(b.counts.toarray(), counts)
    np.testing.assert_array_equal(b.x_px, [2.0, 6.0])


def test_a_matrix_barcode_missing_from_the_positions_is_refused(binned):
    import pandas as pd

    root, *_ = binned
    pq = root / "binned_outputs/square_002um/spatial/tissue_positions.parquet"
    table = pd.read_parquet(pq)
    table[table.in_tissue == 1].iloc[1:].to_parquet(pq)
    with pytest.raises(ExpressionDataError, match="matrix and positions do not match: 1 of 30"):
        read_binned(root)


@pytest.mark.parametrize(
    ("scalefactors", "match"),
    [
        ({"bin_size_um": 2.0}, "missing scale factor 'microns_per_pixel'"),
        ({"microns_per_pixel": 0.5}, "missing scale factor 'bin_size_um'"),
        ({"bin_size_um": 2.0, "spot_diameter_fullres": 4.0}, None),  # µm/px derived: 2 / 4
    ],
)
def test_scale_factors(tmp_path, scalefactors, match):
    write_spaceranger(tmp_path, np.ones((1, 1)), np.array([0]), np.array([0]),
                      scalefactors=scalefactors)  # fmt: skip
    if match is None:
        assert read_binned(tmp_path).mpp == 0.5
    else:
        with pytest.raises(ExpressionDataError, match=match):
            read_binned(tmp_path)


def test_an_image_that_does_not_match_the_positions_is_refused(binned):
    root, *_ = binned
    with pytest.raises(ExpressionDataError, match=r"image is 0.25 µm/px .* pixels of 0.5 µm"):
        read_binned(root, image_shape=(64, 64), image_mpp=0.25)
    with pytest.raises(ExpressionDataError, match=r"30 bins lie outside the image \(8 x 8 px\)"):
        read_binned(root, image_shape=(8, 8), image_mpp=0.5)


def test_missing_and_broken_files_are_named(binned, tmp_path_factory):
    root, *_ = binned
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(ExpressionDataError, match="no square_002um"):
        read_binned(empty)
    sq = root / "binned_outputs/square_002um"
    (sq / "spatial/scalefactors_json.json").write_text("{not json")
    with pytest.raises(ExpressionDataError, match="scalefactors_json.json: not valid JSON"):
        read_binned(root)
    (sq / "filtered_feature_bc_matrix.h5").write_bytes(b"garbage")
    with pytest.raises(ExpressionDataError, match="not a 10x HDF5"):
        read_binned(root)
    shutil.rmtree(sq / "spatial")
    (sq / "spatial").mkdir()
    with pytest.raises(ExpressionDataError, match="matrix"):
        read_binned(root)


def test_synthetic_slides_place_their_bins_on_the_tissue(tmp_path):
    from PIL import Image

    from histoscope.slide import open_slide
    from histoscope.synthetic import generate

    s = generate(tmp_path, "he", (384, 384), seed=3, mpp=1.0, extras=True)
    slide = open_slide(s.slide)
    b = read_binned(tmp_path / f"{s.slide.stem}_visium", image_shape=slide.shape,
                    image_mpp=slide.mpp)  # fmt: skip
    assert b.bin_px == 2 and len(b.genes) >= 50 and b.n_bins > 1000
    types = np.asarray(Image.open(s.tissue_map))  # tissue type per map cell, 0 = background
    f = types.shape[0] / slide.shape[0]
    on = types[(b.y_px * f).astype(int), (b.x_px * f).astype(int)] > 0
    assert on.mean() > 0.93  # the bins sit on the tissue of the slide they were drawn for
    with pytest.raises(ExpressionDataError, match="image is 0.5 µm/px"):
        read_binned(tmp_path / f"{s.slide.stem}_visium", image_mpp=0.5)
