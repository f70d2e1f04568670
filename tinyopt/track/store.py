"""The MLflow tracking store: reaching it, checking it, and reading back what trials stored.

A local SQLite store is checked (intact, writable) before MLflow opens it, and each process's first
open of it takes its turn under a file lock; a server must answer within seconds.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow import MlflowClient

from tinyopt.core import record
from tinyopt.core.damage import MLFLOW_FIX, damage_message
from tinyopt.core.errors import StudyError
from tinyopt.core.locks import file_lock
from tinyopt.core.urls import first_line, redact, sqlite_path
from tinyopt.stores.checks import check_file, is_database, probe_database, read_sqlite
from tinyopt.track.names import experiment_name

# MLflow's INFO lines (database migrations, run links) would interleave with the sweep's progress.
logging.getLogger("mlflow").setLevel(logging.WARNING)
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

_KERAS_FILE = "data/model.keras"  # where the mlflow.keras flavour keeps the model in a logged model's folder
_CHECK_TIMEOUT = 5  # seconds: an unreachable server fails the sweep before it starts, not after 4 minutes of retries
_FIX = "check --tracking-uri (sqlite:///FILE.db, the http(s) URL of an mlflow server, or a database URL)"
_OPENED: set[Path] = set()  # SQLite stores this process has opened (and MLflow created or migrated)


def open_client(tracking_uri: str) -> MlflowClient:
    # The registry defaults to the tracking store; set both so that model registration works too.
    local = sqlite_path(tracking_uri)
    if local is None or local in _OPENED:
        return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    # A damaged store is one line here, not MLflow's and SQLAlchemy's chained tracebacks later.
    check_file(local, "the MLflow store", _FIX, writable=False, read=read_sqlite)
    local.parent.mkdir(parents=True, exist_ok=True)
    # MLflow creates and migrates a new SQLite store when it first opens it; two processes doing it
    # at once fail ("duplicate column name"), so each process's first open takes its turn.
    with file_lock(local.with_name(f"{local.name}.tinyopt-lock")):
        client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        client.search_experiments(max_results=1)
    _OPENED.add(local)
    return client


def check(tracking_uri: str) -> None:
    """Make sure the tracking store can be reached, without creating anything in it.

    A local SQLite store must be intact and writable, with its artifacts folder, or be a file its
    folder can hold; a server must answer an MLflow API request within a few seconds (MLflow's own
    client would retry for minutes).

    Raises:
        StudyError: an unsupported URI, an unusable path, a damaged or read-only store, or a server that
            does not answer as MLflow.
    """
    local = sqlite_path(tracking_uri)
    if local is not None:
        check_file(local, "the MLflow store", _FIX, writable=True, read=read_sqlite)
        artifacts = local.parent / "artifacts"  # where _artifact_location puts them
        if artifacts.exists() and not os.access(artifacts, os.W_OK | os.X_OK):
            raise StudyError(f"the MLflow artifacts folder {artifacts} is read-only; make it writable "
                             f"(chmod -R u+w {artifacts}) or {_FIX}")
        return
    if is_database(tracking_uri):
        probe_database(tracking_uri, "the MLflow tracking store", _FIX)
        return
    if not tracking_uri.startswith(("http://", "https://")):
        raise StudyError(f"unsupported MLflow tracking URI {redact(tracking_uri)!r}; {_FIX}")
    with _environment(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT=str(_CHECK_TIMEOUT)):
        try:
            MlflowClient(tracking_uri=tracking_uri).search_experiments(max_results=1)
        except mlflow.exceptions.MlflowException as err:
            raise StudyError(f"cannot use the MLflow tracking server {redact(tracking_uri)} ({_why(err)}); "
                             f"start it or {_FIX}") from err


@contextlib.contextmanager
def _environment(**values: str) -> Iterator[None]:
    """Set environment variables for the body only (MLflow reads its HTTP settings on every request)."""
    before = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _why(err: BaseException) -> str:
    """The short reason of a failed MLflow HTTP request: the OS error, or the HTTP status."""
    text = str(err)
    found = re.search(r"\[Errno -?\d+\] ([^'\")]+)", text) or re.search(r"(error code \d+)", text)
    if found:
        return found.group(1).strip()
    return "timed out" if "timed out" in text.lower() else first_line(err)[:200]


def _artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """Artifacts of an embedded store go beside its database; a server decides for itself."""
    local = sqlite_path(tracking_uri)
    if local is None:
        return None
    return (local.parent.resolve() / "artifacts" / experiment).as_uri()



def ensure_experiment(client: MlflowClient, tracking_uri: str, name: str) -> str:
    """The id of the experiment ``name``, created (with its artifacts beside an embedded store) if missing."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            client.create_experiment(name, artifact_location=_artifact_location(tracking_uri, name))
        except mlflow.exceptions.MlflowException:
            pass  # another worker created it between our lookup and our create
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise StudyError(f"MLflow could not create the experiment {name!r}")
    return experiment.experiment_id


