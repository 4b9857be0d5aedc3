"""napari sample data: synthetic H&E and IHC slides (generated once, then cached) and
scikit-image's real IHC image."""

from __future__ import annotations

from histoscope.layers import LayerDataTuple

#: µm/px of scikit-image's IHC sample is not published; 0.5 µm/px (a 20x scan)
#: matches its nuclear size (~12-16 px across).
SKIMAGE_IHC_MPP = 0.5


def skimage_ihc() -> list[LayerDataTuple]:
    """scikit-image's immunohistochemistry image (DAB + haematoxylin)."""
    from skimage import data

    img = data.immunohistochemistry()
    meta = {"source": "skimage.data.immunohistochemistry", "mpp": SKIMAGE_IHC_MPP}
    kwargs = {
        "name": "IHC (scikit-image)",
        "rgb": True,
        "scale": (SKIMAGE_IHC_MPP, SKIMAGE_IHC_MPP),
        "units": ("um", "um"),
        "metadata": meta,
    }
    return [(img, kwargs, "image")]


def _synthetic(kind: str, label: str) -> list[LayerDataTuple]:
    """A cached synthetic slide as a layer; generating it shows napari's progress bar."""
    from napari.utils import progress

    from histoscope.layers import slide_layer
    from histoscope.slide import open_slide
    from histoscope.synthetic import sample_slide

    bar = None

    def on_tile(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = progress(total=total, desc=f"Generating the synthetic {label} slide")
        bar.update(done - bar.n)

    try:
        sample = sample_slide(kind, progress=on_tile)
    finally:
        if bar is not None:
            bar.close()
    return [slide_layer(open_slide(sample.slide), name=f"synthetic {label}")]


def synthetic_he() -> list[LayerDataTuple]:
    """A synthetic H&E slide with known ground truth (see docs/synthetic.md)."""
    return _synthetic("he", "H&E")


def synthetic_ihc() -> list[LayerDataTuple]:
    """A synthetic IHC (haematoxylin + DAB) slide with known staining labels."""
    return _synthetic("ihc", "IHC")
