"""A session: one slide and every product computed on it, each computed once.

Tasks never recompute what another task already made: the tissue mask, tile
grids, feature tables, loaded checkpoints and results all live in the
:class:`Session` of their slide, keyed by what they were computed from. Small
products stay in memory; feature tables (large, slow to make) are also kept in
the session folder (``<slide>.histoscope/`` beside the slide by default) in
CLAM/TRIDENT layout, so a rerun or another tool reads them back.

``hs.open_session(path_or_slide)`` makes one; a bare :class:`~histoscope.slide.Slide`
given to :func:`histoscope.tasks.run` is wrapped in an in-memory session.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections import Counter
from collections.abc import Callable, Generator, Hashable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from histoscope.errors import HistoScopeError
from histoscope.slide import Slide, open_slide

if TYPE_CHECKING:
    from histoscope.checkpoints import ModelCard
    from histoscope.engine import EngineParams
    from histoscope.features import FeatureModel, FeatureTable
    from histoscope.results import Result
    from histoscope.tissue import TileGrid, TissueMask, TissueParams

T = TypeVar("T")

#: Suffix of the default session folder beside a slide.
FOLDER_SUFFIX = ".histoscope"


class SessionError(HistoScopeError):
    """A session folder cannot be used (read-only, not a folder, ...)."""


def default_folder(slide_path: str | os.PathLike) -> Path:
    """``<slide>.histoscope/`` beside the slide file or folder."""
    p = Path(slide_path)
    return p.with_name(p.name + FOLDER_SUFFIX)


def _check_writable(folder: Path) -> None:
    """Raise :class:`SessionError` naming ``folder`` when it cannot be written."""
    if folder.exists():
        if not folder.is_dir():
            raise SessionError(f"session folder {folder} exists and is not a folder")
        if os.access(folder, os.W_OK | os.X_OK):
            return
        raise SessionError(f"session folder {folder} is read-only; open the session with "
                           "folder=<a folder you can write> (CLI: --session-dir DIR)")  # fmt: skip
    parent = next((p for p in folder.parents if p.exists()), None)
    if parent is None or not os.access(parent, os.W_OK | os.X_OK):
        raise SessionError(f"cannot create session folder {folder}: {parent} is read-only; "
                           "open the session with folder=<a folder you can write> "
                           "(CLI: --session-dir DIR)")  # fmt: skip


class Session:
    """One slide plus everything computed on it.

    Parameters
    ----------
    slide
        The open slide.
    folder
        Where large products are kept; ``None`` keeps everything in memory.

    Attributes
    ----------
    computed
        How many times each product kind was computed (not served from the cache).
    results
        The latest :class:`~histoscope.results.Result` of each task run on it.
    tissue_params
        The tissue detection in force: what :meth:`tissue` uses when asked for
        no other (the ``tissue`` task sets it, so later tasks follow the user's
        adjusted mask).
    """

    def __init__(self, slide: Slide, folder: str | os.PathLike | None = None) -> None:
        from histoscope.tissue import TissueParams

        self.slide = slide
        self.folder = Path(folder) if folder is not None else None
        if self.folder is not None:
            _check_writable(self.folder)
        self.computed: Counter[str] = Counter()
        self.results: dict[str, Result] = {}
        self.tissue_params: TissueParams = TissueParams()
        self._cache: dict[tuple[str, Hashable], Any] = {}
        self._lock = threading.Lock()
        self._locks: dict[tuple[str, Hashable], threading.Lock] = {}
        self._owns_slide = False

    @property
    def slide_id(self) -> str:
        """What identifies the slide's pixels: its resolved path, size and modification time."""
        p = self.slide.path
        try:
            st = p.stat()
            stamp = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:  # no file behind it (an in-memory image)
            stamp = f"mem:{id(self.slide)}"
        return f"{p.resolve()}|{stamp}|{self.slide.shape}"

    def __repr__(self) -> str:
        where = self.folder or "in memory"
        return f"Session({self.slide.path.name!r}, {where}, {len(self._cache)} products)"

    # ------------------------------------------------------------- lifetime
    def close(self) -> None:
        """Close the slide if the session opened it."""
        if self._owns_slide:
            self.slide.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -------------------------------------------------------------- the cache
    def product(self, kind: str, key: Hashable, compute: Callable[[], T]) -> T:
        """The ``kind`` product for ``key``: cached, or computed once and cached."""
        k = (kind, key)
        with self._lock:
            lock = self._locks.setdefault(k, threading.Lock())
        with lock:  # two panels asking at once: the second waits and reuses
            if k not in self._cache:
                value = compute()
                self.computed[kind] += 1
                self._cache[k] = value
            return self._cache[k]

    def forget(self, kind: str | None = None) -> None:
        """Drop cached products (of one kind, or all)."""
        for k in [k for k in self._cache if kind is None or k[0] == kind]:
            del self._cache[k]

    # ------------------------------------------------------------ products
    def tissue(self, params: TissueParams | None = None) -> TissueMask:
        """The tissue mask for ``params`` (default: :attr:`tissue_params`), computed once."""
        from histoscope.tissue import tissue_mask

        p = params if params is not None else self.tissue_params
        return self.product("tissue", p, lambda: tissue_mask(self.slide, p))

    def grid(self, mpp: float, tile_size: int, min_tissue: float = 0.5,
             tissue: TissueParams | None = None) -> TileGrid:  # fmt: skip
        """Tissue tiles at ``mpp`` µm/px and ``tile_size`` px over the session's tissue."""
        from histoscope.tissue import tile_grid

        p = tissue if tissue is not None else self.tissue_params
        key = (float(mpp), int(tile_size), float(min_tissue), p)
        return self.product("grid", key, lambda: tile_grid(self.slide, self.tissue(p), mpp,
                                                           tile_size, min_tissue))  # fmt: skip

    def model(self, checkpoint: str | os.PathLike, family: str | None) -> tuple[Any, ModelCard]:
        """``(model, card)`` of a checkpoint, loaded once, its family checked every time."""
        from histoscope.checkpoints import load_checkpoint
        from histoscope.errors import CheckpointError

        path = Path(checkpoint)
        try:
            stat = path.stat()
        except OSError:
            stat = None
        key = (str(path.resolve()), stat.st_mtime_ns if stat else None, stat.st_size if stat else 0)
        loaded = self.product("model", key, lambda: load_checkpoint(path, family=family))
        card = loaded[1]
        if family is not None and card.family != family:  # cached under another family
            raise CheckpointError(
                f"{path}: a {card.family!r} checkpoint, but a {family!r} one is needed"
            )
        return loaded

    def feature_path(self, fm: FeatureModel, grid: TileGrid) -> Path | None:
        """Where the session keeps the feature table of ``fm`` over ``grid`` (None: in memory)."""
        if self.folder is None:
            return None
        return self.folder / "features" / f"{_table_key(fm, grid, self.slide_id)}.h5"

    def iter_features(
        self,
        fm: FeatureModel,
        grid: TileGrid,
        engine: EngineParams | None = None,
        *,
        near: tuple[float, float] | None = None,
        on_batch: Callable[[np.ndarray, np.ndarray], Any] | None = None,
    ) -> Generator[tuple[int, int], bool | None, FeatureTable]:
        """The feature table of ``fm`` over ``grid``: cached, read from the folder, or encoded.

        A generator (yields ``(done, total)`` tiles while encoding; send
        ``False`` to stop). A table cut short by cancellation is returned but
        neither cached nor written. ``on_batch(grid_indices, features)`` sees
        each batch as it is encoded (not called for a table read back).
        """
        from histoscope.features import FeatureTable, table_attrs

        key = _table_key(fm, grid, self.slide_id)
        cached = self._cache.get(("features", key))
        if cached is not None:
            return cached
        path = self.feature_path(fm, grid)
        if path is not None and path.is_file():
            table = FeatureTable.load(path)
            if len(table.coords) == len(grid) and np.array_equal(table.coords, grid.coords):
                self._cache[("features", key)] = table
                return table
        from histoscope.engine import iter_tiles

        if len(grid) == 0:
            raise ValueError(f"{self.slide.path}: no tissue tiles to encode")
        out = yield from iter_tiles(fm.module, self.slide, grid, fm.spec, engine, near=near,
                                    on_batch=on_batch)  # fmt: skip
        feats = np.asarray(out.outputs, np.float32).reshape(len(grid), -1)
        table = FeatureTable(feats, grid.coords, table_attrs(grid, fm, name=self.slide.path.name),
                             done=out.done)  # fmt: skip
        if out.cancelled or not out.done.all():
            return table
        self.computed["features"] += 1
        self._cache[("features", key)] = table
        if path is not None:
            try:
                table.save(path)
            except OSError as exc:  # keep the result; only the cache copy is lost
                import warnings

                from histoscope.errors import HistoScopeWarning

                warnings.warn(f"feature table not kept in {path.parent}: {exc}",
                              HistoScopeWarning, stacklevel=2)  # fmt: skip
        return table

    # ------------------------------------------------------------ on disk
    @property
    def fingerprint(self) -> str:
        """A hash of the slide's pixels (smallest level), size and µm/px."""
        return self.product("fingerprint", None, lambda: slide_fingerprint(self.slide))

    def _manifest(self) -> dict[str, Any]:
        from histoscope.session_store import read_manifest

        doc = read_manifest(self.folder)
        features = sorted(str(p.relative_to(self.folder))
                          for p in (self.folder / "features").glob("*.h5"))  # fmt: skip
        return {**doc, "slide": str(self.slide.path), "fingerprint": self.fingerprint,
                "mpp": self.slide.mpp, "features": features}  # fmt: skip

    def save_manifest(self) -> Path | None:
        """Write ``session.json`` (slide, fingerprint, products kept on disk), if there is a folder."""
        if self.folder is None:
            return None
        from histoscope.session_store import folder_lock, write_manifest

        _ = self.fingerprint  # computed (once) before taking the lock
        with folder_lock(self.folder):  # read-modify-write: another save may change layers_dir
            return write_manifest(self.folder, self._manifest())

    def save_layers(self, layers: list, slide_display: dict[str, Any] | None = None) -> Path:
        """Save napari layer data (in viewer order) so :meth:`layers` restores them exactly.

        Raises
        ------
        SessionError
            If the session has no folder.
        """
        from histoscope.session_store import folder_lock, save_layers

        if self.folder is None:
            raise SessionError(f"the session of {self.slide.path.name} is in memory; open it "
                               "with folder=... to save its layers")  # fmt: skip
        _ = self.fingerprint  # computed (once) before taking the lock
        with folder_lock(self.folder):  # the manifest read and the new one written as one
            return save_layers(self.folder, layers, self._manifest(), slide_display)

    def layers(self) -> list:
        """The layers saved in the session folder, as ``(data, kwargs, type)`` in viewer order."""
        from histoscope.session_store import load_layers

        return [] if self.folder is None else load_layers(self.folder)[1]

    def slide_display(self) -> dict[str, Any]:
        """The slide layer's saved display settings (opacity, visibility, ...)."""
        from histoscope.session_store import read_manifest

        return {} if self.folder is None else dict(read_manifest(self.folder).get("slide_display")
                                                   or {})  # fmt: skip

    def check_slide(self) -> None:
        """Refuse a session folder saved for another slide (its fingerprint differs)."""
        from histoscope.session_store import read_manifest

        if self.folder is None:
            return
        saved = read_manifest(self.folder).get("fingerprint")
        if saved and saved != self.fingerprint:
            raise SessionError(
                f"session folder {self.folder} belongs to another slide (saved for "
                f"{read_manifest(self.folder).get('slide')}, whose pixels differ from "
                f"{self.slide.path}); open the session with another folder=..."
            )


