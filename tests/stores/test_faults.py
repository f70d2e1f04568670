"""Faults a hostile but realistic user or a cluster scheduler inflicts, through the real CLI.

Damaged copies of real stores (made by a real sweep), files a plain user cannot write, a worker
killed with SIGKILL, GPUs that do not exist: each command ends with its exit code and one line
without a traceback, leaves what the user had exactly as it was (hashed before and after), and
leaves no MLflow run RUNNING.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import time
import uuid
from pathlib import Path

import pytest
from fault_helpers import one_error_line, snapshot, tinyopt
from mlflow import MlflowClient
from sweep_helpers import (
    POSTGRES,
    SMALL,
    drop_postgres_study,
    needs_postgres,
    runs_of,
    start_sweep,
    trials_of,
)

from tinyopt.core import record

# Root without CAP_DAC_OVERRIDE: file modes bind it as they bind any user (the probes ran as one).
PLAIN_USER = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]
_PAGE = 4096  # SQLite's default page size


@pytest.fixture(scope="module")
def swept(tmp_path_factory, tiny_folder):
    """Real stores: a 2-trial scratch study in studies/tinyopt.db, its runs in mlruns/, a prepared cache."""
    root = tmp_path_factory.mktemp("swept")
    sweep = start_sweep(["--trials", 2, "--data", tiny_folder, "--cache", root / "cache", "--storage",
                         f"sqlite:///{root}/studies/tinyopt.db", "--tracking-uri",
                         f"sqlite:///{root}/mlruns/mlflow.db"], cwd=root)
    output = sweep.communicate(timeout=600)[0]
    assert sweep.returncode == 0, output
    return root


def _copy(swept: Path, tmp_path: Path) -> Path:
    for folder in ("studies", "mlruns"):
        shutil.copytree(swept / folder, tmp_path / folder)
    return tmp_path


def _scribble(path: Path, pages: range) -> None:
    """Random bytes over these pages of a SQLite file (page 1 holds the header)."""
    data = bytearray(path.read_bytes())
    rng = random.Random(0)
    for page in pages:
        for i in range((page - 1) * _PAGE, min(page * _PAGE, len(data))):
            data[i] = rng.randrange(256)
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def _garbage_header(path: Path) -> None:
    path.write_bytes(b"this is not a SQLite file" * 4 + path.read_bytes()[100:])


def _journal_line(path: Path) -> None:
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join([*lines[:2], b'{"op_code": 4, "worker_id": "x", "truncated\n', *lines[2:]]))


STUDIES, MLFLOW = "studies/tinyopt.db", "mlruns/mlflow.db"
# (case, file, damage, command, fragment of the one line)
STORE_CASES = [
    ("studies.db pages 3-6 (sweep)", STUDIES, lambda p: _scribble(p, range(3, 7)), "sweep", "is damaged"),
    ("studies.db pages 3-6 (best)", STUDIES, lambda p: _scribble(p, range(3, 7)), "best", "is damaged"),
    ("studies.db last pages (sweep)", STUDIES, lambda p: _scribble(p, range(20, 26)), "sweep", "is damaged"),
    ("studies.db truncated (report)", STUDIES, _truncate, "report", "is damaged"),
    ("studies.db garbage header (sweep)", STUDIES, _garbage_header, "sweep", "is damaged"),
    ("mlflow.db pages 3-6 (sweep)", MLFLOW, lambda p: _scribble(p, range(3, 7)), "sweep", "is damaged"),
    ("mlflow.db truncated (sweep)", MLFLOW, _truncate, "sweep", "is damaged"),
    ("mlflow.db garbage header (ui)", MLFLOW, _garbage_header, "ui", "is damaged"),
    ("mlflow.db pages 3-6 (report)", MLFLOW, lambda p: _scribble(p, range(3, 7)), "report", "is damaged"),
]


def _command(kind: str, tmp_path: Path, cache: Path) -> list:
    stores = ["--storage", f"sqlite:///{tmp_path}/{STUDIES}", "--tracking-uri", f"sqlite:///{tmp_path}/{MLFLOW}"]
    if kind == "sweep":
        return ["sweep", "scratch", "--trials", 1, "--cache", cache, *stores, *sum((["--set", s] for s in
                                                                                    SMALL["scratch"]), [])]
    if kind == "ui":
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        return ["ui", "--tracking-uri", f"sqlite:///{tmp_path}/{MLFLOW}", "--port", port]
    if kind == "report":
        return ["report", "--out", tmp_path / "report", *stores]
    return [kind, *stores]


@pytest.mark.parametrize("case, name, damage, kind, fragment", STORE_CASES, ids=[c[0] for c in STORE_CASES])
def test_a_damaged_store_is_one_line_and_left_as_it_was(case, name, damage, kind, fragment, swept, tmp_path):
    _copy(swept, tmp_path)
    damage(tmp_path / name)
    before = snapshot(tmp_path)
    done = tinyopt(*_command(kind, tmp_path, swept / "cache"), cwd=tmp_path)
    line = one_error_line(done, fragment, name.split("/")[1])
    assert "restore it from a copy" in line
    assert snapshot(tmp_path) == before  # no study, run, bundle or report was created or changed


def test_a_failed_storage_check_creates_no_mlflow_store(swept, tmp_path):
    """Probe 9: with a garbage studies.db header and no MLflow store yet, none is created."""
    shutil.copytree(swept / "studies", tmp_path / "studies")
    _garbage_header(tmp_path / STUDIES)
    done = tinyopt(*_command("sweep", tmp_path, swept / "cache"), cwd=tmp_path)
    one_error_line(done, "the Optuna storage", "is damaged")
    assert not (tmp_path / "mlruns").exists()


def test_a_damaged_journal_is_one_line(swept, tmp_path):
    """A journal storage (Optuna's file for several processes) with a broken line in its middle."""
    import optuna

    from tinyopt.stores import storage

    journal = tmp_path / "studies" / "tinyopt.journal"
    journal.parent.mkdir()
    optuna.copy_study(from_study_name="scratch", from_storage=f"sqlite:///{swept}/{STUDIES}",
                      to_storage=storage.open_storage(f"journal:{journal}"))
    shutil.copytree(swept / "mlruns", tmp_path / "mlruns")
    _journal_line(journal)
    before = snapshot(tmp_path)
    done = tinyopt("best", "--storage", f"journal:{journal}", "--tracking-uri", f"sqlite:///{tmp_path}/{MLFLOW}",
                   cwd=tmp_path)
    one_error_line(done, "tinyopt.journal is damaged")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("name", [MLFLOW, STUDIES, "mlruns/artifacts"])
def test_a_read_only_store_is_refused_before_anything_is_created(name, swept, tmp_path):
    """Probe 6: a store a plain user cannot write, in a writable folder: no study, no WAITING trial, one line."""
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed: cannot run a command without root's override")
    _copy(swept, tmp_path)
    target = tmp_path / name
    for path in [target, *target.rglob("*")]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    before = snapshot(tmp_path)
    command = _command("sweep", tmp_path, swept / "cache")
    done = tinyopt(*command, cwd=tmp_path, prefix=PLAIN_USER)
    one_error_line(done, "read-only", Path(name).name)
    assert snapshot(tmp_path) == before
    assert [t.state.name for t in trials_of(f"sqlite:///{tmp_path}/{STUDIES}", "scratch")] == ["COMPLETE"] * 2


@pytest.mark.parametrize("gpus", ["0", "0,1"])
def test_gpus_that_do_not_exist_are_refused(gpus, swept, tmp_path):
    """Probe 8: --gpus naming GPUs this machine lacks stops before creating anything (it trained on the CPU)."""
    from tinyopt.train import backend

    backend.load()
    if backend.gpu_count():
        gpus = ",".join(str(backend.gpu_count() + int(i)) for i in gpus.split(","))
    done = tinyopt(*_command("sweep", tmp_path, swept / "cache"), "--gpus", gpus, cwd=tmp_path)
    one_error_line(done, f"--gpus {gpus}")
    assert not (tmp_path / "studies").exists() and not (tmp_path / "mlruns").exists()


# A trial long enough to be killed in (no pruning, no early stop, 8 epochs), but short overall.
_KILLABLE = (*SMALL["scratch"], "space.epochs=8", "study.pruner=none", "train.early_stopping_patience=8")


@needs_postgres
def test_a_killed_worker_is_reported_recovered_and_replaced(tiny_cache, tmp_path):
    """Probe 1: kill -9 one worker of --workers 2 mid-trial on PostgreSQL; the command still adds its 6 trials.

    (The supervisor's side is the same on every storage: tests/sweep/test_workers.py runs it without processes.)
    """
    study, url, tracking_uri = f"scratch-{uuid.uuid4().hex[:8]}", POSTGRES, f"sqlite:///{tmp_path}/{MLFLOW}"
    try:
        _kill_a_worker(study, url, tracking_uri, tiny_cache, tmp_path)
    finally:
        drop_postgres_study(study)


def _kill_a_worker(study, url, tracking_uri, tiny_cache, tmp_path):
    sweep = start_sweep(["--workers", 2, "--trials", 6, "--study", study, "--storage", url, "--tracking-uri",
                         tracking_uri, "--cache", tiny_cache], overrides=_KILLABLE, cwd=tmp_path)
    deadline = time.monotonic() + 300
    while True:
        training = [t for t in trials_of(url, study) if t.state.name == "RUNNING" and len(t.intermediate_values) >= 2]
        if training:
            break
        assert sweep.poll() is None and time.monotonic() < deadline, sweep.communicate()[0]
        time.sleep(0.2)
    victim = training[0]
    os.kill(victim.user_attrs[record.WORKER]["pid"], signal.SIGKILL)
    output = sweep.communicate(timeout=600)[0]
    assert sweep.returncode == 0, output
    assert "Traceback" not in output
    assert f"(pid {victim.user_attrs[record.WORKER]['pid']}) was killed by SIGKILL while running trial " \
           f"{victim.number}" in output
    trials = trials_of(url, study)
    assert trials[victim.number].state.name == "FAIL"
    retried = [t for t in trials if t.system_attrs.get("failed_trial") == victim.number]
    assert len(retried) == 1 and retried[0].params == victim.params and retried[0].state.name == "COMPLETE"
    assert sum(t.state.name in ("COMPLETE", "PRUNED") for t in trials) == 6  # the command added what it was asked
    _, parents, children = runs_of({"tracking_uri": tracking_uri}, study)
    assert parents[0].info.status == "FINISHED"
    assert "RUNNING" not in {run.info.status for run in children.values()}
    killed = children[victim.number]
    assert killed.info.status == "FAILED" and "supervisor" in killed.data.tags[record.FAIL_REASON]


def test_a_later_sweep_closes_the_runs_of_trials_that_ended_without_closing_them(swept, tmp_path):
    """A trial failed by another worker's heartbeat check (or ended by a process killed before it closed its run)."""
    import optuna

    _copy(swept, tmp_path)
    storage_url = f"sqlite:///{tmp_path}/{STUDIES}"
    study = optuna.load_study(study_name="scratch", storage=storage_url)
    client = MlflowClient(f"sqlite:///{tmp_path}/{MLFLOW}")
    _, _, children = runs_of({"tracking_uri": f"sqlite:///{tmp_path}/{MLFLOW}"}, "scratch")
    experiment = children[0].info.experiment_id
    left = {}
    for state in ("FAIL", "COMPLETE"):  # as the heartbeat path and a kill after the trial ended leave them
        run = client.create_run(experiment, tags={record.TAG_TRIAL_NUMBER: str(len(study.trials))})
        study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState[state], value=0.1 if state ==
                                                  "COMPLETE" else None, user_attrs={record.RUN_ID: run.info.run_id}))
        left[state] = run.info.run_id
    done = tinyopt(*_command("sweep", tmp_path, swept / "cache"), cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "closed the MLflow run of trial 2" in done.stdout and "closed the MLflow run of trial 3" in done.stdout
    assert client.get_run(left["FAIL"]).info.status == "FAILED"
    assert client.get_run(left["COMPLETE"]).info.status == "FINISHED"
