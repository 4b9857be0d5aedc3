"""Where the embedded default checkpoints live (installed wheel or source checkout)."""

from __future__ import annotations

from pathlib import Path

_PKG = Path(__file__).resolve().parent


def sample_data_path(name: str) -> Path | None:
    """Path of an embedded file in ``sample_data/``, or ``None`` if it is not there."""
    for base in (_PKG / "sample_data", _PKG.parents[1] / "sample_data"):
        p = base / name
        if p.exists():
            return p
    return None
