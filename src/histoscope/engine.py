"""Batched tile inference: one path for every tile-based task.

:func:`run_tiles` reads the tiles of a :class:`~histoscope.tissue.TileGrid`
through :meth:`Slide.read_region` in background threads (a bounded window of
batches in flight, so memory does not grow with the slide), moves each batch
to the chosen device (pinned memory and non-blocking copies on CUDA),
normalises it there, runs the model under ``inference_mode`` (and autocast on
GPU) and collects the outputs with their level-0 coordinates. It reports
``progress(done, total)`` and stops early on cancellation. :func:`iter_tiles`
is the same run as a generator yielding ``(done, total)`` and returning the
outputs, the form a napari ``thread_worker`` drives.

:class:`Result` is the base of what tasks return: it carries its
:class:`Provenance` and turns into napari ``LayerDataTuple`` s placed in µm.
:class:`TileHeatmap` is the result for one value (or a few) per tile.
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
from collections import deque
from collections.abc import Callable, Generator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

    from histoscope.models.backbones import InputSpec
    from histoscope.slide import Slide
    from histoscope.tissue import TileGrid

#: ``(data, kwargs, layer_type)`` as napari's ``LayerDataTuple``.
LayerDataTuple = tuple[Any, dict[str, Any], str]
Progress = Callable[[int, int], "bool | None"]
Cancel = threading.Event | Callable[[], bool]


def pick_device(prefer: str | None = None) -> torch.device:
    """The device to run on: ``prefer`` if given, else CUDA, then MPS, then CPU."""
    import torch

    if prefer is not None:
        return torch.device(prefer)
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@dataclass(frozen=True)
class EngineParams:
    """How :func:`run_tiles` runs (none of it changes the numbers it computes, AMP aside).

    Attributes
    ----------
    batch_size
        Tiles per forward pass.
    workers
        Reader threads.
    prefetch
        Batches read ahead (at least ``workers``); bounds memory.
    device
        ``"cuda"``, ``"mps"``, ``"cpu"``, or ``None`` to pick.
    amp
        Autocast (bfloat16 on CUDA where supported, else float16) on GPU.
    """

    batch_size: int = 32
    workers: int = 2
    prefetch: int = 4
    device: str | None = None
    amp: bool = True


@dataclass
class TileOutputs:
    """Per-tile outputs of :func:`run_tiles`, in grid order.

    Attributes
    ----------
    grid
        The grid that was run.
    outputs
        ``(N, ...)`` float32 array, or a dict of them when the model returns a
        dict; rows of tiles not processed (cancelled) are NaN.
    done
        ``(N,)`` bool: which tiles were processed.
    cancelled
        Whether the run stopped early.
    """

    grid: TileGrid
    outputs: np.ndarray | dict[str, np.ndarray]
    done: np.ndarray
    cancelled: bool = False

    @property
    def coords(self) -> np.ndarray:
        """``(N, 2)`` level-0 ``(x, y)`` of each tile."""
        return self.grid.coords


def tile_order(grid: TileGrid, near: tuple[float, float] | None = None) -> np.ndarray:
    """Processing order: raster, or by distance of tile centres to level-0 ``(x, y)``."""
    if near is None or len(grid) == 0:
        return np.arange(len(grid))
    centres = grid.coords + grid.stride / 2
    d2 = ((centres - np.asarray(near, dtype=np.float64)) ** 2).sum(axis=1)
    return np.argsort(d2, kind="stable")


def _runs(grid: TileGrid, idx: np.ndarray) -> list[tuple[int, int]]:
    """Split ``idx`` into ``(start, stop)`` runs of horizontally adjacent tiles."""
    if abs(grid.stride - round(grid.stride)) > 1e-9:
        return [(j, j + 1) for j in range(len(idx))]  # strips would shift tiles by a fraction
    rows, cols = grid.index[idx, 0], grid.index[idx, 1]
    breaks = np.flatnonzero((rows[1:] != rows[:-1]) | (cols[1:] != cols[:-1] + 1)) + 1
    edges = [0, *breaks.tolist(), len(idx)]
    return list(zip(edges[:-1], edges[1:], strict=True))


def _read_batch(slide: Slide, grid: TileGrid, idx: np.ndarray, pin: bool) -> torch.Tensor:
    """Read a batch into a ``(B, T, T, 3)`` uint8 tensor (pinned for CUDA).

    Horizontally adjacent tiles are read as one strip, so file tiles they share
    are decoded once; a strip is never longer than the batch.
    """
    import torch

    t = grid.tile_size
    buf = torch.empty((len(idx), t, t, 3), dtype=torch.uint8)
    if pin:
        buf = buf.pin_memory()
    arr = buf.numpy()
    for a, b in _runs(grid, idx):
        x, y = grid.coords[idx[a]]
        strip = slide.read_region(int(x), int(y), t * (b - a), t, mpp=grid.mpp)
        arr[a:b] = strip.reshape(t, b - a, t, 3).transpose(1, 0, 2, 3)
    return buf


def _cancelled(cancel: Cancel | None) -> bool:
    if cancel is None:
        return False
    return cancel.is_set() if isinstance(cancel, threading.Event) else bool(cancel())


def run_tiles(
    model: torch.nn.Module,
    slide: Slide,
    grid: TileGrid,
    spec: InputSpec,
    params: EngineParams | None = None,
    *,
    progress: Progress | None = None,
    cancel: Cancel | None = None,
    near: tuple[float, float] | None = None,
    on_batch: Callable[[np.ndarray, Any], None] | None = None,
) -> TileOutputs:
    """Run ``model`` over every tile of ``grid``.

    Parameters
    ----------
    model
        Maps normalised ``(B, 3, T, T)`` floats to a tensor ``(B, ...)`` or a
        dict of them. It is put in eval mode and on the device.
    slide
        Where tiles are read from.
    grid
        Tiles to run (tile size and µm/px come from it).
    spec
        The model's input spec; its mean/std normalise the tiles.
    params
        :class:`EngineParams`.
    progress
        ``progress(done, total)`` after each batch; returning ``False`` cancels.
    cancel
        A :class:`threading.Event`, or a callable returning ``True`` to stop.
    near
        Level-0 ``(x, y)``: process tiles nearest to it first (viewport first).
    on_batch
        ``on_batch(indices, outputs)`` with grid indices and the batch's numpy
        outputs, for progressive display.

    Returns
    -------
    TileOutputs
        Outputs in grid order; on cancellation, the tiles done so far.
    """
    gen = iter_tiles(model, slide, grid, spec, params, cancel=cancel, near=near, on_batch=on_batch)
    reply: bool | None = None
    while True:
        try:
            done, total = gen.send(reply)
        except StopIteration as stop:
            return stop.value
        reply = False if progress is not None and progress(done, total) is False else None


def iter_tiles(
    model: torch.nn.Module,
    slide: Slide,
    grid: TileGrid,
    spec: InputSpec,
    params: EngineParams | None = None,
    *,
    cancel: Cancel | None = None,
    near: tuple[float, float] | None = None,
    on_batch: Callable[[np.ndarray, Any], None] | None = None,
) -> Generator[tuple[int, int], bool | None, TileOutputs]:
    """:func:`run_tiles` as a generator: yields ``(done, total)``, returns :class:`TileOutputs`.

    This is the form a napari ``thread_worker`` wants. Sending ``False``
    stops it and returns the partial outputs (``StopIteration.value``);
    ``close()`` stops it and releases the reader threads.
    """
    import torch

    p = params or EngineParams()
    if grid.tile_size != spec.tile_size:
        raise ValueError(f"grid tiles are {grid.tile_size} px, the model wants {spec.tile_size}")
    dev = pick_device(p.device)
    model = model.to(dev).eval()
    mean = torch.tensor(spec.mean, device=dev).view(1, 3, 1, 1) * 255
    std = torch.tensor(spec.std, device=dev).view(1, 3, 1, 1) * 255
    amp = p.amp and dev.type in ("cuda", "mps")
    amp_dtype = torch.float16
    if dev.type == "cuda" and torch.cuda.is_bf16_supported():
        amp_dtype = torch.bfloat16
    pin = dev.type == "cuda"

    n = len(grid)
    order = tile_order(grid, near)
    batches = [order[i : i + p.batch_size] for i in range(0, n, p.batch_size)]
    done = np.zeros(n, bool)
    store: dict[str, np.ndarray] = {}
    is_dict = False
    cancelled = False
    count = 0
    window = max(p.prefetch, p.workers, 1)
    pending: deque[tuple[np.ndarray, Future]] = deque()
    with ThreadPoolExecutor(max(p.workers, 1), thread_name_prefix="histoscope-read") as pool:
        it = iter(batches)

        def refill() -> None:
            while len(pending) < window:
                idx = next(it, None)
                if idx is None:
                    return
                pending.append((idx, pool.submit(_read_batch, slide, grid, idx, pin)))

        try:
            refill()
            while pending:
                if _cancelled(cancel):
                    cancelled = True
                    break
                idx, fut = pending.popleft()
                batch = fut.result()
                refill()
                x = batch.to(dev, non_blocking=pin).permute(0, 3, 1, 2).float()
                x = (x - mean) / std
                with torch.inference_mode(), torch.autocast(dev.type, amp_dtype, enabled=amp):
                    out = model(x)
                is_dict = isinstance(out, Mapping)
                outs = dict(out) if is_dict else {"": out}
                arrays = {k: v.detach().float().cpu().numpy() for k, v in outs.items()}
                for k, a in arrays.items():
                    if k not in store:
                        store[k] = np.full((n, *a.shape[1:]), np.nan, np.float32)
                    store[k][idx] = a
                done[idx] = True
                count += len(idx)
                if on_batch is not None:
                    on_batch(idx, arrays if is_dict else arrays[""])
                if (yield count, n) is False:
                    cancelled = count < n
                    break
        finally:
            for _, fut in pending:
                fut.cancel()
    if not store:
        store[""] = np.full((n, 0), np.nan, np.float32)
    outputs: np.ndarray | dict[str, np.ndarray] = store if is_dict else store[""]
    return TileOutputs(grid=grid, outputs=outputs, done=done, cancelled=cancelled)


# ---------------------------------------------------------------------- results
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
    """

    task: str
    slide: str
    checkpoint_sha256: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    mpp: float | None = None
    tile_grid: dict[str, Any] = field(default_factory=dict)
    software: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.software:
            import histoscope

            sw = {"histoscope": histoscope.__version__}
            if "torch" in sys.modules:
                sw["torch"] = sys.modules["torch"].__version__
            object.__setattr__(self, "software", sw)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


