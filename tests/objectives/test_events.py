"""The events a sweep sends its front end."""

from __future__ import annotations

import inspect

from tinyopt.objectives.events import Events, QuietEvents


def test_the_quiet_listener_hears_every_event_with_the_same_arguments():
    events = [name for name in vars(Events) if not name.startswith("_")]
    assert events == ["sweep_started", "trial_started", "epoch_ended", "trial_ended"]
    for name in events:
        assert inspect.signature(getattr(QuietEvents, name)) == inspect.signature(getattr(Events, name)), name
        assert getattr(QuietEvents(), name)(*[None] * (len(inspect.signature(getattr(Events, name)).parameters) - 1)) \
            is None
