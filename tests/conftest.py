"""Fixtures shared by the whole suite: small slides written the way real ones are."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


def pytest_configure(config) -> None:
    """Load torch's compiler stack (and Triton) before any test opens an OpenGL canvas.

    Triton bundles its own LLVM; loaded after Mesa's (napari under Xvfb draws with
    llvmpipe), it crashes the process. Optimisers load it lazily, so a training test
    run after a widget test would crash; loaded first, both coexist.
    """
    try:
        import torch._dynamo  # noqa: F401
    except Exception:  # noqa: BLE001 - a torch without the compiler stack has nothing to clash
        pass


def make_rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A deterministic RGB image with structure at several scales (not flat colour)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack(
        [
            128 + 90 * np.sin(xx / 37.0) * np.cos(yy / 53.0),
            128 + 90 * np.cos(xx / 71.0 + yy / 29.0),
            128 + 90 * np.sin((xx + yy) / 101.0),
        ],
        axis=-1,
    )
    base += rng.normal(0, 6, size=base.shape)
    return np.clip(base, 0, 255).astype(np.uint8)


@pytest.fixture(scope="session")
def pyramid_tiff(tmp_path_factory) -> Path:
    """A 1,536 x 2,304 JPEG-tiled pyramidal TIFF at 0.5 µm/px."""
    from histoscope.slide import write_pyramidal_tiff

    path = tmp_path_factory.mktemp("slides") / "pyramid.tif"
    return write_pyramidal_tiff(path, make_rgb(1536, 2304), mpp=0.5, tile=256, min_size=512)
