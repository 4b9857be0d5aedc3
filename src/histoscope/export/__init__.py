"""Writers for what HistoScope produces; every file is written atomically."""

from histoscope.atomic import atomic_path, atomic_write_bytes, atomic_write_text

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text"]
