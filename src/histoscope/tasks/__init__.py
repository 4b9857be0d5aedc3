"""Analyses: each is a function ``(slide or image, params, progress) -> Result``.

A Result turns into napari layer data (``to_layers``) and writes itself to
disk (``save``); widgets, the CLI and tests share the same function.
"""
