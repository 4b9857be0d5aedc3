"""The nuclei table: centroids, outlines and QuPath-style measurements."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

#: Measurement columns, named as QuPath names them.
COLUMNS = (
    "Nucleus: Area µm^2",
    "Nucleus: Perimeter µm",
    "Nucleus: Circularity",
    "Nucleus: Eccentricity",
    "Nucleus: Hematoxylin OD mean",
    "Nucleus: Hematoxylin OD std dev",
    "Nucleus: Eosin OD mean",
    "Nucleus: Eosin OD std dev",
)


def empty_measurements() -> pd.DataFrame:
    """A measurements table with the :data:`COLUMNS` and no rows."""
    return pd.DataFrame({c: np.zeros(0, np.float64) for c in COLUMNS})


@dataclass
class Nuclei:
    """Detected nuclei.

    Coordinates are level-0 pixels of the slide (or pixels of the image a
    single image was detected in), ``x`` to the right and ``y`` down, with
    the centre of pixel ``(row i, column j)`` at ``(x=j, y=i)`` as in napari
    and the synthetic ground truth (QuPath's corner-based coordinates are
    these plus 0.5).

    Outlines use the same convention: a vertex at ``(x, y)`` is in units of
    pixels from the centre of pixel ``(0, 0)``; add 0.5 to both for QuPath or
    any other corner-based (pixel-edge) geometry.

    Attributes
    ----------
    x, y
        ``(n,)`` float64 centroids (the mean of the nucleus's pixel centres).
    outlines
        ``n`` arrays ``(k, 2)`` float32 of ``[x, y]`` in the pixel-centre
        convention above, midway between the nucleus's boundary pixel centres
        and the outside ones (then smoothed); the ring is not closed.
    measurements
        ``n`` rows, the :data:`COLUMNS` (areas in µm², lengths in µm, OD units).
        The area is the nucleus's pixel count times ``mpp²`` (not the area
        inside its outline); the perimeter is the outline's length.
    mpp
        µm per pixel of the coordinates (the slide's level-0 µm/px).
    """

    x: np.ndarray
    y: np.ndarray
    outlines: list[np.ndarray]
    measurements: pd.DataFrame = field(default_factory=empty_measurements)
    mpp: float = 1.0

    def __post_init__(self) -> None:
        self.x = np.asarray(self.x, np.float64).reshape(-1)
        self.y = np.asarray(self.y, np.float64).reshape(-1)
        n = len(self.x)
        if len(self.y) != n or len(self.outlines) != n or len(self.measurements) != n:
            raise ValueError(f"nuclei columns differ in length: x {n}, y {len(self.y)}, "
                             f"outlines {len(self.outlines)}, measurements "
                             f"{len(self.measurements)}")  # fmt: skip

    def __len__(self) -> int:
        return len(self.x)

    @classmethod
    def empty(cls, mpp: float) -> Nuclei:
        """No nuclei."""
        return cls(np.zeros(0), np.zeros(0), [], empty_measurements(), float(mpp))

    @staticmethod
    def concat(parts: list[Nuclei], mpp: float) -> Nuclei:
        """All nuclei of ``parts`` (already in the same coordinates) in one table."""
        parts = [p for p in parts if len(p)]
        if not parts:
            return Nuclei.empty(mpp)
        meas = pd.concat([p.measurements for p in parts], ignore_index=True)
        return Nuclei(
            x=np.concatenate([p.x for p in parts]),
            y=np.concatenate([p.y for p in parts]),
            outlines=[o for p in parts for o in p.outlines],
            measurements=meas,
            mpp=float(mpp),
        )

    def subset(self, keep: np.ndarray) -> Nuclei:
        """The nuclei selected by a boolean mask or an index array."""
        keep = np.asarray(keep)
        idx = np.flatnonzero(keep) if keep.dtype == bool else keep.astype(np.int64).reshape(-1)
        if keep.dtype == bool and len(keep) != len(self):
            raise ValueError(f"mask of length {len(keep)} for {len(self)} nuclei")
        return Nuclei(
            x=self.x[idx],
            y=self.y[idx],
            outlines=[self.outlines[i] for i in idx],
            measurements=self.measurements.iloc[idx].reset_index(drop=True),
            mpp=self.mpp,
        )

    def translated(self, dx: float, dy: float, scale: float = 1.0, mpp: float | None = None):
        """Coordinates mapped by ``p * scale + (dx, dy)`` (pixel centres kept as centres).

        Used to place nuclei found in a tile read at ``scale`` level-0 px per
        tile pixel whose first pixel's centre sits at level-0 ``(dx, dy)``.
        """
        off = np.array([dx, dy], np.float32)
        return Nuclei(
            x=self.x * scale + dx,
            y=self.y * scale + dy,
            outlines=[(o * np.float32(scale) + off).astype(np.float32) for o in self.outlines],
            measurements=self.measurements,
            mpp=self.mpp if mpp is None else float(mpp),
        )
