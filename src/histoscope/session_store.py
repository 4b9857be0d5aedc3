"""The session folder on disk: a manifest and the layers, saved so they reopen exactly.

A session folder (``<slide>.histoscope/``) holds ``session.json`` (the
manifest: the slide's path and content fingerprint, the feature tables kept,
and every layer HistoScope shows over the slide with its display settings and
provenance) beside the files behind it. Layers are plain ``LayerDataTuple`` s
here; numpy arrays inside them go to one ``.npz`` per layer and feature tables
to Parquet, so nothing is pickled.

Saving is crash-safe: each save writes a new generation folder
(``layers/<n>/``) completely, then replaces the manifest atomically, and only
then removes older generations. A process killed mid-save leaves the previous
manifest and every file it names.

Saves are serialised across processes and threads by :func:`folder_lock`
(``fcntl.flock`` on ``.session.lock`` in the folder): a second writer waits up
to :data:`LOCK_TIMEOUT_S`, then raises :class:`SessionLockedError` naming the
folder and the holder (pid, host, since when). The kernel drops the lock when
its holder exits or is killed, so a crashed save never leaves a stale lock.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np

from histoscope.atomic import atomic_path, atomic_write_text
from histoscope.errors import HistoScopeError
from histoscope.layers import LayerDataTuple
from histoscope.session import SessionError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: saves are not locked across processes
    fcntl = None

MANIFEST = "session.json"
#: Largest multiscale layer saved into a session (larger ones reopen from their own files).
MAX_LAYER_BYTES = 1 << 30
LAYERS_DIR = "layers"
#: Layer settings not saved: derived from others, or not meaningful in another process.
SKIP_KEYS = frozenset({"properties", "property_choices", "feature_defaults", "ndim",
                       "experimental_clipping_planes"})  # fmt: skip
#: Metadata keys that hold live objects (a Slide, a Session), never saved.
LIVE_METADATA = frozenset({"slide", "histoscope_session"})


#: Lock file inside a session folder; never removed (removing a flock file races).
LOCK_FILE = ".session.lock"
#: Seconds a writer waits for another save of the same folder before giving up.
LOCK_TIMEOUT_S = 30.0
_held = threading.local()


class SessionFileError(HistoScopeError):
    """A session folder's manifest or layer files are missing or malformed."""


class SessionLockedError(SessionError):
    """Another process (or thread) kept saving the session folder for too long."""


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        info = {}
    if not info.get("pid"):
        return "holder unknown"
    return f"pid {info['pid']} on {info.get('host', '?')} since {info.get('since', '?')}"


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, timeout: float | None = None) -> Iterator[None]:
    """Hold the session folder's save lock (re-entrant within one thread).

    Parameters
    ----------
    folder
        The session folder (made if missing).
    timeout
        Seconds to wait for another holder; :data:`LOCK_TIMEOUT_S` if ``None``.

    Raises
    ------
    SessionLockedError
        If the lock is still held after ``timeout``, naming the folder and
        the holder's pid, host and start time.
    """
    root = Path(folder)
    key = str(root.resolve())
    held = _held.__dict__.setdefault("folders", set())
    if key in held or fcntl is None:
        yield
        return
    root.mkdir(parents=True, exist_ok=True)
    path = root / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        wait = LOCK_TIMEOUT_S if timeout is None else float(timeout)
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise SessionLockedError(
                        f"{root}: another save of this session folder is in progress "
                        f"({_holder(path)}); gave up after waiting {wait:g} s"
                    ) from None
                time.sleep(0.05)
        since = datetime.now(timezone.utc).isoformat(timespec="seconds")
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": since,
              "thread": threading.current_thread().name}  # fmt: skip
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        held.add(key)
        try:
            yield
        finally:
            held.discard(key)
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a session folder (``{}`` when there is none yet)."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return {}
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SessionFileError(f"{path}: not a readable session manifest ({exc})") from None
    if not isinstance(doc, dict):
        raise SessionFileError(f"{path}: not a session manifest (a JSON object)")
    return doc


