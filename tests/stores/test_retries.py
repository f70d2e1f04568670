"""Trials queued again: what they keep of the attempt they replace, how often, and how they are counted."""

from __future__ import annotations

import optuna
import pytest

from tinyopt.core import record
from tinyopt.stores import retries

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _study_with_a_failed_trial():
    study = optuna.create_study(direction="maximize")
    trial = study.ask({"lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)})
    for key, value in {record.PARAMS: {"lr": trial.params["lr"], "epochs": 6}, record.RUN_ID: "run0",
                       record.RUN_URL: "http://mlflow/run0", record.SEED: 7, record.FAIL_REASON: "interrupted",
                       record.WORKER: {"host": "h", "pid": 1, "started": 1.0}, record.PREEMPTED_BY: "SIGTERM",
                       record.MODEL_KEPT: False}.items():
        trial.set_user_attr(key, value)
    trial.report(0.2, 1)
    trial.report(0.3, 2)
    study.tell(trial, state=optuna.trial.TrialState.FAIL)
    return study


def test_a_retry_keeps_the_params_run_seed_and_reports_and_drops_what_described_the_attempt():
    study = _study_with_a_failed_trial()
    with retries.optuna_experimental():
        retries.retry_callback()(study, study.trials[0])
    retry = study.trials[1]
    assert retry.state == optuna.trial.TrialState.WAITING and retry.params == study.trials[0].params
    assert retry.user_attrs == {record.PARAMS: {"lr": study.trials[0].params["lr"], "epochs": 6},
                                record.RUN_ID: "run0", record.RUN_URL: "http://mlflow/run0", record.SEED: 7}
    assert retry.intermediate_values == {1: 0.2, 2: 0.3}  # the pruner's reports: not made twice
    assert study.trials[0].user_attrs[record.WORKER]["pid"] == 1  # the failed trial itself is untouched


def test_a_dead_workers_trial_is_retried_twice_at_most_a_preempted_one_always():
    study = _study_with_a_failed_trial()
    callback = retries.retry_callback()
    for attempt in range(retries.MAX_RETRIES + 1):  # each retry dies too
        callback(study, study.trials[-1])
        if attempt == retries.MAX_RETRIES:
            break
        running = study.ask()
        assert running.number == attempt + 1 and running.params == study.trials[0].params
        study.tell(running, state=optuna.trial.TrialState.FAIL)
    assert len(study.trials) == 1 + retries.MAX_RETRIES  # the third death is the trial's own doing
    assert study.trials[-1].system_attrs["retry_history"] == [0, 1]
    assert retries.requeue(study, 2) == 3  # a preemption: queued again however often it was before
    assert study.trials[3].system_attrs["retry_history"] == [0, 1, 2]


def test_retried_from_names_the_first_trial_of_the_chain():
    study = _study_with_a_failed_trial()
    assert retries.requeue(study, 0) == 1
    running = study.ask()
    assert running.number == 1 and retries.retried_from(running) == 0
    study.tell(running, state=optuna.trial.TrialState.FAIL)
    assert retries.requeue(study, 1) == 2
    again = study.ask()
    assert retries.retried_from(again) == 0 and study.trials[2].system_attrs["retry_history"] == [0, 1]
    fresh = optuna.create_study().ask()
    assert retries.retried_from(fresh) is None


@pytest.mark.parametrize(("states", "standing"), [
    (["COMPLETE", "PRUNED", "RUNNING"], 3),
    (["COMPLETE", "FAIL"], 2),  # a failed trial not queued again counts
])
def test_standing_trials_count_finished_and_running_ones(states, standing):
    study = optuna.create_study()
    for state in states:
        trial = study.ask()
        if state != "RUNNING":
            study.tell(trial, 1.0 if state == "COMPLETE" else None, state=optuna.trial.TrialState[state])
    assert len(retries.standing(study)) == standing


def test_a_trial_queued_again_is_counted_once_through_its_retry():
    study = _study_with_a_failed_trial()
    retries.requeue(study, 0)
    assert retries.standing(study) == []  # the failed trial is replaced; its retry waits
    study.tell(study.ask(), 0.5)
    assert [t.number for t in retries.standing(study)] == [1]
