"""napari sample data: synthetic H&E and IHC slides (generated once, then cached) and
scikit-image's real IHC image."""

from __future__ import annotations

import sys

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


#: The synthetic samples: kind -> what the layer is called.
SYNTHETIC = {"he": "H&E", "ihc": "IHC"}


def synthetic_layers(kind: str, progress=None) -> list[LayerDataTuple]:
    """A cached synthetic slide (generated on first use) as layer data, ready to add.

    Everything slow happens here (generating, opening the slide, building its
    pyramid layer), so a worker thread can call it and the GUI thread only adds
    the layer. ``progress(done, total)`` is called over tiles while generating;
    raising from it (e.g. :class:`~histoscope.progress.Cancelled`) stops the
    generation and leaves no half-written slide in the cache.
    """
    from histoscope.layers import slide_layer
    from histoscope.slide import open_slide
    from histoscope.synthetic import sample_slide

    sample = sample_slide(kind, progress=progress)
    return [slide_layer(open_slide(sample.slide), name=f"synthetic {SYNTHETIC[kind]}")]


def _synthetic(kind: str) -> list[LayerDataTuple]:
    """For napari's File > Open Sample menu, which calls it on the GUI thread.

    In a napari window the slide is made in a thread while the window keeps
    running, napari's activity bar counting the tiles with a Cancel button
    (:mod:`histoscope._widgets._sample_wait`); headless (no Qt application)
    it is made here, with napari's progress bar where one can show.
    """
    if "qtpy" in sys.modules:  # a napari window imports Qt first; headless use never does
        from histoscope._widgets._sample_wait import gui_running, layers_in_thread

        if gui_running():
            return layers_in_thread(kind, SYNTHETIC[kind])
    from napari.utils import progress

    bar = None

    def on_tile(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = progress(total=total, desc=f"Generating the synthetic {SYNTHETIC[kind]} slide")
        bar.update(done - bar.n)

    try:
        return synthetic_layers(kind, progress=on_tile)
    finally:
        if bar is not None:
            bar.close()


def synthetic_he() -> list[LayerDataTuple]:
    """A synthetic H&E slide with known ground truth (see docs/synthetic.md)."""
    return _synthetic("he")


def synthetic_ihc() -> list[LayerDataTuple]:
    """A synthetic IHC (haematoxylin + DAB) slide with known staining labels."""
    return _synthetic("ihc")