def download_artifact(run_id: str, path: str, tracking_uri: str, dst: str | Path | None = None) -> Path:
    """Download one artifact of a run and return its local path.

    Raises:
        StudyError: the run or artifact does not exist in this tracking store.
    """
    client = open_client(tracking_uri)
    try:
        if dst is None:
            dst = tempfile.mkdtemp(prefix="tinyopt-artifact-")
        return Path(client.download_artifacts(run_id, path, str(dst)))
    except (mlflow.exceptions.MlflowException, OSError) as err:
        raise StudyError(f"artifact {path!r} of MLflow run {run_id} is not in {redact(tracking_uri)} "
                         f"({first_line(err)}); check --tracking-uri") from err


def download_model(run_id: str, tracking_uri: str, dst: str | Path) -> Path:
    """Download the Keras file of the logged model a trial's run kept (``TrialRun.log_model``).

    Raises:
        StudyError: the run kept no model, or the store does not hold it.
    """
    client = open_client(tracking_uri)
    try:
        uri = client.get_run(run_id).data.tags.get(record.TAG_MODEL_URI)
        if uri is None:
            raise StudyError(f"MLflow run {run_id} kept no model (it has no {record.TAG_MODEL_URI} tag)")
        location = client.get_logged_model(uri.removeprefix("models:/")).artifact_location
        Path(dst).mkdir(parents=True, exist_ok=True)
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{location}/{_KERAS_FILE}",
                                                        dst_path=str(dst), tracking_uri=tracking_uri))
    except (mlflow.exceptions.MlflowException, OSError) as err:
        raise StudyError(f"the model of MLflow run {run_id} is not in {redact(tracking_uri)} "
                         f"({first_line(err)}); check --tracking-uri") from err


def load_predictions(run_id: str, tracking_uri: str) -> dict[str, np.ndarray]:
    """The selection/test probabilities and labels a trial logged (see ``TrialRun.log_predictions``).

    Raises:
        StudyError: the run or its ``predictions.npz`` is not in the store, or the file is damaged.
    """
    with tempfile.TemporaryDirectory() as tmp:
        path = download_artifact(run_id, record.PREDICTIONS, tracking_uri, tmp)
        try:
            # The arrays are read inside the try: a damaged member of the archive only fails when it is read.
            with np.load(path) as saved:
                return {key: saved[key] for key in saved.files}
        except Exception as err:  # noqa: BLE001 - a damaged file raises BadZipFile, EOFError, ValueError, zlib.error...
            raise StudyError(damage_message(f"{record.PREDICTIONS} of MLflow run {run_id}", path, err,
                                            MLFLOW_FIX)) from err


def get_run(run_id: str, tracking_uri: str) -> Any:
    """The MLflow run (info, params, metrics, tags)."""
    return open_client(tracking_uri).get_run(run_id)


def register_model(bundle_dir: str | Path, name: str, tracking_uri: str, run_id: str | None = None) -> str:
    """Register an exported bundle in the MLflow model registry and return the new version.

    The bundle is logged as the ``export`` artifact of ``run_id`` (the winning trial's run), or of a
    new run in the ``tinyopt/exports`` experiment when there is none, and registered from there.

    Raises:
        StudyError: the registry refuses (e.g. a tracking store without one).
    """
    client = open_client(tracking_uri)
    try:
        if run_id is None:
            experiment = ensure_experiment(client, tracking_uri, experiment_name("exports"))
            run_id = client.create_run(experiment, run_name=f"export {name}").info.run_id
            client.set_terminated(run_id)
        client.log_artifacts(run_id, str(bundle_dir), "export")
        try:
            client.create_registered_model(name)
        except mlflow.exceptions.MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        source = f"{client.get_run(run_id).info.artifact_uri}/export"
        return str(client.create_model_version(name, source, run_id=run_id).version)
    except mlflow.exceptions.MlflowException as err:
        raise StudyError(f"cannot register {name!r} in {redact(tracking_uri)} ({first_line(err)})") from err