def write_manifest(folder: str | os.PathLike, doc: dict[str, Any]) -> Path:
    """Replace the manifest atomically (holding the folder's save lock)."""
    with folder_lock(folder):
        return atomic_write_text(Path(folder) / MANIFEST, json.dumps(doc, indent=1) + "\n")


# ------------------------------------------------------------------ encoding
class _Arrays:
    """Collects the arrays of one layer's settings under generated keys."""

    def __init__(self) -> None:
        self.arrays: dict[str, np.ndarray] = {}

    def encode(self, value: Any) -> Any:
        if isinstance(value, np.ndarray) and value.dtype == object:
            return [self.encode(v) for v in value.tolist()]  # e.g. point symbols (enums)
        if isinstance(value, np.ndarray):
            key = f"a{len(self.arrays)}"
            self.arrays[key] = np.asarray(value)
            return {"$array": key}
        if isinstance(value, Enum):
            return value.value
        if isinstance(value, dict):
            return {str(k): self.encode(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.encode(v) for v in value]
        if isinstance(value, np.generic):
            return value.item()
        if value is None or isinstance(value, str | int | float | bool):
            return value
        raise TypeError(type(value).__name__)


def _decode(value: Any, arrays) -> Any:
    if isinstance(value, dict):
        if set(value) == {"$array"}:
            return np.asarray(arrays[value["$array"]])
        return {k: _decode(v, arrays) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v, arrays) for v in value]
    return value


def _saved_metadata(meta: dict[str, Any], enc: _Arrays) -> dict[str, Any]:
    """The metadata entries that can be saved (live objects and odd types are left out)."""
    out = {}
    for k, v in (meta or {}).items():
        if k in LIVE_METADATA:
            continue
        probe = _Arrays()
        try:
            probe.encode(v)
        except TypeError:
            continue
        out[k] = enc.encode(v)
    return out


def save_layer(folder: Path, index: int, layer: LayerDataTuple) -> dict[str, Any]:
    """Write one layer's data and settings under ``folder``; return its manifest entry."""
    data, kwargs, kind = layer
    enc = _Arrays()
    settings: dict[str, Any] = {}
    for k, v in kwargs.items():
        if k in SKIP_KEYS:
            continue
        if k == "metadata":
            settings[k] = _saved_metadata(v, enc)
        elif k == "units":  # pint units: saved by name ("micrometer"), napari reads them back
            settings[k] = None if v is None else [str(u) for u in v]
        elif k == "features":
            if v is not None and len(getattr(v, "columns", ())):
                with atomic_path(folder / f"{index}.parquet", ".parquet") as tmp:
                    v.to_parquet(tmp)
                settings["features"] = {"$parquet": f"{index}.parquet"}
        else:
            try:
                settings[k] = enc.encode(v)
            except TypeError:
                continue  # a setting of a type this version cannot save: napari's default
    meta = kwargs.get("metadata") or {}
    if kind == "shapes":
        parts = {f"d{i}": np.asarray(d) for i, d in enumerate(data)}
        data_entry: Any = {"$shapes": len(parts)}
    elif kind == "image" and kwargs.get("multiscale") and meta.get("stack") and meta.get("gene"):
        # a gene of an expression stack on disk: saved as a reference, never copied
        parts = {}
        data_entry = {"$stack": str(meta["stack"]), "gene": str(meta["gene"])}
    elif kind == "image" and kwargs.get("multiscale"):
        levels = list(data)
        size = sum(int(np.prod(lv.shape)) * np.dtype(lv.dtype).itemsize for lv in levels)
        if size > MAX_LAYER_BYTES:
            raise ValueError(f"a {size / 2**30:.1f} GiB pyramid; reopen it from its own file")
        parts = {f"l{i}": np.asarray(lv) for i, lv in enumerate(levels)}
        data_entry = {"$levels": len(parts)}
    else:
        parts = {"data": np.asarray(data)}
        data_entry = {"$array": "data"}
    with atomic_path(folder / f"{index}.npz", ".npz") as tmp:
        np.savez(tmp, **parts, **enc.arrays)
    return {"type": kind, "name": kwargs.get("name", f"layer {index}"), "data": data_entry,
            "file": f"{index}.npz", "settings": settings}  # fmt: skip


