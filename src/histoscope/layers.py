"""Plain ``LayerDataTuple`` builders shared by the reader, widgets and tasks.

Nothing here imports napari: a layer is described as ``(data, kwargs, type)``
with ``scale``/``translate`` in µm so every overlay lines up with its slide.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

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


#: µm per unit of the length units a layer (or our reader) may state.
_UM_PER_UNIT = {
    "micrometer": 1.0, "micron": 1.0, "um": 1.0, "µm": 1.0, "μm": 1.0,
    "nanometer": 1e-3, "nm": 1e-3, "millimeter": 1e3, "mm": 1e3,
    "centimeter": 1e4, "cm": 1e4, "meter": 1e6, "m": 1e6,
}  # fmt: skip


def _um_per_unit(unit: Any) -> float | None:
    """µm in one ``unit`` (a string or a pint unit), or ``None`` if it is not a length."""
    if unit is None:
        return None
    factor = _UM_PER_UNIT.get(str(unit).strip().lower())
    if factor is None and str(getattr(unit, "dimensionality", "")) == "[length]":
        try:  # any other pint length unit (napari 0.6+ layers carry pint units)
            factor = float((1 * unit).to("micrometer").magnitude)
        except Exception:
            factor = None
    return factor


def layer_mpp(scale, units=None, metadata: dict[str, Any] | None = None) -> float | None:
    """µm per pixel of an image layer, or ``None`` when nothing states it.

    In order: a ``scale`` in length units (``units`` in µm, nm, mm...); the
    ``"mpp"`` our own layers keep in ``metadata``; a ``scale`` other than 1
    given without length units (taken as µm/px, as napari users set it). The
    default scale of 1 in pixels says nothing, so it gives ``None``: never a
    guessed 1.0.
    """
    sx = float(scale[-1]) if scale is not None and len(scale) else 1.0
    unit = units[-1] if units is not None and len(units) else None
    factor = _um_per_unit(unit)
    if factor is not None and sx > 0:
        return sx * factor
    meta = metadata or {}
    for mpp in (meta.get("mpp"), (meta.get(SLIDE_KEY) or {}).get("mpp")):
        if isinstance(mpp, int | float) and mpp > 0 and np.isfinite(mpp):
            return float(mpp)
    if sx > 0 and np.isfinite(sx) and not np.isclose(sx, 1.0):
        return sx
    return None


def layer_slide(data: Any, metadata: dict[str, Any], scale, name: str, units=None) -> Slide:
    """The :class:`Slide` behind an image layer: its own, or one wrapping its data lazily.

    Plain data (sample data, images from other readers: numpy, dask or zarr
    arrays, or a multiscale list of them, largest first) is wrapped without
    reading a pixel; tiles are read only when a task reads them. µm/px comes
    from :func:`layer_mpp` (pass the layer's ``units``); when nothing states
    it the slide's ``mpp`` is ``None`` and tasks that need it refuse.

    Raises
    ------
    ValueError
        When the layer is not an RGB(A) image.
    """
    slide = metadata.get("slide")
    if isinstance(slide, Slide):
        return slide
    from pathlib import Path

    from histoscope.errors import SlideError
    from histoscope.slide._image import ArrayBackend

    # A multiscale layer's data is a list or napari's MultiScaleData (a Sequence).
    levels = list(data) if isinstance(data, Sequence) else [data]
    try:
        backend = ArrayBackend(Path(name), levels)
    except SlideError as exc:
        raise ValueError(f"layer {exc}") from exc
    return Slide(backend, mpp=layer_mpp(scale, units, metadata))
