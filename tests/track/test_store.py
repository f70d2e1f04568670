"""The MLflow tracking store: checked before it is used, experiments beside it, and what trials stored read back."""

from __future__ import annotations

import os
import re

import pytest

from tinyopt.core import record
from tinyopt.core.errors import StudyError
from tinyopt.track import store


def test_check_of_a_store_not_made_yet_creates_nothing(tmp_path):
    store.check(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    assert list(tmp_path.iterdir()) == []


def test_check_refuses_a_damaged_store_in_one_line(tmp_path):
    path = tmp_path / "mlflow.db"
    path.write_bytes(b"not a SQLite file, but long enough to look like one" * 100)
    with pytest.raises(StudyError) as err:
        store.check(f"sqlite:///{path}")
    assert str(err.value).startswith(f"the MLflow store {path} is damaged (") and "\n" not in str(err.value)


def test_check_refuses_a_read_only_artifacts_folder(tmp_path, monkeypatch):
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: access(path, mode) and os.fspath(path) != str(artifacts))
    with pytest.raises(StudyError, match=re.escape(f"the MLflow artifacts folder {artifacts} is read-only; make it "
                                                   f"writable (chmod -R u+w {artifacts})")):
        store.check(f"sqlite:///{tmp_path / 'mlflow.db'}")


def test_check_refuses_an_unsupported_uri_without_its_secret():
    with pytest.raises(StudyError) as err:
        store.check("ftp://bob:hunter2@example.org/x")
    assert str(err.value).startswith("unsupported MLflow tracking URI 'ftp://bob:***@example.org/x'; "
                                     "check --tracking-uri")


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """A store holding one run, in experiment tinyopt/scratch, that logged nothing: its URI and the run's id."""
    root = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"
    client = store.open_client(uri)
    experiment = store.ensure_experiment(client, uri, "tinyopt/scratch")
    return uri, client.create_run(experiment).info.run_id


def test_an_experiment_is_made_once_with_its_artifacts_beside_the_store(stored):
    tracking_uri, _ = stored
    client = store.open_client(tracking_uri)
    experiment = store.ensure_experiment(client, tracking_uri, "tinyopt/scratch")
    assert store.ensure_experiment(client, tracking_uri, "tinyopt/scratch") == experiment
    location = client.get_experiment(experiment).artifact_location
    folder = tracking_uri.removeprefix("sqlite:///").rsplit("/", 1)[0]
    assert location == f"file://{folder}/artifacts/tinyopt/scratch"


def test_predictions_of_an_unknown_run_are_a_study_error(stored):
    tracking_uri, _ = stored
    with pytest.raises(StudyError) as err:
        store.load_predictions("nosuchrun", tracking_uri)
    assert str(err.value).startswith(f"artifact '{record.PREDICTIONS}' of MLflow run nosuchrun is not in "
                                     f"{tracking_uri} (")
    assert str(err.value).endswith("); check --tracking-uri")


def test_predictions_a_run_never_logged_are_a_study_error(stored):
    tracking_uri, run_id = stored
    with pytest.raises(StudyError, match=f"artifact 'predictions.npz' of MLflow run {run_id} is not in "):
        store.load_predictions(run_id, tracking_uri)


def test_the_model_of_a_run_that_kept_none_is_a_study_error(stored, tmp_path):
    tracking_uri, run_id = stored
    with pytest.raises(StudyError, match=re.escape(f"MLflow run {run_id} kept no model (it has no model_uri tag)")):
        store.download_model(run_id, tracking_uri, tmp_path)
