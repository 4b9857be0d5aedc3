"""Small slides the widget tests open."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def edge_slide(tmp_path: Path) -> Path:
    """A 1200 px slide at 0.5 µm/px whose fifth 128 µm tile column runs off the slide edge."""
    from histoscope.slide import write_pyramidal_tiff

    rng = np.random.default_rng(3)
    img = np.clip(rng.normal((180, 90, 160), 10, (1200, 1200, 3)), 0, 255).astype(np.uint8)
    img[:300] = 245  # glass above, so tissue detection has a background
    return write_pyramidal_tiff(tmp_path / "edge.tif", img, mpp=0.5, min_size=256)
