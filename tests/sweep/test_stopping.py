"""The callbacks that end a sweep early: failures in a row, --max-trials under the study lock, a deferred signal."""

from __future__ import annotations

import contextlib

import optuna
import pytest

from tinyopt.core import record
from tinyopt.sweep.stopping import FailurePolicy, TrialCap


def _study():
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(direction="maximize")


def _fail(trial):
    trial.set_user_attr(record.FAIL_REASON, f"broken {trial.number}")
    raise ValueError("broken")


def test_failure_policy_stops_after_the_limit_in_a_row_and_names_the_last_reason():
    study = _study()
    policy = FailurePolicy(3)
    study.optimize(_fail, n_trials=10, callbacks=[policy], catch=(ValueError,))
    assert policy.stopped and len(study.trials) == 3
    assert policy.last_reason == "broken 2"


def test_failure_policy_counts_only_failures_in_a_row():
    study = _study()
    policy = FailurePolicy(2)
    outcomes = iter([False, True, False, True, False])

    def sometimes(trial):
        if not next(outcomes):
            _fail(trial)
        return 1.0

    study.optimize(sometimes, n_trials=5, callbacks=[policy], catch=(ValueError,))
    assert not policy.stopped and len(study.trials) == 5


@pytest.mark.parametrize("limit, started", [(None, 6), (2, 2), (4, 4)])
def test_trial_cap_starts_no_trial_past_the_limit_and_holds_the_lock_only_between_trials(limit, started):
    study = _study()
    held = []

    @contextlib.contextmanager
    def lock():
        held.append(True)
        yield
        held.pop()

    cap = TrialCap(study, limit, lock)

    def objective(trial):
        cap.release()
        assert not held  # a running trial never holds the study lock
        return 1.0

    if cap.acquire():
        study.optimize(objective, n_trials=6, callbacks=[cap])
    cap.release()
    assert len(study.trials) == started and not held
