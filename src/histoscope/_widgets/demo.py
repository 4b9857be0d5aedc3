"""The napari side of ``histoscope demo``: a slide, every HistoScope widget, the main job run."""

from __future__ import annotations

import time
from pathlib import Path

#: The dock raised in front of the others (all HistoScope docks open, as tabs).
DEMO_WIDGET = "Tumour map"


def _settle(seconds: float) -> None:
    from qtpy.QtWidgets import QApplication

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        QApplication.processEvents()
        time.sleep(0.05)


def widget_names() -> list[str]:
    """Every HistoScope dock widget, as named in napari.yaml (in its order)."""
    from npe2 import PluginManager

    manifest = PluginManager.instance().get_manifest("napari-histoscope")
    return [w.display_name for w in manifest.contributions.widgets]


def show_slide(
    slide_path: Path,
    screenshot: Path | None = None,
    settle_s: float = 3.0,
    window: tuple[int, int] = (1600, 1000),
) -> None:
    """Open ``slide_path`` in napari with every HistoScope dock (as tabs) and its tumour map run.

    The tumour heatmap runs on the embedded default checkpoint (tiles in view
    first). ``window`` is the window's ``(width, height)`` in pixels. With
    ``screenshot`` the window is rendered to that PNG once the map is complete
    and then closed; otherwise napari's event loop runs until the user closes
    the window.
    """
    import napari

    viewer = napari.Viewer(title="HistoScope demo", show=True)
    viewer.window._qt_window.resize(*window)
    viewer.open(str(slide_path), plugin="napari-histoscope")
    docks = {}
    for name in widget_names():
        docks[name] = viewer.window.add_plugin_dock_widget("napari-histoscope", name, tabify=True)
    dock, tumour = docks[DEMO_WIDGET]
    dock.raise_()
    viewer.scale_bar.visible = True
    viewer.reset_view()
    if tumour.checkpoint.text():
        tumour.run()
    else:
        print("no embedded tumour checkpoint: showing the slide only")
    if screenshot is None:
        napari.run()
        return
    deadline = time.monotonic() + 600
    while tumour.worker is not None and time.monotonic() < deadline:
        _settle(0.2)
    _settle(settle_s)  # let the pyramid tiles arrive
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    viewer.screenshot(str(screenshot), canvas_only=False)
    print(f"{tumour.status.text()}\nscreenshot: {screenshot}")
    viewer.close()
