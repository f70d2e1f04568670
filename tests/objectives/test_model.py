"""The objective of the model approaches, without training: a run per trial closed as the trial ends, run names."""

from __future__ import annotations

import dataclasses
import os

import optuna
import pytest

from tinyopt.core import record
from tinyopt.core.config import load_config
from tinyopt.core.errors import ConfigError, TrialError
from tinyopt.objectives.model import TrackedObjective, TrialFailed, headline, system_metrics

SCRATCH = load_config("scratch")


def test_headline_is_study_run_name_in_its_order():
    params = {"learning_rate": 0.01, "augment": "flip", "stages": 3, "dropout": 0.2, "optimizer": "sgd"}
    assert list(headline(SCRATCH, params).items()) == [("stages", 3), ("optimizer", "sgd"), ("learning_rate", 0.01),
                                                       ("augment", "flip")]  # width is not among the params
    assert headline(load_config("ensemble"), {"weight_a-0": 0.5}) == {}  # no study.run_name


@pytest.mark.parametrize("approach, setting, device, logs", [
    ("scratch", "auto", "cpu", False), ("scratch", "auto", "NVIDIA H100 (GPU 0)", True),
    ("scratch", True, "cpu", True), ("finetune", False, "NVIDIA H100 (GPU 0)", False), ("ensemble", None, "gpu", False),
])
def test_system_metrics_follow_the_setting_auto_meaning_with_a_gpu(approach, setting, device, logs):
    config = load_config(approach)
    if config.train is not None:
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, system_metrics=setting))
    assert system_metrics(config, device) is logs


class _Run:
    run_id = "run-1"

    def __init__(self):
        self.ended, self.texts, self.metrics = None, [], {}

    def end(self, state, reason=None):
        self.ended = (state, reason)

    def log_text(self, text, name):
        self.texts.append(name)

    def log_metrics(self, metrics, step=0):
        self.metrics.update(metrics)


class _Tracker:
    def __init__(self):
        self.run, self.started = _Run(), None

    def start_trial(self, number, params, config, tags, **kwargs):
        self.started = {"number": number, "params": params, "tags": tags, **kwargs}
        return self.run

    def run_url(self, run_id):
        return f"http://ui/#/runs/{run_id}"


class _Objective(TrackedObjective):
    def __init__(self, outcome):
        super().__init__(SCRATCH, _Tracker(), None, "cpu")
        self.outcome = outcome

    def choose(self, trial):
        return {"stages": trial.suggest_int("stages", 2, 2), "epochs": 3}

    def evaluate(self, trial, params, run):
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome


def _run(objective):
    study = optuna.create_study(direction="maximize")
    study.optimize(objective, n_trials=1, catch=(TrialFailed,))
    return study.trials[0]


def test_a_complete_trial_records_its_run_worker_and_params():
    objective = _Objective(0.75)
    trial = _run(objective)
    assert trial.state.name == "COMPLETE" and trial.value == 0.75
    attrs = trial.user_attrs
    assert attrs[record.RUN_ID] == "run-1" and attrs[record.RUN_URL] == "http://ui/#/runs/run-1"
    assert attrs[record.PARAMS] == {"stages": 2, "epochs": 3} and attrs[record.WORKER]["pid"] == os.getpid()
    assert objective.tracker.run.ended == ("COMPLETE", None)
    assert record.TRIAL_SECONDS in objective.tracker.run.metrics
    started = objective.tracker.started
    assert started["searched"] == {"stages": 2} and started["headline"] == {"stages": 2}
    assert started["tags"][record.TAG_DEVICE] == "cpu" and started["system_metrics"] is False


def test_a_trial_error_fails_the_trial_with_its_reason_and_the_sweep_goes_on():
    objective = _Objective(TrialError("loss became NaN\nat epoch 3"))
    trial = _run(objective)
    assert trial.state.name == "FAIL"
    assert trial.user_attrs[record.FAIL_REASON] == "TrialError: loss became NaN"
    assert objective.tracker.run.ended == ("FAIL", "TrialError: loss became NaN")
    assert objective.tracker.run.texts == [record.TRACEBACK_FILE]


def test_an_unexpected_error_fails_only_the_trial():
    trial = _run(_Objective(MemoryError()))
    assert trial.state.name == "FAIL" and trial.user_attrs[record.FAIL_REASON] == "MemoryError"


def test_any_other_tinyopt_error_stops_the_sweep_after_closing_the_run():
    objective = _Objective(ConfigError("space.epochs: got 0"))
    with pytest.raises(ConfigError, match="space.epochs: got 0"):
        _run(objective)
    assert objective.tracker.run.ended == ("FAIL", "ConfigError: space.epochs: got 0")


def test_a_pruned_trial_run_says_where_and_why_it_stopped_and_how_long_it_ran():
    objective = _Objective(optuna.TrialPruned("pruned after epoch 2 of 3 by MedianPruner"))
    trial = _run(objective)
    assert trial.state.name == "PRUNED" and record.SECONDS in trial.user_attrs
    assert objective.tracker.run.ended == ("PRUNED", "pruned after epoch 2 of 3 by MedianPruner")
    assert record.TRIAL_SECONDS in objective.tracker.run.metrics
