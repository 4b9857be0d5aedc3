"""What every analysis returns: a :class:`Result` with its :class:`Provenance`.

A Result turns into napari layers placed in µm (:meth:`Result.to_layers`),
writes itself atomically into a folder (:meth:`Result.save`), sums itself up
as plain JSON-able data (:meth:`Result.summary`, what the panels and the CLI
print) and carries the provenance needed to re-run it headless.
:class:`TileHeatmap` is the result for one value (or a few) per tile.
"""

from __future__ import annotations

import io
import json
import os
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from histoscope.atomic import atomic_write_bytes, atomic_write_text
from histoscope.layers import LayerDataTuple

if TYPE_CHECKING:
    from histoscope.engine import TileOutputs
    from histoscope.tissue import TileGrid

__all__ = ["LayerDataTuple", "Provenance", "Result", "TileHeatmap", "safe_stem"]


def safe_stem(name: str, default: str = "result") -> str:
    """A file-name stem from a layer name: lower case, ``[a-z0-9_.-]`` only."""
    return re.sub(r"[^a-z0-9_.-]+", "_", name.lower()).strip("_") or default


def plain(value: Any) -> Any:
    """``value`` as JSON-able data (dataclasses, enums, tuples, numpy scalars and arrays)."""
    from dataclasses import fields, is_dataclass
    from enum import Enum

    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return value


@dataclass(frozen=True)
class Provenance:
    """Everything needed to re-run a result headless.

    Attributes
    ----------
    task
        Task name.
    slide
        Slide path.
    checkpoint_sha256
        Hash of the checkpoint's tensors (from its card), or ``""``.
    params
        Task parameters (plain data).
    mpp
        µm/px the task read the slide at.
    tile_grid
        :meth:`TileGrid.to_dict` of the grid, if tiled.
    software
        Versions of histoscope and torch.
    cancelled
        The run was stopped before it finished: the result holds what was done.
    """

    task: str
    slide: str
    checkpoint_sha256: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    mpp: float | None = None
    tile_grid: dict[str, Any] = field(default_factory=dict)
    software: dict[str, str] = field(default_factory=dict)
    cancelled: bool = False

    def __post_init__(self) -> None:
        if not self.software:
            import histoscope

            sw = {"histoscope": histoscope.__version__}
            if "torch" in sys.modules:
                sw["torch"] = str(sys.modules["torch"].__version__)
            object.__setattr__(self, "software", sw)
        object.__setattr__(self, "params", plain(self.params))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return plain(asdict(self))


@dataclass(frozen=True)
class Result:
    """Base of task results: provenance, layers, a summary, and writing to disk."""

    provenance: Provenance

    @property
    def cancelled(self) -> bool:
        """Whether the run stopped early (the result holds what was finished)."""
        return self.provenance.cancelled

    def to_layers(self) -> list[LayerDataTuple]:
        """napari layers placed in µm, provenance in ``metadata["histoscope"]``."""
        raise NotImplementedError

    def summary(self) -> dict[str, Any]:
        """Plain JSON-able data: what a panel shows and the CLI prints."""
        raise NotImplementedError

    def save(self, out_dir: str | os.PathLike) -> list[Path]:
        """Write the result and ``provenance.json`` under ``out_dir`` atomically; return the files."""
        raise NotImplementedError

    def _write_provenance(self, out_dir: Path, name: str = "provenance.json") -> Path:
        doc = {**self.provenance.to_dict(), "summary": self.summary()}
        return atomic_write_text(Path(out_dir) / name, json.dumps(doc, indent=2, sort_keys=True))


def write_npy(path: Path, array: np.ndarray) -> Path:
    """Write ``array`` as ``.npy`` atomically."""
    buf = io.BytesIO()
    np.save(buf, array)
    return atomic_write_bytes(path, buf.getvalue())


#: RGB stops (evenly spaced) of the palettes :func:`fading_colormap` fades.
_FADE_STOPS: dict[str, tuple[tuple[float, float, float], ...]] = {
    "inferno": ((0.001, 0.0, 0.014), (0.128, 0.047, 0.29), (0.34, 0.062, 0.429),
                (0.539, 0.134, 0.416), (0.733, 0.214, 0.332), (0.892, 0.35, 0.197),
                (0.977, 0.553, 0.038), (0.976, 0.791, 0.197), (0.988, 0.998, 0.645)),
    "turbo": ((0.19, 0.072, 0.232), (0.276, 0.42, 0.89), (0.16, 0.733, 0.925),
              (0.192, 0.947, 0.599), (0.638, 0.991, 0.236), (0.929, 0.817, 0.226),
              (0.985, 0.502, 0.132), (0.823, 0.191, 0.019), (0.48, 0.016, 0.011)),
}  # fmt: skip

#: Layer opacity of a heatmap: the fade is in the colour map's alpha, so the top stays solid.
HEATMAP_OPACITY = 0.9


