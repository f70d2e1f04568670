"""A study's objective: one name, one direction, read from the study, shown and ranked alike everywhere."""

from __future__ import annotations

import optuna
import pytest

from tinyopt.core import record
from tinyopt.core.objective import LOG_LOSS, TOP1, Objective, of_setting, of_study

SCORES = {record.SELECTION_TOP1: 0.57, record.SELECTION_LOG_LOSS: 1.755}


def _study(direction: str, names: list[str] | None):
    study = optuna.create_study(direction=direction)
    if names:
        with pytest.warns(optuna.exceptions.ExperimentalWarning):
            study.set_metric_names(names)
    return study


@pytest.mark.parametrize("direction, names, expected, label, value", [
    ("maximize", None, TOP1, "selection top-1", 0.57),
    ("maximize", [record.SELECTION_TOP1], TOP1, "selection top-1", 0.57),
    ("minimize", [record.SELECTION_LOG_LOSS], LOG_LOSS, "selection log loss", 1.755),
    # An ensemble study made before the direction was stored: read, named and valued as it was made.
    ("maximize", ["minus_selection_log_loss"], Objective("minus_selection_log_loss", True),
     "minus selection log loss", -1.755),
])
def test_a_study_names_its_objective(direction, names, expected, label, value):
    objective = of_study(_study(direction, names))
    assert objective == expected and objective.label == label
    assert objective.value_of(SCORES) == value
    assert objective.is_loss == ("loss" in label)


def test_a_new_study_minimises_the_log_loss_and_maximises_top1():
    assert of_setting("log_loss") == LOG_LOSS and LOG_LOSS.direction == "minimize"
    assert of_setting("top1") == TOP1 == of_setting(None) and TOP1.direction == "maximize"
    assert LOG_LOSS.heading == "selection log loss (lower is better)"
    assert TOP1.heading == "selection top-1 (higher is better)"
    assert LOG_LOSS.best_metric == "best_selection_log_loss" and TOP1.best_metric == record.BEST_SO_FAR


def test_ranking_puts_the_best_first_for_either_direction():
    study = optuna.create_study()
    for value in (0.3, 0.5, 0.1, 0.5):
        study.enqueue_trial({})
        study.optimize(lambda trial, v=value: v, n_trials=1)
    trials = study.trials
    assert [t.number for t in TOP1.ranked(trials)] == [1, 3, 0, 2]  # a tie: the earlier trial first
    assert [t.number for t in LOG_LOSS.ranked(trials)] == [2, 0, 1, 3]
    assert TOP1.best_so_far([0.3, 0.5, 0.1]) == [0.3, 0.5, 0.5]
    assert LOG_LOSS.best_so_far([0.3, 0.5, 0.1]) == [0.3, 0.3, 0.1]
