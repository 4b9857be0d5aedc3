"""The napari side of ``histoscope demo``: a slide with every HistoScope widget docked."""

from __future__ import annotations

import time
from pathlib import Path

#: Dock widgets shown by the demo, as named in napari.yaml.
DEMO_WIDGETS = ("Slide", "IHC measurement", "IHC co-assessment (iSight)")


def show_slide(slide_path: Path, screenshot: Path | None = None, settle_s: float = 3.0) -> None:
    """Open ``slide_path`` in napari with the HistoScope widgets docked.

    With ``screenshot`` the window is rendered to that PNG and closed;
    otherwise napari's event loop runs until the user closes the window.
    """
    import napari
    from qtpy.QtWidgets import QApplication

    viewer = napari.Viewer(title="HistoScope demo", show=True)
    viewer.window._qt_window.resize(1600, 1000)
    viewer.open(str(slide_path), plugin="napari-histoscope")
    for name in DEMO_WIDGETS:
        viewer.window.add_plugin_dock_widget("napari-histoscope", name)
    viewer.scale_bar.visible = True
    viewer.reset_view()
    if screenshot is None:
        napari.run()
        return
    deadline = time.monotonic() + settle_s
    while time.monotonic() < deadline:  # let the pyramid tiles arrive
        QApplication.processEvents()
        time.sleep(0.05)
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    viewer.screenshot(str(screenshot), canvas_only=False)
    viewer.close()
    print(f"screenshot: {screenshot}")
