"""Qt dock widgets. The only part of HistoScope that imports Qt or magicgui."""

from histoscope._widgets.slide import SlideWidget

__all__ = ["SlideWidget"]