def fading_colormap(palette: str = "inferno") -> dict[str, Any]:
    """A napari colour map spec (a dict for ``Colormap(**spec)``) that fades out at the low end.

    Alpha ramps linearly from 0 at the lowest value to 1 at the highest, so
    low-scoring tiles leave the H&E underneath readable; NaN (background) is
    never drawn by napari. Plain data: no napari import.

    Parameters
    ----------
    palette
        ``"inferno"`` or ``"turbo"``.

    Returns
    -------
    dict
        ``{"name", "display_name", "colors" (N x RGBA), "controls" (N), "interpolation"}``.
    """
    stops = _FADE_STOPS[palette]
    n = len(stops) - 1
    return {
        "name": f"histoscope {palette} fade",
        "display_name": f"{palette} (fades to transparent)",
        "colors": [[*rgb, i / n] for i, rgb in enumerate(stops)],
        "controls": [i / n for i in range(n + 1)],
        "interpolation": "linear",
    }


@dataclass(frozen=True, kw_only=True)
class TileHeatmap(Result):
    """One value (or channel vector) per tile, laid out as an image over the slide.

    Attributes
    ----------
    values
        ``(rows, cols)`` or ``(rows, cols, C)`` float32; NaN where no tile ran
        (background is masked, never "probability 0").
    grid
        The tile grid (its stride and the slide µm/px give the layer scale).
    name
        Layer name.
    channels
        Channel names when ``values`` has a channel axis.
    """

    values: np.ndarray
    grid: TileGrid
    name: str = "heatmap"
    channels: tuple[str, ...] = ()

    @classmethod
    def from_outputs(
        cls,
        out: TileOutputs,
        provenance: Provenance,
        name: str = "heatmap",
        channel: int | None = None,
        channels: tuple[str, ...] = (),
    ) -> TileHeatmap:
        """Lay per-tile outputs (optionally one ``channel`` of them) onto the grid."""
        vals = (
            out.outputs if isinstance(out.outputs, np.ndarray) else next(iter(out.outputs.values()))
        )
        if channel is not None:
            vals = vals[:, channel]
        rows, cols = out.grid.shape
        img = np.full((rows, cols, *vals.shape[1:]), np.nan, np.float32)
        ok = out.done
        img[out.grid.index[ok, 0], out.grid.index[ok, 1]] = vals[ok]
        return cls(provenance=provenance, values=img, grid=out.grid, name=name, channels=channels)

    def placement(self) -> tuple[tuple[float, float], tuple[float, float]]:
        """``(scale, translate)`` in µm so each pixel sits on its tile.

        A napari image pixel ``i`` is centred at ``translate + i * scale``; the
        slide image (scale = slide µm/px) centres level-0 pixel ``j`` at
        ``j * mpp``, so tile ``k`` (level-0 pixels ``[k s, (k + 1) s)``) is
        centred at ``(k s + s / 2 - 1 / 2) mpp``.
        """
        s, mpp = self.grid.stride, self.grid.slide_mpp
        step = s * mpp
        off = (s / 2 - 0.5) * mpp
        return (step, step), (off, off)

    @property
    def n_scored(self) -> int:
        """Tiles with a value."""
        v = self.values if self.values.ndim == 2 else self.values[..., 0]
        return int(np.isfinite(v).sum())

    def summary(self) -> dict[str, Any]:
        finite = self.values[np.isfinite(self.values)]
        return {
            "name": self.name,
            "tiles": len(self.grid),
            "scored": self.n_scored,
            "mean": float(finite.mean()) if finite.size else None,
            "max": float(finite.max()) if finite.size else None,
            "cancelled": self.cancelled,
        }

    def to_layers(self) -> list[LayerDataTuple]:
        scale, translate = self.placement()
        meta: dict[str, Any] = {"histoscope": self.provenance.to_dict()}
        if self.values.ndim == 3:
            meta["channels"] = list(self.channels)
        finite = self.values[np.isfinite(self.values)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        kwargs = {
            "name": self.name,
            "scale": scale,
            "translate": translate,
            "units": ("um", "um"),
            "metadata": meta,
            "colormap": fading_colormap("inferno"),
            "opacity": HEATMAP_OPACITY,
            "contrast_limits": (lo, hi if hi > lo else lo + 1.0),
        }
        if self.values.ndim == 3:
            kwargs["channel_axis"] = 2
            kwargs.pop("contrast_limits")
            kwargs.pop("colormap")
        else:
            # napari's colour bar has no title: the widget shows it and names it from here.
            meta["colorbar"] = {"visible": True, "label": self.name}
        return [(self.values, kwargs, "image")]

    def save(self, out_dir: str | os.PathLike) -> list[Path]:
        """Write ``<stem>.npy``, ``<stem>.provenance.json`` and ``<stem>.ome.zarr`` (a folder).

        ``<stem>`` is the layer name made file-safe; the OME-Zarr pyramid is
        placed in µm as the layer (:func:`histoscope.export.heatmap.write_heatmap_ome_zarr`).
        """
        from histoscope.export.heatmap import write_heatmap_ome_zarr

        out = Path(out_dir)
        stem = safe_stem(self.name, "heatmap")
        files = [write_npy(out / f"{stem}.npy", self.values)]
        files.append(self._write_provenance(out, f"{stem}.provenance.json"))
        files.append(write_heatmap_ome_zarr(self, out / f"{stem}.ome.zarr"))
        return files
