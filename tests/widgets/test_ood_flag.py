"""The panels' outside-training-data line (one shared helper)."""

from __future__ import annotations

from histoscope._widgets._common import (
    OUTSIDE_TRAINING_TEXT,
    RunControls,
    show_training_data_flag,
)
from histoscope.ood import NO_REFERENCE_MESSAGE


def _summary(outside, score=None, threshold=None, message=""):
    return {"outside_training_data": outside,
            "ood": {"score": score, "threshold": threshold, "outside": outside,
                    "message": message, "features": "tile features", "n_items": 42}}  # fmt: skip


def test_flag_line_red_outside_grey_unknown_hidden_within(qtbot):
    controls = RunControls("Run", lambda: None, lambda: None)
    qtbot.addWidget(controls)
    controls.status.setText("12 of 12 tissue tiles scored.")
    label = show_training_data_flag(controls, _summary(True, 3.21, 1.5))
    assert label.text() == OUTSIDE_TRAINING_TEXT and not label.isHidden()
    assert "3.21 vs threshold 1.5" in label.toolTip() and "42 items" in label.toolTip()
    assert controls.status.text() == "12 of 12 tissue tiles scored."  # status left alone
    # a second result on the same panel reuses the line and hides it when within
    again = show_training_data_flag(controls, _summary(False, 1.1, 1.5))
    assert again is label and label.isHidden() and "1.1 vs threshold 1.5" in label.toolTip()
    show_training_data_flag(controls, _summary(None, message=NO_REFERENCE_MESSAGE))
    assert not label.isHidden() and label.toolTip() == NO_REFERENCE_MESSAGE
    assert label.text() == f"Training-data check not done: {NO_REFERENCE_MESSAGE}"
    assert "e04040" not in label.styleSheet()  # grey, not the red of outside
    show_training_data_flag(controls, _summary(None, message="not judged: run cancelled"))
    assert label.text() == "Training-data check not done: run cancelled"
    show_training_data_flag(controls, _summary(True, 3.21, 1.5))
    assert "e04040" in label.styleSheet() and label.text() == OUTSIDE_TRAINING_TEXT
    show_training_data_flag(controls, {"n_cells": 3})  # a result without the keys
    assert label.isHidden()
