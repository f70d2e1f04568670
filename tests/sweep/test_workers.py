"""Several workers on one study: ``--workers K``, ``--gpus``, ``--max-trials``, all starting at the same instant."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid

import pytest
from sweep_helpers import (
    LONG,
    POSTGRES,
    SMALL,
    drop_postgres_study,
    earlier_study,
    needs_postgres,
    runs_of,
    start_sweep,
    trials_of,
    wait_for_training,
)

from tinyopt.core import record
from tinyopt.core.errors import TinyoptError
from tinyopt.stores import storage
from tinyopt.sweep import workers
from tinyopt.train.backend import SHARE_ENV

FINISHED = ("COMPLETE", "PRUNED")


@pytest.fixture
def study():
    name = f"scratch-{uuid.uuid4().hex[:8]}"
    yield name
    drop_postgres_study(name)
    drop_postgres_study(f"{name}-earlier")


def _args(study, storage_url, tracking_uri, tiny_folder, tmp_path, *extra):
    return ["--study", study, "--storage", storage_url, "--tracking-uri", tracking_uri, "--data", tiny_folder,
            "--cache", tmp_path / "cache", *extra]


def _check_study(storage_url, tracking_uri, study, finished):
    """Exactly ``finished`` trials, all finished, no two alike, under one parent run."""
    trials = trials_of(storage_url, study)
    assert [t.state.name for t in trials if t.state.name not in FINISHED] == []
    assert len(trials) == finished
    assert len({json.dumps(t.params, sort_keys=True) for t in trials}) == finished
    _, parents, children = runs_of({"tracking_uri": tracking_uri}, study)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(children) == list(range(finished))
    assert {run.info.status for run in children.values()} == {"FINISHED"}  # pruned ones too
    return trials


def test_three_workers_on_fresh_sqlite_stores(study, tiny_folder, tmp_path):
    sqlite = f"sqlite:///{tmp_path}/studies/tinyopt.db"
    tracking_uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    sweep = start_sweep(["--workers", 3, "--trials", 5,
                         *_args(study, sqlite, tracking_uri, tiny_folder, tmp_path)])
    output = sweep.communicate(timeout=600)[0]
    assert sweep.returncode == 0, output
    assert "Optuna's journal file" in output and "5 new trials" in output
    trials = _check_study(sqlite, tracking_uri, study, 5)
    assert len({t.user_attrs[record.WORKER]["pid"] for t in trials}) == 3
    assert study in storage.study_names(sqlite)  # `tinyopt best` finds it through the SQLite URL


@pytest.mark.slow
@needs_postgres
def test_three_workers_on_postgres_and_an_mlflow_server(study, tiny_folder, tmp_path, mlflow_server):
    sweep = start_sweep(["--workers", 3, "--trials", 4,
                         *_args(study, POSTGRES, mlflow_server, tiny_folder, tmp_path)])
    output = sweep.communicate(timeout=600)[0]
    assert sweep.returncode == 0, output
    assert "4 new trials" in output and "journal" not in output
    _check_study(POSTGRES, mlflow_server, study, 4)


@pytest.fixture(params=["journal-and-fresh-mlflow-sqlite",
                        pytest.param("postgres-and-mlflow-server", marks=needs_postgres)])
def shared_stores(request, tmp_path):
    """Stores that independent commands share: fresh files on this machine, or servers for several machines."""
    if request.param.startswith("journal"):
        return f"journal:{tmp_path}/studies/journal.log", f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    return POSTGRES, request.getfixturevalue("mlflow_server")


@pytest.mark.slow
def test_max_trials_and_a_warm_start_are_honoured_by_three_independent_commands(study, tiny_folder, tmp_path,
                                                                               shared_stores):
    """Also each warm-start params set is queued once (tests/sweep/test_warmstart.py has the rest)."""
    from tinyopt.data import build

    storage_url, tracking_uri = shared_stores
    build.prepare(str(tiny_folder), str(tmp_path / "cache"), progress=False)  # as on machines with their own copy
    earlier_study(storage_url, f"{study}-earlier")
    commands = [start_sweep(["--trials", 10, "--max-trials", 4, "--warm-start", f"{study}-earlier",
                             *_args(study, storage_url, tracking_uri, tiny_folder, tmp_path)],
                            overrides=(*SMALL["scratch"], "study.warm_start_trials=3")) for _ in range(3)]
    outputs = [command.communicate(timeout=600)[0] for command in commands]
    assert [command.returncode for command in commands] == [0, 0, 0], outputs
    trials = _check_study(storage_url, tracking_uri, study, 4)
    added = [int(line.split()[0]) for output in outputs for line in output.splitlines() if "new trials" in line]
    assert sum(added) == 4
    # The defaults' first trial, then the earlier study's best 3, each once: one command queued them.
    assert [t.user_attrs.get(record.WARM_START_FROM, {}).get("trial") for t in trials] == [None, 1, 3, 2]
    assert sum(f"warm start from study {study}-earlier: queued trials 1, 3, 2;" in output for output in outputs) == 1
    assert sum("nothing queued again" in output for output in outputs) == 2
    _, _, children = runs_of({"tracking_uri": tracking_uri}, study)
    assert [children[n].data.tags.get(record.TAG_WARM_START_FROM) for n in range(4)] == [
        None, f"{study}-earlier trial 1", f"{study}-earlier trial 3", f"{study}-earlier trial 2"]


def test_sigterm_to_the_supervisor_stops_every_worker_cleanly(study, tiny_folder, tmp_path):
    sqlite = f"sqlite:///{tmp_path}/studies/tinyopt.db"
    tracking_uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    sweep = start_sweep(["--workers", 2, "--trials", 4, *_args(study, sqlite, tracking_uri, tiny_folder, tmp_path)],
                        overrides=LONG)
    wait_for_training(sqlite, study, sweep)
    deadline = time.monotonic() + 120
    while sum(t.state.name == "RUNNING" for t in trials_of(sqlite, study)) < 2:  # both workers in a trial
        assert sweep.poll() is None and time.monotonic() < deadline
        time.sleep(0.3)
    sweep.send_signal(signal.SIGTERM)
    output = sweep.communicate(timeout=120)[0]
    assert sweep.returncode == 143, output
    assert "Traceback" not in output and "interrupted by SIGTERM" in output
    # SIGTERM is a preemption (study.requeue = "sigterm"): each worker's trial is queued again.
    trials = trials_of(sqlite, study)
    assert [t.state.name for t in trials] == ["FAIL", "FAIL", "WAITING", "WAITING"]
    assert {t.user_attrs[record.FAIL_REASON] for t in trials[:2]} == \
        {"interrupted by SIGTERM; queued again, to resume from its last checkpoint"}
    assert sorted(t.system_attrs["retry_history"][-1] for t in trials[2:]) == [0, 1]
    _, parents, children = runs_of({"tracking_uri": tracking_uri}, study)
    assert parents[0].info.status == "KILLED" and [r.info.status for r in children.values()] == ["KILLED"] * 2


def test_shares_add_up_to_the_trials():
    assert workers.shares(7, 3) == [3, 2, 2] and sum(workers.shares(2, 3)) == 2
    assert workers.shares(None, 2) == [None, None]


@pytest.mark.parametrize("gpus, count, error", [
    ("0,1", None, None), ("0,1,2", 2, None), ("0,1", 3, "--workers 3 needs 3 GPUs"), ("0,0", None, None),
    ("0,", None, "indices or UUIDs"),
])
def test_gpus_pin_one_worker_each(gpus, count, error):
    if error:
        with pytest.raises(TinyoptError, match=error):
            workers.parse_gpus(gpus, count)
        return
    ids, count = workers.parse_gpus(gpus, count)
    assert ids == gpus.split(",")[:count] and len(ids) == count


def test_each_worker_gets_its_gpu_and_its_share_in_processes_of_at_most_n_trials(monkeypatch):
    args = workers.SweepArgs("scratch", trials=5, workers=2, gpus=["0", "1"], trials_per_process=2)
    supervisor = workers._Supervisor(args, print)
    started = []

    def run(index, command, env):
        started.append((index, int(command[command.index("--trials") + 1]), env["CUDA_VISIBLE_DEVICES"]))
        assert "--worker" in command and "--data" not in command
        return 1000 + len(started), 0

    supervisor._run = run
    monkeypatch.setattr(workers, "_trials_of", lambda study, pids: 1)  # every process ran its trials
    for index, share in enumerate(workers.shares(args.trials, args.workers)):
        supervisor.slot(index, share, None)
    assert started == [(0, 2, "0"), (0, 1, "0"), (1, 2, "1")]


def test_workers_listed_on_one_gpu_know_they_share_it(monkeypatch):
    """--gpus 0,0,1: the two workers of GPU 0 are told they share it (tinyopt.train.backend splits its memory)."""
    args = workers.SweepArgs("scratch", trials=3, workers=3, gpus=["0", "0", "1"])
    supervisor = workers._Supervisor(args, print)
    seen = []

    def run(index, command, env):
        seen.append((env["CUDA_VISIBLE_DEVICES"], env[SHARE_ENV]))
        return 2000 + index, 0

    supervisor._run = run
    monkeypatch.setattr(workers, "_trials_of", lambda study, pids: 1)
    for index in range(3):
        supervisor.slot(index, 1, None)
    assert seen == [("0", "2"), ("0", "2"), ("1", "1")]


def test_processes_opening_a_fresh_mlflow_store_together_all_succeed(tmp_path):
    """MLflow creates a new SQLite store on first use; at once, raw MLflow clients fail with migration errors."""
    tracking_uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    code = ("import sys; from tinyopt.track.tracking import Tracker; "
            "print(Tracker(sys.argv[1], sys.argv[2], 'scratch').experiment_id)")
    processes = [subprocess.Popen([sys.executable, "-c", code, tracking_uri, f"study-{i}"], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for i in range(6)]
    outputs = [process.communicate(timeout=120)[0] for process in processes]
    assert [process.returncode for process in processes] == [0] * 6, outputs
    assert len({output.strip().splitlines()[-1] for output in outputs}) == 6  # six studies, six experiments


def test_a_worker_process_that_ran_no_trial_ends_its_slot(monkeypatch):
    """With --timeout and --trials-per-process, a process that found --max-trials met is not started again."""
    args = workers.SweepArgs("scratch", trials=None, timeout=3600, max_trials=4, trials_per_process=2)
    supervisor = workers._Supervisor(args, print)
    started = []
    supervisor._run = lambda index, command, env: (started.append(command), (1234, 0))[1]
    monkeypatch.setattr(workers, "_trials_of", lambda study, pids: 0)
    supervisor.slot(0, None, time.monotonic() + 3600)
    assert len(started) == 1


@pytest.mark.parametrize("approach, options, processes", [
    ("scratch", ["--trials", workers.TRIALS_PER_PROCESS], None),  # no more than one process holds: no supervisor
    ("scratch", ["--trials", 2 * workers.TRIALS_PER_PROCESS + 1],
     [workers.TRIALS_PER_PROCESS, workers.TRIALS_PER_PROCESS, 1]),
    ("scratch", ["--trials", 3, "--trials-per-process", 2], [2, 1]),
    ("scratch", ["--trials", 50, "--trials-per-process", 0], None),
    ("ensemble", ["--trials", 50], None),  # its trials build no model: nothing to free
])
def test_a_long_sweep_runs_in_fresh_processes_by_default(monkeypatch, approach, options, processes):
    """Without --trials-per-process, a sweep of more trials than TRIALS_PER_PROCESS recycles its worker."""
    from click.testing import CliRunner

    from tinyopt.cli import cli
    from tinyopt.sweep.runner import SweepResult

    result = SweepResult(approach, approach, "sqlite:///studies.db", {"COMPLETE": 0, "PRUNED": 0, "FAIL": 0}, [], "")
    started = []

    def supervise(args, emit):
        supervisor = workers._Supervisor(args, emit)
        supervisor._run = lambda index, command, env: (started.append(int(command[command.index("--trials") + 1])),
                                                       (1000 + len(started), 0))[1]
        supervisor.slot(0, args.trials, None)
        return result

    monkeypatch.setattr(workers, "supervise", supervise)
    monkeypatch.setattr(workers, "_trials_of", lambda study, pids: 1)
    monkeypatch.setattr(sys.modules["tinyopt.cli.sweep"], "_run", lambda args, events, owner=True: result)
    outcome = CliRunner().invoke(cli, ["sweep", approach, *map(str, options)])
    assert outcome.exit_code == 0, outcome.output
    assert started == (processes or [])


def _dying_supervisor(monkeypatch, codes, finished):
    """A supervisor whose worker processes exit with ``codes`` in turn, each having finished ``finished[i]`` trials."""
    args = workers.SweepArgs("scratch", trials=5, trials_per_process=0)
    supervisor = workers._Supervisor(args, print)
    started = []

    def run(index, command, env):
        started.append(int(command[command.index("--trials") + 1]))
        return len(started), codes[len(started) - 1]

    def trials_of(study, pids, *states):
        (pid,) = pids
        if codes[pid - 1] >= 0:
            return [pid]  # it ran its trials
        return [*range(10 * pid, 10 * pid + finished[pid - 1]), 100 + pid]  # ... and the one it died in

    supervisor._run = run
    supervisor._bury = lambda index, pid, signum: {100 + pid}  # the trial each dead process was running
    monkeypatch.setattr(workers, "_trials_of", trials_of)
    return supervisor, started


def test_a_dead_worker_process_is_replaced_for_the_trials_it_did_not_finish(monkeypatch):
    supervisor, started = _dying_supervisor(monkeypatch, codes=[-signal.SIGKILL, 0], finished=[2, 0])
    supervisor.slot(0, 5, None)
    assert started == [5, 3] and supervisor.codes == []  # 2 finished before the kill: 3 left for the new process


def test_a_worker_that_keeps_dying_is_given_up_with_the_signal_as_exit_code(monkeypatch):
    deaths = [-signal.SIGKILL] * workers.DEATHS_IN_A_ROW
    supervisor, started = _dying_supervisor(monkeypatch, codes=[*deaths, 0], finished=[0] * len(deaths) + [0])
    supervisor.slot(0, 5, None)
    assert started == [5] * workers.DEATHS_IN_A_ROW and supervisor.codes == [128 + signal.SIGKILL]


def test_a_signal_the_supervisor_passed_on_is_no_death(monkeypatch):
    supervisor, started = _dying_supervisor(monkeypatch, codes=[-signal.SIGTERM], finished=[0])
    supervisor.signum = signal.SIGTERM
    supervisor._bury = lambda *args: pytest.fail("a worker stopped by the user's signal was buried")
    supervisor.slot(0, 5, None)
    assert started == []  # the supervisor was stopping: no process started, none replaced


def test_a_worker_that_ignores_the_signal_prints_its_stacks_and_is_killed_after_the_grace(monkeypatch):
    monkeypatch.setattr(workers, "STOP_GRACE", 0.5)
    # A process that ignores SIGTERM and dumps its stack on SIGUSR1, as a stuck worker would.
    stuck = subprocess.Popen(
        [sys.executable, "-c", "import faulthandler, signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                               "faulthandler.register(signal.SIGUSR1, all_threads=True); print('ready', flush=True); "
                               "time.sleep(600)"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    assert stuck.stdout.readline().strip() == "ready"
    lines = []
    supervisor = workers._Supervisor(workers.SweepArgs("scratch", 2, workers=2), lines.append)
    supervisor.running[1] = stuck
    supervisor.forward(signal.SIGTERM)
    supervisor.kill_stuck()  # within the grace: nothing happens
    assert stuck.poll() is None and lines == []
    time.sleep(0.6)
    supervisor.kill_stuck()
    assert stuck.wait(timeout=10) == -signal.SIGKILL and supervisor.killed == {stuck.pid}
    assert lines == [f"worker 1 (pid {stuck.pid}) did not stop within 0.5 s of the signal; its threads' stacks "
                     "follow, then it is killed"]
    assert "most recent call first" in stuck.stdout.read()  # the stack it printed before it was killed


def test_the_supervisor_adds_the_time_left_to_each_line_that_ends_a_trial(monkeypatch):
    from tinyopt.sweep import workers

    clock = [100.0]
    monkeypatch.setattr(workers.time, "monotonic", lambda: clock[0])
    supervisor = workers._Supervisor(workers.SweepArgs("scratch", 5, workers=2), lambda line: None)
    assert supervisor._time_left("trial 0: started") == ""
    assert supervisor._time_left("trial 1: started") == ""
    clock[0] += 40.0
    # 4 trials left at 40 s each, 2 at a time.
    assert supervisor._time_left("trial 0: COMPLETE 0.4000") == " (about 1m 20s left)"
    clock[0] += 20.0
    assert supervisor._time_left("trial 1: PRUNED at epoch 1") == " (about 1m 15s left)"  # 3 at 50 s, 2 at a time
    assert supervisor._time_left("a note of a worker") == ""
