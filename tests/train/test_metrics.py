"""Classification scores of known probabilities: top-1, top-5 and log loss, exactly."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tinyopt.train.metrics import scores

PROBS = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4], [0.5, 0.25, 0.25]])
LABELS = np.array([0, 1, 0, 2])
LOG_LOSS = -(math.log(0.7) + math.log(0.8) + math.log(0.3) + math.log(0.25)) / 4


def test_scores_of_known_probabilities():
    found = scores(PROBS, LABELS)
    assert set(found) == {"top1", "top5", "log_loss"}
    assert found["top1"] == 0.5  # samples 0 and 1
    assert found["top5"] == 1.0  # 3 classes: every label is in the top 5
    assert found["log_loss"] == pytest.approx(LOG_LOSS, rel=1e-12)
    assert all(type(value) is float for value in found.values())


def test_rows_that_do_not_sum_to_one_are_renormalised_for_the_log_loss_only():
    halves = scores(PROBS / 2, LABELS)
    assert halves["top1"] == 0.5 and halves["log_loss"] == pytest.approx(LOG_LOSS, rel=1e-9)


def test_top5_counts_a_label_among_the_five_largest():
    probs = np.tile(np.arange(1, 8, dtype=np.float64), (3, 1))  # class 6 largest ... class 0 smallest
    probs /= probs.sum(axis=1, keepdims=True)
    found = scores(probs, np.array([6, 2, 1]))  # ranks 1, 5 and 6
    assert found["top1"] == pytest.approx(1 / 3) and found["top5"] == pytest.approx(2 / 3)


def test_a_zero_probability_is_floored_not_infinite():
    found = scores(np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32), np.array([1, 1]))
    assert found["top1"] == 0.5
    assert found["log_loss"] == pytest.approx(-math.log(1e-12) / 2, rel=1e-6)
