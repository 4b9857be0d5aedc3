"""The embedded default checkpoints ship with the package and load: their absence fails, never skips."""

from __future__ import annotations

import pytest

from histoscope import tasks
from histoscope._data import sample_data_path


@pytest.mark.parametrize("name", [n for n in tasks.available() if tasks.get(n).family])
def test_every_task_default_checkpoint_is_embedded_and_of_its_family(name):
    from histoscope.checkpoints import load_checkpoint

    spec = tasks.get(name)
    path = sample_data_path(spec.default_checkpoint)
    assert path is not None, f"{spec.default_checkpoint} is missing from sample_data/"
    _, card = load_checkpoint(path, family=spec.family)
    assert card.metrics, f"{path.name}: its card records no held-out metrics"
