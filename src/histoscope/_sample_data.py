"""napari sample data: real IHC tissue from scikit-image."""

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
