"""A study's objectives: names and directions read from the study, shown and ranked alike everywhere.

A study of one objective reads as it always did; ``study.objectives = ["selection_top1", "latency_ms"]``
makes two, the first ranking the trials, and a trial of the Pareto front keeps its model.
"""

from __future__ import annotations

import optuna
import pytest

from tinyopt.core import record
from tinyopt.core.config import load_config
from tinyopt.core.objective import (
    LATENCY,
    LOG_LOSS,
    TOP1,
    Objective,
    dominates,
    keeps_model,
    objectives_of,
    of_config,
    of_setting,
    of_study,
)

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


def _two_objective_study(points):
    """A study of selection top-1 and latency with one complete trial per (top-1, latency) point."""
    study = optuna.create_study(directions=["maximize", "minimize"])
    with pytest.warns(optuna.exceptions.ExperimentalWarning):
        study.set_metric_names([record.SELECTION_TOP1, record.LATENCY_MS])
    for values in points:
        study.add_trial(optuna.trial.create_trial(values=list(values)))
    return study


def test_a_study_of_two_objectives_names_both_and_ranks_by_the_first():
    config = load_config("finetune", overrides=['study.objectives=["selection_top1", "latency_ms"]'])
    wanted = of_config(config)
    assert [(o.name, o.direction, o.index) for o in wanted] == [(record.SELECTION_TOP1, "maximize", 0),
                                                                (record.LATENCY_MS, "minimize", 1)]
    study = _two_objective_study([(0.5, 3.0), (0.7, 9.0), (0.7, 4.0)])
    assert objectives_of(study) == wanted and of_study(study) == TOP1
    assert [t.number for t in of_study(study).ranked(study.trials)] == [1, 2, 0]  # a tie: the earlier trial first
    latency = objectives_of(study)[1]
    assert latency.label == "latency ms" and [latency.of(t) for t in study.trials] == [3.0, 9.0, 4.0]
    assert of_config(load_config("finetune")) == (TOP1,) and of_config(load_config("ensemble")) == (LOG_LOSS,)


@pytest.mark.parametrize("values, others, expected", [
    ((0.7, 3.0), (0.6, 4.0), True),   # better on both
    ((0.7, 4.0), (0.6, 4.0), True),   # as fast and more accurate
    ((0.7, 4.0), (0.7, 4.0), False),  # the same: neither dominates
    ((0.7, 5.0), (0.6, 4.0), False),  # a trade-off
    ((0.6, 4.0), (0.7, 3.0), False),
])
def test_dominance_is_as_good_on_every_objective_and_better_on_one(values, others, expected):
    both = (TOP1, Objective(LATENCY.name, maximize=False, index=1))
    assert dominates(values, others, both) is expected


def test_a_trial_keeps_its_model_in_the_top_by_accuracy_or_on_the_front():
    study = _two_objective_study([(0.5, 3.0), (0.7, 9.0), (0.6, 4.0)])
    both = objectives_of(study)
    assert keeps_model([0.8, 20.0], study.trials, 1, both)  # the most accurate
    assert keeps_model([0.55, 2.0], study.trials, 1, both)  # the fastest: on the front
    assert not keeps_model([0.55, 5.0], study.trials, 1, both)  # dominated by trial 2 (0.6 in 4 ms)
    assert keeps_model([0.55, 5.0], study.trials, 4, both)  # fewer complete trials than kept models
    # One objective: the top `keep` by accuracy only, ties to the trials that ended first.
    single = optuna.create_study(direction="maximize")
    for value in (0.5, 0.7, 0.6):
        single.add_trial(optuna.trial.create_trial(value=value))
    assert keeps_model([0.65], single.trials, 2, (TOP1,)) and not keeps_model([0.6], single.trials, 2, (TOP1,))
