"""Parameters of nucleus detection (lengths in µm, areas in µm², densities in OD)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from histoscope.params import ParamError, check, param

#: Detection methods: the classical detector (no weights) and two adapters.
METHODS = ("classical", "stardist", "cellpose")


@dataclass(frozen=True)
class NucleiParams:
    """How nuclei are found on H&E.

    The classical detector (``method="classical"``) separates haematoxylin by
    colour deconvolution, smooths it by ``sigma_um``, subtracts the local
    background (a grey opening of radius ``background_um``), thresholds it at
    ``threshold`` (0: Otsu per image) and at ``local_fraction`` of the highest
    contrast within ``local_radius_um``, splits touching nuclei by a watershed on
    the contrast-weighted distance transform (seeds at least ``split_um``
    above the saddle to their neighbour), and keeps nuclei within the size,
    solidity and colour limits. A slide is read tile by tile at ``mpp``:
    cores of ``tile_size`` px, each read with ``overlap_um / 2`` of context on
    every side; a nucleus belongs to the core holding its centroid.

    The defaults were chosen on synthetic H&E slides (seeds 100-104, see
    ``benchmarks/bench_nuclei.py``); on real tissue, check the threshold first.
    """

    mpp: float = param(0.5, "µm/px detection runs at (never finer than the slide's own)",
                       min=0.1, max=4.0)  # fmt: skip
    tile_size: int = param(1024, "tile core edge in px at mpp (each read adds the overlap)",
                           min=64, max=8192)  # fmt: skip
    overlap_um: float = param(24.0, "overlap between tiles (µm); more than the largest nucleus "
                              "is long", min=0.0, max=500.0)  # fmt: skip
    threshold: float = param(0.15, "haematoxylin OD a nucleus pixel exceeds (0: Otsu per image)",
                             min=0.0, max=5.0)  # fmt: skip
    sigma_um: float = param(0.5, "Gaussian smoothing of haematoxylin before thresholding (µm)",
                            min=0.0, max=10.0)  # fmt: skip
    background_um: float = param(5.0, "radius of the local background subtracted under nuclei "
                                 "(µm; 0: none)", min=0.0, max=100.0)  # fmt: skip
    local_fraction: float = param(0.3, "a nucleus pixel also reaches this fraction of the "
                                  "highest contrast within local_radius_um (separates nuclei "
                                  "fused by dark cytoplasm; 0: off)", min=0.0, max=1.0)  # fmt: skip
    local_radius_um: float = param(3.0, "radius of that neighbourhood (µm)", min=0.0, max=50.0)
    split_um: float = param(0.25, "how far (µm) a seed must rise above the saddle to its "
                            "neighbour to split touching nuclei", min=0.0, max=20.0)  # fmt: skip
    min_area_um2: float = param(8.0, "smallest nucleus (µm²)", min=0.0, max=10_000.0)
    max_area_um2: float = param(400.0, "largest nucleus (µm²)", min=0.1, max=10_000.0)
    min_solidity: float = param(0.7, "smallest area / convex-hull area a nucleus may have",
                                min=0.0, max=1.0)  # fmt: skip
    max_eosin_ratio: float = param(4.0, "largest eosin / haematoxylin OD ratio of a nucleus "
                                   "(rejects red blood cells)", min=0.0, max=100.0)  # fmt: skip
    method: str = param("classical", "classical (no weights), stardist or cellpose (local "
                        "weights)", choices=METHODS)  # fmt: skip
    weights: str = param("", "local weights for stardist (model folder) or cellpose (file)")

    def __post_init__(self) -> None:
        check(self, "nuclei")
        if self.max_area_um2 <= self.min_area_um2:
            raise ParamError(f"nuclei.max_area_um2={self.max_area_um2!r}: must exceed "
                             f"min_area_um2={self.min_area_um2!r}")  # fmt: skip
        diameter = 2 * math.sqrt(self.max_area_um2 / math.pi)
        if self.overlap_um < diameter:
            raise ParamError(f"nuclei.overlap_um={self.overlap_um!r}: must be at least the "
                             f"diameter of the largest nucleus ({diameter:.1f} µm for "
                             f"max_area_um2={self.max_area_um2!r}), or nuclei on tile borders "
                             "are cut")  # fmt: skip
