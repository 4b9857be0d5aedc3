"""Tables of objects (cells, tiles, expression bins) as AnnData ``.h5ad``.

One row of ``obs`` per object with its per-object columns, positions in
``obsm["spatial"]`` as ``(x, y)`` in µm (what scanpy / squidpy plot), an
optional ``X`` with its ``var`` (e.g. expression or features), and the
provenance and summary in ``uns``. Written atomically (temporary file beside
the target, fsync, rename). anndata and pandas are imported only when a table
is written.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from histoscope.atomic import atomic_path

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["as_categorical", "h5_safe", "write_h5ad"]


def h5_safe(value: Any) -> Any:
    """``value`` as what every anndata >= 0.10 writes into ``uns``.

    Dicts keep their structure (keys become ``str``; ``None`` values are left
    out, as HDF5 has no null); lists of numbers or of strings become arrays;
    lists of dicts become dicts keyed ``"0"``, ``"1"``, ...; other lists
    (mixed or ragged) become their JSON text. Enums, paths and numpy scalars
    become plain values; anything else (a ``str`` subclass such as torch's
    version) becomes its text.
    """
    if isinstance(value, Mapping):
        return {str(k): h5_safe(v) for k, v in value.items() if v is not None}
    if isinstance(value, Enum):
        return h5_safe(value.value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray) and value.dtype != object:
        return value
    if isinstance(value, Sequence | np.ndarray) and not isinstance(value, str | bytes):
        items = [h5_safe(v) for v in value]
        if items and all(isinstance(v, dict) for v in items):
            return {str(i): v for i, v in enumerate(items)}
        if all(isinstance(v, str) for v in items):
            return np.asarray(items, dtype=object) if items else np.zeros(0)
        try:
            arr = np.asarray(items)
        except ValueError:  # ragged
            arr = np.asarray(None)
        if arr.dtype.kind in "biuf":
            return arr
        return json.dumps(items, default=str)
    if isinstance(value, bool | int | float):
        return value
    return str(value)  # str subclasses (e.g. torch's version), anything else as text


def as_categorical(codes: np.ndarray, names: Sequence[str]) -> pd.Categorical:
    """Integer ``codes`` (``0 .. len(names) - 1``) as an ordered categorical of ``names``.

    E.g. IHC scores ``0..3`` as ``"0" < "1+" < "2+" < "3+"``, so
    ``adata.obs["score"].value_counts()`` lists every class, empty ones too.
    """
    import pandas as pd

    return pd.Categorical.from_codes(np.asarray(codes, dtype=np.int64), categories=list(names),
                                     ordered=True)  # fmt: skip


def _obs(table: pd.DataFrame | Mapping[str, Any]) -> pd.DataFrame:
    import pandas as pd

    obs = table.copy() if isinstance(table, pd.DataFrame) else pd.DataFrame(dict(table))
    if len(obs) == 0 or not all(isinstance(i, str) for i in obs.index):
        obs.index = pd.Index([str(i) for i in range(len(obs))], dtype=object)
    obs.columns = [str(c) for c in obs.columns]
    return obs


def write_h5ad(
    path: str | os.PathLike,
    table: pd.DataFrame | Mapping[str, Any],
    spatial_um: np.ndarray,
    uns: Mapping[str, Any] | None = None,
    var: pd.DataFrame | Sequence[str] | None = None,
    X: np.ndarray | None = None,  # noqa: N803 - AnnData's name
) -> Path:
    """Write a table of objects as an AnnData ``.h5ad``, atomically.

    Parameters
    ----------
    path
        Target file, conventionally ending in ``.h5ad``.
    table
        One row per object: a DataFrame or a dict of equal-length columns;
        becomes ``obs`` (index ``"0"``, ``"1"``, ... unless already strings).
    spatial_um
        ``(N, 2)`` object positions ``(x, y)`` in slide µm; becomes
        ``obsm["spatial"]`` (float64).
    uns
        Provenance, summary, parameters: JSON-able data, stored via
        :func:`h5_safe`.
    var
        Names of ``X``'s columns, or a DataFrame indexed by them.
    X
        ``(N, V)`` values per object (e.g. expression), or ``None`` for an
        empty ``(N, 0)`` matrix.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    import anndata as ad
    import pandas as pd

    obs = _obs(table)
    n = len(obs)
    spatial = np.asarray(spatial_um, dtype=np.float64)
    if n == 0 and spatial.size == 0:
        spatial = spatial.reshape(0, 2)
    if spatial.shape != (n, 2):
        raise ValueError(f"spatial_um must be ({n}, 2) (x, y) µm, not {spatial.shape}")
    if X is None and var is not None:
        raise ValueError("var names the columns of X: give X too")
    if var is not None and not isinstance(var, pd.DataFrame):
        var = pd.DataFrame(index=pd.Index([str(v) for v in var]))
    adata = ad.AnnData(X=None if X is None else np.asarray(X), obs=obs, var=var,
                       obsm={"spatial": spatial}, uns=h5_safe(dict(uns or {})))  # fmt: skip
    path = Path(path)
    with atomic_path(path, ".h5ad") as tmp:
        adata.write_h5ad(tmp)
    return path
