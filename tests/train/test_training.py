"""Learning-rate schedules, and when early stopping starts watching."""

from __future__ import annotations

import numpy as np

from tinyopt.train.training import early_stopping_start, lr_at_epoch


def _rates(epochs: int, **params) -> list[float]:
    schedule = lr_at_epoch({"learning_rate": 1.0, "epochs": epochs, **params})
    return [schedule(epoch) for epoch in range(epochs)]


def test_cooldown_holds_the_rate_then_falls_linearly_over_the_last_quarter():
    np.testing.assert_allclose(_rates(8, decay="cooldown"), [1, 1, 1, 1, 1, 1, 2 / 3, 1 / 3])
    np.testing.assert_allclose(_rates(1, decay="cooldown"), [0.5])  # one epoch: it is the cooldown
    # After a warmup, the cooldown is a quarter of the epochs that follow it (8 here: 2 epochs).
    np.testing.assert_allclose(_rates(10, decay="cooldown", warmup_epochs=2),
                               [1 / 3, 2 / 3, 1, 1, 1, 1, 1, 1, 2 / 3, 1 / 3])


def test_until_its_cooldown_a_trial_s_rate_does_not_depend_on_its_length():
    """What lets a pruner compare trials of 8 and 32 epochs at epoch 6; a cosine decay does not."""
    short, long = _rates(8, decay="cooldown"), _rates(32, decay="cooldown")
    assert short[:6] == long[:6] == [1.0] * 6
    assert long[23] == 1.0 and long[24] < 1.0 and long[-1] > 0
    assert _rates(8, decay="cosine")[5] < 0.35 < 0.9 < _rates(32, decay="cosine")[5]


def test_early_stopping_watches_a_cooldown_trial_from_its_cooldown_only():
    assert early_stopping_start({"epochs": 32, "decay": "cooldown"}) == 24
    assert early_stopping_start({"epochs": 10, "decay": "cooldown", "warmup_epochs": 2}) == 8
    assert early_stopping_start({"epochs": 32, "decay": "cosine"}) == 0
