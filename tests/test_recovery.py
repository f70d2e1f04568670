"""Finding the trials whose process died: on this machine by its pid, elsewhere not at all (heartbeats do)."""

from __future__ import annotations

import os
import subprocess
import sys

import optuna
import pytest

from tinyopt import recovery, storage
from tinyopt.record import RUN_ID, WORKER


class _Tracker:
    """Records which MLflow runs recovery closes."""

    def __init__(self):
        self.closed = []

    def close_if_running(self, run_id, reason):
        self.closed.append((run_id, reason))


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


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


def test_identity_names_this_process():
    me = recovery.identity()
    assert me["pid"] == os.getpid() and not recovery.is_dead(me)


@pytest.mark.parametrize("worker, dead", [
    (lambda me: {**me, "pid": _dead_pid()}, True),
    (lambda me: {**me, "started": -1}, True),  # the pid lives on, but in another process: it was reused
    (lambda me: me, False),
    (lambda me: {**me, "host": "another-machine", "pid": _dead_pid()}, False),  # cannot be known from here
])
def test_is_dead(worker, dead):
    assert recovery.is_dead(worker(recovery.identity())) is dead


def test_a_dead_workers_trial_is_failed_retried_and_its_run_closed(opened):
    study = optuna.create_study(study_name="scratch", storage=opened, direction="maximize")
    tracker = _Tracker()
    pid = _dead_pid()
    dead = _running(study, {**recovery.identity(), "pid": pid}, "run-dead")
    alive = _running(study, recovery.identity(), "run-alive")
    messages = recovery.recover(study, opened, tracker)
    trials = study.get_trials(deepcopy=False)
    assert [t.state.name for t in trials] == ["FAIL", "RUNNING", "WAITING"]
    assert trials[2].params == trials[dead.number].params and trials[2].system_attrs["failed_trial"] == dead.number
    assert messages == [f"recovered trial {dead.number}: left RUNNING (its worker, pid {pid} on "
                        f"{recovery.identity()['host']}, is gone); failed, queued again as trial 2"]
    assert [run for run, _ in tracker.closed] == ["run-dead"] and "is gone" in tracker.closed[0][1]
    assert recovery.recover(study, opened, tracker) == []  # nothing twice
    assert alive.number == 1