def slide_fingerprint(slide) -> str:
    """A short hash of a slide's pixels (its smallest level), size and µm/px."""
    h = hashlib.sha256(repr((tuple(slide.shape), slide.mpp)).encode())
    h.update(np.ascontiguousarray(np.asarray(slide.levels[-1])).tobytes())
    return h.hexdigest()[:20]


def _table_key(fm: FeatureModel, grid: TileGrid, slide_id: str = "") -> str:
    """File-safe key of a feature table: the slide, the encoder's weights and the grid."""
    g = grid.to_dict()
    text = json.dumps([slide_id, fm.descriptor.get("weights_sha256"), g,
                       hashlib.sha1(grid.coords.tobytes()).hexdigest()])  # fmt: skip
    digest = hashlib.sha1(text.encode()).hexdigest()[:16]
    name = str(fm.descriptor.get("backbone") or "encoder")
    return f"{name}_{g['tile_size']}px_{g['mpp']:g}mpp_{digest}"


def open_session(
    path_or_slide: str | os.PathLike | Slide | Session,
    folder: str | os.PathLike | None = None,
    *,
    mpp: float | None = None,
    in_memory: bool = False,
) -> Session:
    """A :class:`Session` for a slide path or an open slide.

    Parameters
    ----------
    path_or_slide
        A slide file or folder (opened here and closed with the session), an
        open :class:`Slide`, or a session (returned as it is).
    folder
        Where the session keeps large products; default ``<slide>.histoscope/``
        beside the slide (for a slide without a file on disk: in memory).
    mpp
        µm/px for images that carry none.
    in_memory
        Keep everything in memory (no folder).

    Raises
    ------
    SlideError
        If the slide cannot be opened.
    SessionError
        If the folder cannot be written (the message names a way out).
    """
    if isinstance(path_or_slide, Session):
        return path_or_slide
    owns = not isinstance(path_or_slide, Slide)
    slide = open_slide(path_or_slide, mpp=mpp) if owns else path_or_slide
    if folder is None and not in_memory and slide.path.exists():
        folder = default_folder(slide.path)
    try:
        session = Session(slide, None if in_memory else folder)
        session.check_slide()
    except SessionError:
        if owns:
            slide.close()
        raise
    session._owns_slide = owns
    return session
