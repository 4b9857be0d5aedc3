"""Procedural H&E and IHC slides whose ground truth is known for every task.

``generate`` draws one slide (a pyramidal JPEG-tiled TIFF) and writes its truth
next to it: cells as CSV and QuPath GeoJSON, tumour mask, tissue map, slide
label, and for IHC an HPA-style row with the five iSight labels. Rendering is
tile-local (hashed cells on lattices, periodic textures), so slides of any
size are drawn tile by tile in bounded memory. ``write_dataset`` (the
``histoscope synth`` command) writes many slides with train/val/test splits;
``sample_slide`` returns a slide generated once into a cache folder.
See ``docs/synthetic.md``.
"""

from __future__ import annotations

from histoscope.synthetic._cache import sample_slide
from histoscope.synthetic._constants import (
    CELL_CLASSES,
    CLASS_COLORS,
    CONTEXT_ONLY_PAIRS,
    IMMUNE_MIX,
    INTENSITY_CLASSES,
    LOCATION_CLASSES,
    MALIGNANCY_CLASSES,
    MORPHOLOGY_ONLY_PAIRS,
    ORGANS,
    QUANTITY_CLASSES,
    REFERENCE_STAINS,
    TISSUE_TYPES,
)
from histoscope.synthetic._dataset import write_dataset
from histoscope.synthetic._generate import SyntheticSlide, generate

__all__ = [
    "CELL_CLASSES",
    "CLASS_COLORS",
    "CONTEXT_ONLY_PAIRS",
    "IMMUNE_MIX",
    "INTENSITY_CLASSES",
    "LOCATION_CLASSES",
    "MALIGNANCY_CLASSES",
    "MORPHOLOGY_ONLY_PAIRS",
    "ORGANS",
    "QUANTITY_CLASSES",
    "REFERENCE_STAINS",
    "TISSUE_TYPES",
    "SyntheticSlide",
    "generate",
    "sample_slide",
    "write_dataset",
]
