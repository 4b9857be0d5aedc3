"""Open whole-slide images as lazy pyramids with physical units.

``open_slide`` picks a backend by content: pyramidal TIFF (generic, OME, SVS)
through tifffile, every other vendor format through OpenSlide, OME-Zarr
directories through zarr, and plain images through Pillow.
"""

from __future__ import annotations

from histoscope.slide._open import sniff_format
from histoscope.slide._slide import Slide, TileErrorPolicy, open_slide
from histoscope.slide.writer import write_pyramidal_tiff

__all__ = ["Slide", "TileErrorPolicy", "open_slide", "sniff_format", "write_pyramidal_tiff"]
