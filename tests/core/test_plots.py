"""The plots tinyopt draws (titles, axes, what they show) and the parameter importances, or why there are none."""

from __future__ import annotations

import numpy as np
import optuna
import pytest

from tinyopt.core import plots
from tinyopt.core.objective import LOG_LOSS, named
from tinyopt.core.record import LATENCY_MS, SCORE_LABELS, SCORES, SELECTION_TOP1

DISTRIBUTIONS = {"learning_rate": optuna.distributions.FloatDistribution(0, 1),
                 "width": optuna.distributions.IntDistribution(1, 8)}


def _study(values, params=None) -> optuna.Study:
    study = optuna.create_study(direction="maximize")
    for i, value in enumerate(values):
        trial_params = params(i) if params else {}
        study.add_trial(optuna.trial.create_trial(value=value, params=trial_params,
                                                  distributions={k: DISTRIBUTIONS[k] for k in trial_params}))
    return study


def test_comparison_chart_groups_the_four_scores_by_row():
    rows = [{"name": "scratch", "selection_top1": 0.5, "selection_top5": 0.8, "test_top1": 0.4, "test_top5": 0.7},
            {"name": "ensemble", "selection_top1": 0.6, "test_top1": None}]
    axis = plots.comparison_chart(rows, "studies side by side").axes[0]
    assert axis.get_title() == "studies side by side" and axis.get_ylabel() == "accuracy"
    assert [t.get_text() for t in axis.get_xticklabels()] == ["scratch", "ensemble"]
    assert [t.get_text() for t in axis.get_legend().get_texts()] == [SCORE_LABELS[key] for key in SCORES]
    heights = [bar.get_height() for bar in axis.patches]  # score by score, a bar per row each
    assert heights == [0.5, 0.6, 0.8, 0.0, 0.4, 0.0, 0.7, 0.0]


def test_history_chart_shows_each_trial_and_the_best_so_far():
    complete = _study([0.3, 0.2, 0.5, 0.4]).get_trials()
    axis = plots.history_chart("scratch", complete[::-1]).axes[0]  # any order: drawn by trial number
    assert axis.get_title() == "optimisation history: scratch"
    assert (axis.get_xlabel(), axis.get_ylabel()) == ("trial", "selection top-1 (higher is better)")
    [best] = axis.get_lines()
    assert best.get_label() == "best so far"
    np.testing.assert_array_equal(best.get_xdata(), [0, 1, 2, 3])
    np.testing.assert_array_equal(best.get_ydata(), [0.3, 0.3, 0.5, 0.5])
    assert all(float(tick).is_integer() for tick in axis.get_xticks())  # trial numbers, never 1.5


def test_history_chart_of_a_loss_says_so_and_keeps_the_lowest():
    complete = _study([1.9, 2.1, 1.7, 1.8]).get_trials()
    axis = plots.history_chart("ensemble", complete, LOG_LOSS).axes[0]
    assert axis.get_ylabel() == "selection log loss (lower is better)"
    np.testing.assert_array_equal(axis.get_lines()[0].get_ydata(), [1.9, 1.9, 1.7, 1.7])


def test_pareto_chart_joins_the_front_in_steps_and_labels_every_trial():
    study = optuna.create_study(directions=["maximize", "minimize"])
    for values in ((0.5, 6.0), (0.7, 5.0), (0.4, 2.0), (0.3, 3.0)):
        study.add_trial(optuna.trial.create_trial(values=list(values)))
    axis = plots.pareto_chart("fast", study.trials, [1, 2], named([SELECTION_TOP1, LATENCY_MS])).axes[0]
    assert axis.get_title() == "selection top-1 against latency ms: fast"
    assert axis.get_xlabel() == "latency ms (lower is better)"
    assert axis.get_ylabel() == "selection top-1 (higher is better)"
    [front] = axis.get_lines()
    assert front.get_label() == "Pareto front" and front.get_drawstyle() == "steps-post"
    np.testing.assert_array_equal(front.get_xdata(), [2.0, 5.0])  # the fastest first
    np.testing.assert_array_equal(front.get_ydata(), [0.4, 0.7])
    assert sorted(text.get_text() for text in axis.texts) == ["0", "1", "2", "3"]


def test_importances_rank_the_params_that_matter_and_sum_to_one():
    rng = np.random.default_rng(0)
    draws = [(float(rng.uniform()), int(rng.integers(1, 9))) for _ in range(12)]
    study = _study([lr + 0.001 * width for lr, width in draws],
                   lambda i: {"learning_rate": draws[i][0], "width": draws[i][1]})
    found, why = plots.importances(study)
    assert why is None and list(found) == ["learning_rate", "width"]
    assert sum(found.values()) == pytest.approx(1.0) and found["learning_rate"] > 0.5


@pytest.mark.parametrize("values, why", [([], "0 complete trial(s), at least 2 are needed"),
                                         ([0.3], "1 complete trial(s), at least 2 are needed"),
                                         ([0.3, 0.5], "no searched param varies across the complete trials")])
def test_importances_say_why_there_are_none(values, why):
    assert plots.importances(_study(values)) == ({}, why)


def test_importance_chart_puts_the_most_important_on_top():
    axis = plots.importance_chart("finetune", {"learning_rate": 0.7, "width": 0.2, "dropout": 0.1}).axes[0]
    assert axis.get_title() == "parameter importance: finetune"
    assert axis.get_xlabel() == f"importance ({plots.IMPORTANCE_METHOD}, normalised)"
    assert [t.get_text() for t in axis.get_yticklabels()] == ["dropout", "width", "learning_rate"]
    assert [bar.get_width() for bar in axis.patches] == [0.1, 0.2, 0.7]


def test_learning_curve_draws_train_and_selection_by_epoch():
    history = {"accuracy": [0.1, 0.3, 0.4], "val_accuracy": [0.2, 0.25, 0.35], "loss": [3.0, 2.0, 1.5],
               "val_loss": [2.5, 2.2, 2.0]}
    accuracy, loss = plots.learning_curve(history).axes
    assert (accuracy.get_title(), loss.get_title()) == ("top-1 accuracy", "loss")
    for axis, metric in ((accuracy, "accuracy"), (loss, "loss")):
        assert axis.get_xlabel() == "epoch"
        train, selection = axis.get_lines()
        assert (train.get_label(), selection.get_label()) == ("train", "selection")
        np.testing.assert_array_equal(train.get_xdata(), [1, 2, 3])
        np.testing.assert_array_equal(train.get_ydata(), history[metric])
        np.testing.assert_array_equal(selection.get_ydata(), history[f"val_{metric}"])
    assert len(plots.learning_curve({"accuracy": [0.1], "loss": [3.0]}).axes[0].get_lines()) == 1  # no selection
