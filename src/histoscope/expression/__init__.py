"""Gene expression at 2 µm from H&E (SYSTEMS.md section 3).

Space Ranger binned outputs placed on the slide (:mod:`.spaceranger`), training
patches (:mod:`.dataset`), losses (:mod:`.losses`), metrics (:mod:`.metrics`)
and the whole-slide OME-Zarr stack with per-cell expression (:mod:`.stack`).
Nothing here imports torch at import time except :mod:`.losses`.
"""

from __future__ import annotations

from histoscope.expression.spaceranger import (
    BinnedCounts,
    ExpressionDataError,
    bin_folders,
    read_binned,
)

__all__ = ["BinnedCounts", "ExpressionDataError", "bin_folders", "read_binned"]
