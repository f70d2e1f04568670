"""Study storages: the embedded SQLite file, Optuna's journal file, and PostgreSQL for several workers."""

from __future__ import annotations

import time
import uuid

import optuna
import pytest
from sweep_helpers import (
    LONG,
    POSTGRES,
    SMALL,
    drop_postgres_study,
    needs_postgres,
    runs_of,
    start_sweep,
    wait_for_training,
)

from tinyopt.core import record
from tinyopt.core.errors import StudyError
from tinyopt.stores import storage
from tinyopt.sweep import runner


@pytest.fixture
def study_name():
    name = f"scratch-{uuid.uuid4().hex[:8]}"
    yield name
    drop_postgres_study(name)


def _url(kind, tmp_path):
    return {"sqlite": f"sqlite:///{tmp_path}/studies/tinyopt.db", "journal": f"journal:{tmp_path}/studies/journal.log",
            "postgresql": POSTGRES}[kind]


@pytest.mark.parametrize("kind", ["sqlite", "journal", pytest.param("postgresql", marks=needs_postgres)])
def test_sweep_continues_on_every_storage(kind, tmp_path, tiny_folder, study_name):
    stores = {"storage": _url(kind, tmp_path), "tracking_uri": f"sqlite:///{tmp_path}/mlruns/mlflow.db"}
    for trials in (1, 1):
        runner.run_sweep("scratch", trials=trials, source=str(tiny_folder), cache_dir=str(tmp_path / "cache"),
                         overrides=SMALL["scratch"], study_name=study_name, progress=False, **stores)
    study = optuna.load_study(study_name=study_name, storage=storage.open_storage(stores["storage"]))
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    assert study.user_attrs["approach"] == "scratch"


def test_unreachable_database_is_one_clear_line_without_the_password():
    with pytest.raises(StudyError) as err:
        storage.open_storage("postgresql+psycopg://bob:hunter2@127.0.0.1:1/nodb")
    message = str(err.value)
    assert "hunter2" not in message and "bob:***@127.0.0.1:1/nodb" in message and "\n" not in message


@pytest.mark.slow
@needs_postgres
def test_trial_of_a_worker_on_another_machine_is_recovered_by_its_heartbeat(tmp_path, tiny_folder, study_name):
    tracking_uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    worker = start_sweep(["--trials", "1", "--data", tiny_folder, "--cache", tmp_path / "cache", "--study", study_name,
                          "--storage", POSTGRES, "--tracking-uri", tracking_uri],
                         overrides=(*LONG, "study.heartbeat_interval=1"))
    try:
        number = wait_for_training(POSTGRES, study_name, worker)
    finally:
        worker.kill()
        worker.wait()
    # Seen from another machine, the process cannot be looked up: only its silent heartbeat tells.
    opened = storage.open_storage(POSTGRES)
    trial_id = opened.get_trial_id_from_study_id_trial_number(opened.get_study_id_from_name(study_name), number)
    opened.set_trial_user_attr(trial_id, record.WORKER, {"host": "another-machine", "pid": 1, "started": 1})
    time.sleep(3)  # past the grace period of two 1 s heartbeats
    result = runner.run_sweep("scratch", trials=1, cache_dir=str(tmp_path / "cache"), study_name=study_name,
                              overrides=(*SMALL["scratch"], "study.heartbeat_interval=1"), storage=POSTGRES,
                              tracking_uri=tracking_uri, progress=False)
    assert len(result.recovered) == 1 and "heartbeat" in result.recovered[0]
    study = optuna.load_study(study_name=study_name, storage=POSTGRES)
    assert [t.state.name for t in study.trials] == ["FAIL", "COMPLETE"]
    assert study.trials[1].system_attrs.get("failed_trial") == study.trials[0].number
    assert study.trials[1].params == study.trials[0].params
    _, _, children = runs_of({"tracking_uri": tracking_uri}, study_name)
    assert children[0].info.status == "FAILED" and "heartbeat" in children[0].data.tags["fail_reason"]
    assert children[1].info.status == "FINISHED"


def _study_with_trials(url: str, name: str, values=(0.1, 0.2)) -> None:
    study = optuna.create_study(study_name=name, storage=url, direction="maximize")
    study.set_user_attr(record.APPROACH, "scratch")
    for value in values:
        study.add_trial(optuna.trial.create_trial(
            value=value, params={"x": value}, distributions={"x": optuna.distributions.FloatDistribution(0, 1)}))


def test_a_sqlite_study_moves_whole_into_its_workers_journal(tmp_path):
    url = f"sqlite:///{tmp_path}/studies/tinyopt.db"
    (tmp_path / "studies").mkdir()
    _study_with_trials(url, "scratch")
    _study_with_trials(url, "pretrained", (0.3,))
    assert storage.home(url, "scratch") == url
    with storage.study_lock(url, "scratch"):
        moved = storage.move_to_journal(url, "scratch")
    assert moved.startswith("journal:") and storage.home(url, "scratch") == moved
    assert optuna.get_all_study_names(url) == ["pretrained"]  # the SQLite copy is gone, the other study stays
    study = storage.load_study("scratch", url)
    assert [t.value for t in study.trials] == [0.1, 0.2] and study.user_attrs[record.APPROACH] == "scratch"
    assert storage.study_names(url) == ["pretrained", "scratch"]
    assert storage.move_to_journal(url, "scratch") == moved  # once moved, it stays where it is
    assert [t.value for t in storage.load_study("scratch", url).trials] == [0.1, 0.2]


def test_an_interrupted_move_keeps_the_sqlite_study(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path}/tinyopt.db"
    _study_with_trials(url, "scratch")

    def cut(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(optuna, "copy_study", cut)
    with pytest.raises(KeyboardInterrupt):
        storage.move_to_journal(url, "scratch")
    assert storage.home(url, "scratch") == url
    assert [t.value for t in storage.load_study("scratch", url).trials] == [0.1, 0.2]
    assert not list((tmp_path / "tinyopt.db.workers").glob("*"))  # no partial journal left behind


@pytest.mark.parametrize("url, fragment", [
    ("redis://127.0.0.1/0", "unsupported storage URL"),
    ("sqlite:///{tmp}/a_file/tinyopt.db", "is not a folder"),
    ("journal:{tmp}", "is a folder"),
])
def test_storage_check_refuses_without_creating(url, fragment, tmp_path):
    (tmp_path / "a_file").write_text("")
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(StudyError, match=fragment):
        storage.check(url.format(tmp=tmp_path))
    assert sorted(tmp_path.rglob("*")) == before
