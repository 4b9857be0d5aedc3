"""Pure-torch models: the backbone registry and the model families.

Importing this package imports torch; ``histoscope`` itself never imports it
eagerly.
"""

from __future__ import annotations

from histoscope.models.backbones import (
    Backbone,
    InputSpec,
    create_backbone,
    list_backbones,
    read_state_dict,
    register_backbone,
)
from histoscope.models.tile_classifier import TileClassifier

__all__ = [
    "Backbone",
    "InputSpec",
    "TileClassifier",
    "create_backbone",
    "list_backbones",
    "read_state_dict",
    "register_backbone",
]