def load_layer(folder: Path, entry: dict[str, Any]) -> LayerDataTuple:
    """A layer saved by :func:`save_layer`, as ``(data, kwargs, type)``."""
    try:
        with np.load(folder / entry["file"], allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        if "$stack" in entry["data"]:
            from histoscope.expression.stack import open_levels

            data: Any = open_levels(entry["data"]["$stack"], entry["data"]["gene"])
        elif "$shapes" in entry["data"]:
            data = [arrays[f"d{i}"] for i in range(int(entry["data"]["$shapes"]))]
        elif "$levels" in entry["data"]:
            data = [arrays[f"l{i}"] for i in range(int(entry["data"]["$levels"]))]
        else:
            data = arrays["data"]
        kwargs = _decode(entry["settings"], arrays)
        feats = entry["settings"].get("features")
        if isinstance(feats, dict) and "$parquet" in feats:
            import pandas as pd

            kwargs["features"] = pd.read_parquet(folder / feats["$parquet"])
    except (OSError, KeyError, ValueError, TypeError, HistoScopeError) as exc:
        raise SessionFileError(f"{folder}: layer {entry.get('name')!r} cannot be read "
                               f"({type(exc).__name__}: {exc})") from None  # fmt: skip
    return data, kwargs, entry["type"]


# ------------------------------------------------------------- generations
def save_layers(
    folder: str | os.PathLike,
    layers: list[LayerDataTuple],
    manifest: dict[str, Any],
    slide_display: dict[str, Any] | None = None,
) -> Path:
    """Save ``layers`` (in viewer order) as a new generation and point the manifest at it.

    Returns the manifest path. Older generations are removed only after the
    new manifest is in place. The whole save holds :func:`folder_lock`.

    Raises
    ------
    SessionLockedError
        If another process keeps the folder locked for :data:`LOCK_TIMEOUT_S`.
    """
    with folder_lock(folder):
        return _save_generation(Path(folder), layers, manifest, slide_display)


def _save_generation(
    root: Path,
    layers: list[LayerDataTuple],
    manifest: dict[str, Any],
    slide_display: dict[str, Any] | None,
) -> Path:
    base = root / LAYERS_DIR
    base.mkdir(parents=True, exist_ok=True)
    gens = [int(p.name) for p in base.iterdir() if p.name.isdigit()]
    gen = base / str(max(gens, default=0) + 1)
    gen.mkdir()
    entries, not_saved = [], []
    for i, layer in enumerate(layers):
        try:
            entries.append(save_layer(gen, i, layer))
        except (ValueError, TypeError) as exc:  # one odd layer must not cost the others
            not_saved.append([str(layer[1].get("name", f"layer {i}")), str(exc)])
    enc = _Arrays()
    display = enc.encode(slide_display or {})
    doc = {**manifest, "layers_dir": f"{LAYERS_DIR}/{gen.name}", "layers": entries,
           "slide_display": display, "not_saved": not_saved}  # fmt: skip
    path = write_manifest(root, doc)
    for old in base.iterdir():  # earlier generations, and any a killed save left behind
        if old != gen:
            shutil.rmtree(old, ignore_errors=True)
    return path


def load_layers(folder: str | os.PathLike) -> tuple[dict[str, Any], list[LayerDataTuple]]:
    """``(manifest, layers)`` of a session folder, in the order they were shown.

    A layer whose files cannot be read is left out and named in
    ``manifest["unreadable"]``; the others still load.
    """
    root = Path(folder)
    doc = read_manifest(root)
    if not doc.get("layers_dir"):
        return doc, []
    gen = root / doc["layers_dir"]
    layers, unreadable = [], []
    for entry in doc.get("layers", []):
        try:
            layers.append(load_layer(gen, entry))
        except SessionFileError as exc:
            unreadable.append(str(exc))
    doc["unreadable"] = unreadable
    return doc, layers
