"""Plain ``LayerDataTuple`` builders shared by the reader, widgets and tasks.

Nothing here imports napari: a layer is described as ``(data, kwargs, type)``
with ``scale``/``translate`` in µm so every overlay lines up with its slide.
"""

from __future__ import annotations

from typing import Any

from histoscope.slide import Slide

LayerDataTuple = tuple[Any, dict[str, Any], str]

#: Key under which a layer's metadata carries the slide summary.
SLIDE_KEY = "histoscope_slide"


def slide_scale(slide: Slide) -> tuple[tuple[float, float], tuple[str, str]]:
    """Layer ``scale`` and ``units`` for level 0: µm when known, else pixels."""
    if slide.mpp:
        return (slide.mpp, slide.mpp), ("um", "um")
    return (1.0, 1.0), ("pixel", "pixel")


def slide_layer(slide: Slide, name: str | None = None) -> LayerDataTuple:
    """The slide as one RGB image layer (multiscale when it has several levels)."""
    scale, units = slide_scale(slide)
    levels = slide.levels
    multiscale = len(levels) > 1
    kwargs: dict[str, Any] = {
        "name": name or slide.path.name,
        "rgb": True,
        "multiscale": multiscale,
        "scale": scale,
        "units": units,
        "contrast_limits": (0, 255),
        "metadata": {SLIDE_KEY: slide.metadata, "slide": slide},
    }
    return (levels if multiscale else levels[0], kwargs, "image")


def layer_slide(data: Any, metadata: dict[str, Any], scale, name: str) -> Slide:
    """The :class:`Slide` behind an image layer: its own, or one wrapping plain RGB data.

    Plain arrays (sample data, images from other readers) are placed at the
    layer's ``scale`` as µm/px.
    """
    slide = metadata.get("slide")
    if isinstance(slide, Slide):
        return slide
    from pathlib import Path

    import numpy as np

    from histoscope.slide._image import ImageBackend

    arr = np.asarray(data[0] if isinstance(data, list | tuple) else data)
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
        raise ValueError(f"layer {name!r} is not an RGB image (shape {arr.shape})")
    return Slide(ImageBackend(Path(name), array=arr), mpp=float(scale[-1]))
