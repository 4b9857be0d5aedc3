"""Writers for what HistoScope produces; every file is written atomically."""

from histoscope.export._atomic import atomic_write_bytes, atomic_write_text

__all__ = ["atomic_write_bytes", "atomic_write_text"]
