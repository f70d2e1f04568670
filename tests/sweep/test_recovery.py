"""Finding the trials whose process died: on this machine by its pid, elsewhere not at all (heartbeats do)."""

from __future__ import annotations

import time
import uuid

import optuna
import pytest
from fixtures import dead_pid
from sweep_helpers import POSTGRES, drop_postgres_study, needs_postgres

from tinyopt.core import worker as workers
from tinyopt.core.record import FAIL_REASON, RUN_ID, WORKER
from tinyopt.stores import storage
from tinyopt.sweep import recovery


class _Tracker:
    """Records which MLflow runs recovery closes; ``open_runs`` are the runs still RUNNING, by trial number."""

    def __init__(self, open_runs=None):
        self.closed = []
        self.open_runs = dict(open_runs or {})

    def close_run(self, run_id, state, reason=None):
        self.closed.append((run_id, reason))
        return True

    def open_trial_runs(self):
        return self.open_runs


@pytest.fixture(params=["sqlite", "journal"])
def opened(request, tmp_path):
    """Storages without heartbeats: only the process table tells a dead worker."""
    return storage.open_storage({"sqlite": f"sqlite:///{tmp_path}/tinyopt.db",
                                 "journal": f"journal:{tmp_path}/tinyopt.journal"}[request.param])


def _running(study, worker, run_id="run-1"):
    trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    trial.set_user_attr(WORKER, worker)
    trial.set_user_attr(RUN_ID, run_id)
    return trial


def test_a_dead_workers_trial_is_failed_retried_and_its_run_closed(opened):
    study = optuna.create_study(study_name="scratch", storage=opened, direction="maximize")
    tracker = _Tracker()
    pid = dead_pid()
    dead = _running(study, {**workers.identity(), "pid": pid}, "run-dead")
    alive = _running(study, workers.identity(), "run-alive")
    messages = recovery.recover(study, opened, tracker)
    trials = study.get_trials(deepcopy=False)
    assert [t.state.name for t in trials] == ["FAIL", "RUNNING", "WAITING"]
    assert trials[2].params == trials[dead.number].params and trials[2].system_attrs["failed_trial"] == dead.number
    assert messages == [f"recovered trial {dead.number}: left RUNNING (its worker, pid {pid} on "
                        f"{workers.identity()['host']}, is gone); failed, queued again as trial 2"]
    assert [run for run, _ in tracker.closed] == ["run-dead"] and "is gone" in tracker.closed[0][1]
    assert recovery.recover(study, opened, tracker) == []  # nothing twice
    assert alive.number == 1


@needs_postgres
def test_a_trial_failed_by_a_heartbeat_check_has_its_run_closed_there(tmp_path):
    """Optuna fails a trial whose heartbeat stopped in a living worker, before its next trial: its run closes then."""
    from mlflow import MlflowClient

    from tinyopt.track.tracking import Tracker

    name = f"heartbeat-{uuid.uuid4().hex[:8]}"
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", name, "scratch")
    opened = storage.open_storage(POSTGRES, heartbeat_interval=1,
                                  on_stale=lambda trial: recovery.close_stale(tracker, trial, 2))
    try:
        study = optuna.create_study(study_name=name, storage=opened, direction="maximize")
        run_id = MlflowClient(tracker.tracking_uri).create_run(tracker.experiment_id).info.run_id
        with pytest.warns(UserWarning, match="Heartbeat"):  # Optuna's: we ask outside optimize, as a worker would not
            trial = _running(study, {**workers.identity(), "host": "another-machine"}, run_id)
        opened.record_heartbeat(trial._trial_id)
        time.sleep(3)  # two intervals and more without a heartbeat
        with storage.optuna_experimental():
            optuna.storages.fail_stale_trials(study)  # what Optuna runs before each trial of a living worker
        assert [t.state.name for t in study.get_trials(deepcopy=False)] == ["FAIL", "WAITING"]
        run = MlflowClient(tracker.tracking_uri).get_run(run_id)
        assert run.info.status == "FAILED" and "heartbeat" in run.data.tags[FAIL_REASON]
    finally:
        drop_postgres_study(name)


@pytest.mark.parametrize("preempted_by", [None, "SIGTERM"])
def test_a_worker_killed_after_ignoring_the_signal_has_its_trial_failed_and_queued_again_if_preempted(
        opened, preempted_by):
    study = optuna.create_study(storage=opened, study_name="stuck", direction="maximize")
    trial = study.ask({"lr": optuna.distributions.FloatDistribution(0.001, 0.1)})
    trial.set_user_attr(RUN_ID, "run-of-0")
    tracker = _Tracker()
    recovery.fail_interrupted(study, opened, tracker, [trial.number], "interrupted by SIGTERM", preempted_by)
    trials = study.get_trials(deepcopy=False)
    assert trials[0].state.name == "FAIL" and trials[0].user_attrs[FAIL_REASON] == "interrupted by SIGTERM"
    assert tracker.closed == [("run-of-0", "interrupted by SIGTERM (its worker did not stop and was killed)")]
    if preempted_by is None:  # the user stopped the sweep
        assert len(trials) == 1
    else:
        assert [t.state.name for t in trials] == ["FAIL", "WAITING"] and trials[1].params == trials[0].params
    assert recovery.requeue_preempted(study, [0]) == ([] if preempted_by is None else
                                                      ["trial 0 was stopped by SIGTERM and queued again as trial 2: "
                                                       "the next `tinyopt sweep` of the study resumes it from its "
                                                       "last checkpoint"])