@dataclass(frozen=True)
class Result:
    """Base of task results: provenance, layers, and writing to disk."""

    provenance: Provenance

    def to_layers(self) -> list[LayerDataTuple]:
        """napari layers placed in µm, provenance in ``metadata["histoscope"]``."""
        raise NotImplementedError

    def save(self, out_dir: str | os.PathLike) -> list[Path]:
        """Write the result and ``provenance.json`` under ``out_dir``; return the files."""
        raise NotImplementedError

    def _write_provenance(self, out_dir: Path) -> Path:
        return _atomic_write(
            out_dir / "provenance.json",
            json.dumps(self.provenance.to_dict(), indent=2, sort_keys=True).encode(),
        )


def _atomic_write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    part.write_bytes(data)
    os.replace(part, path)
    return path


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

    def to_layers(self) -> list[LayerDataTuple]:
        scale, translate = self.placement()
        meta = {"histoscope": self.provenance.to_dict()}
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
            "colormap": "inferno",
            "opacity": 0.6,
            "contrast_limits": (lo, hi if hi > lo else lo + 1.0),
        }
        if self.values.ndim == 3:
            kwargs["channel_axis"] = 2
            kwargs.pop("contrast_limits")
            kwargs.pop("colormap")
        return [(self.values, kwargs, "image")]

    def save(self, out_dir: str | os.PathLike) -> list[Path]:
        import io

        out = Path(out_dir)
        buf = io.BytesIO()
        np.save(buf, self.values)
        stem = re.sub(r"[^a-z0-9_.-]+", "_", self.name.lower()).strip("_") or "heatmap"
        files = [_atomic_write(out / f"{stem}.npy", buf.getvalue())]
        files.append(self._write_provenance(out))
        return files
