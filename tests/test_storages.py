"""Study storages: the embedded SQLite file, Optuna's journal file, and PostgreSQL for several workers."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid

import optuna
import pytest
from sweep_helpers import SMALL, runs_of

from tinyopt import runner
from tinyopt.errors import StudyError

POSTGRES = os.environ.get("TINYOPT_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def _postgres_reachable() -> bool:
    try:
        import psycopg

        psycopg.connect(POSTGRES.replace("postgresql+psycopg", "postgresql"), connect_timeout=3).close()
        return True
    except Exception:  # noqa: BLE001 - any failure means "not here"
        return False


needs_postgres = pytest.mark.skipif(not _postgres_reachable(),
                                    reason=f"no PostgreSQL server at {POSTGRES} (set TINYOPT_TEST_POSTGRES)")


@pytest.fixture
def study_name():
    name = f"scratch-{uuid.uuid4().hex[:8]}"
    yield name
    if _postgres_reachable():
        try:
            optuna.delete_study(study_name=name, storage=POSTGRES)
        except KeyError:
            pass


def _url(kind, tmp_path):
    return {"sqlite": f"sqlite:///{tmp_path}/studies/tinyopt.db", "journal": f"journal:{tmp_path}/studies/journal.log",
            "postgresql": POSTGRES}[kind]


@pytest.mark.parametrize("kind", ["sqlite", "journal", pytest.param("postgresql", marks=needs_postgres)])
def test_sweep_continues_on_every_storage(kind, tmp_path, tiny_folder, study_name):
    stores = {"storage": _url(kind, tmp_path), "tracking_uri": f"sqlite:///{tmp_path}/mlruns/mlflow.db"}
    for trials in (1, 1):
        runner.run_sweep("scratch", trials=trials, source=str(tiny_folder), cache_dir=str(tmp_path / "cache"),
                         overrides=SMALL["scratch"], study_name=study_name, progress=False, **stores)
    study = optuna.load_study(study_name=study_name, storage=runner.open_storage(stores["storage"]))
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    assert study.user_attrs["approach"] == "scratch"


def test_unreachable_database_is_one_clear_line_without_the_password():
    with pytest.raises(StudyError) as err:
        runner.open_storage("postgresql+psycopg://bob:hunter2@127.0.0.1:1/nodb")
    message = str(err.value)
    assert "hunter2" not in message and "bob:***@127.0.0.1:1/nodb" in message and "\n" not in message


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    """An `mlflow server` on loopback, stopped after the test."""
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path}/server.db", "--artifacts-destination", str(tmp_path / "art")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{url}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("mlflow server did not start within 60 s")
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def _worker(args, tiny_folder, cache, extra=()):
    command = [sys.executable, "-m", "tinyopt", "sweep", "scratch", "--data", str(tiny_folder), "--cache", str(cache),
               *args]
    for item in (*SMALL["scratch"], *extra):
        command += ["--set", item]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
@needs_postgres
def test_two_workers_share_one_study_and_one_parent_run(tmp_path, tiny_folder, study_name, mlflow_server):
    cache = tmp_path / "cache"
    from tinyopt import data

    data.prepare(str(tiny_folder), str(cache), progress=False)  # once, so the workers only read it
    args = ["--trials", "2", "--study", study_name, "--storage", POSTGRES, "--tracking-uri", mlflow_server]
    workers = [_worker(args, tiny_folder, cache) for _ in range(2)]
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs
    study = optuna.load_study(study_name=study_name, storage=POSTGRES)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 4
    _, parents, children = runs_of({"tracking_uri": mlflow_server}, study_name)
    assert len(parents) == 1 and sorted(children) == [0, 1, 2, 3]
    assert all(run.info.status == "FINISHED" for run in children.values())


@pytest.mark.slow
@needs_postgres
def test_killed_worker_trial_is_failed_and_retried(tmp_path, tiny_folder, study_name):
    cache = tmp_path / "cache"
    tracking_uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    slow = ("space.epochs=50", "study.heartbeat_interval=1")
    worker = _worker(["--trials", "1", "--study", study_name, "--storage", POSTGRES, "--tracking-uri", tracking_uri],
                     tiny_folder, cache, slow)
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                trials = optuna.load_study(study_name=study_name, storage=POSTGRES).trials
            except KeyError:
                trials = []
            if trials and "mlflow_run_id" in trials[0].user_attrs:
                break
            assert worker.poll() is None, worker.communicate()[0]
            time.sleep(0.5)
        else:
            pytest.fail("the worker never started its trial")
    finally:
        worker.kill()
        worker.wait()
    time.sleep(3)  # past the grace period of 2 heartbeats
    runner.run_sweep("scratch", trials=1, source=str(tiny_folder), cache_dir=str(cache), study_name=study_name,
                     overrides=(*SMALL["scratch"], "study.heartbeat_interval=1"), storage=POSTGRES,
                     tracking_uri=tracking_uri, progress=False)
    study = optuna.load_study(study_name=study_name, storage=POSTGRES)
    assert [t.state.name for t in study.trials] == ["FAIL", "COMPLETE"]
    assert study.trials[1].system_attrs.get("failed_trial") == study.trials[0].number
    assert study.trials[1].params == study.trials[0].params
    _, _, children = runs_of({"tracking_uri": tracking_uri}, study_name)
    assert children[0].info.status == "FAILED" and "heartbeat" in children[0].data.tags["fail_reason"]
    assert children[1].info.status == "FINISHED"
