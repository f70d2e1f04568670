"""MLflow tracking: the only module that imports mlflow.

One MLflow experiment per study, one parent run per study (reopened by each sweep of it), and one
nested run per trial whose status follows the trial: COMPLETE -> FINISHED, PRUNED -> KILLED,
FAIL -> FAILED with the reason. Logging goes through ``MlflowClient`` with explicit run ids, so
nothing depends on MLflow's global "active run".

A trial run logs in the background, on one thread per tracker, in the order it was asked to: of
its logging, the trial itself only creates its run and saves its model file, and its run is closed
once everything logged before the close is stored. A sweep runs at most one trial ahead of its logging.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus, RunTag

from tinyopt import record
from tinyopt.errors import StudyError
from tinyopt.locks import file_lock
from tinyopt.storage import is_database, probe_database
from tinyopt.urls import first_line, redact

# MLflow's INFO lines (database migrations, run links) would interleave with the sweep's progress.
logging.getLogger("mlflow").setLevel(logging.WARNING)
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

_PARAM_LIMIT = 6000  # MLflow rejects longer param values
_CHECK_TIMEOUT = 5  # seconds: an unreachable server fails the sweep before it starts, not after 4 minutes of retries
_FIX = "check --tracking-uri (sqlite:///FILE.db, the http(s) URL of an mlflow server, or a database URL)"
_OPENED: set[Path] = set()  # SQLite stores this process has opened (and MLflow created or migrated)


def _client(tracking_uri: str) -> MlflowClient:
    # The registry defaults to the tracking store; set both so that model registration works too.
    local = _sqlite_path(tracking_uri)
    if local is None or local in _OPENED:
        return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
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

    A local SQLite store only needs a path that can hold the file; a server must answer an MLflow
    API request within a few seconds (MLflow's own client would retry for minutes).

    Raises:
        StudyError: an unsupported URI, an unusable path, or a server that does not answer as MLflow.
    """
    local = _sqlite_path(tracking_uri)
    if local is not None:
        if local.is_dir():
            raise StudyError(f"MLflow store {local} is a folder; {_FIX}")
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


def _sqlite_path(tracking_uri: str) -> Path | None:
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return Path(tracking_uri.removeprefix("sqlite:///"))


def _artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """Artifacts of an embedded store go beside its database; a server decides for itself."""
    local = _sqlite_path(tracking_uri)
    if local is None:
        return None
    return (local.parent.resolve() / "artifacts" / experiment).as_uri()


def experiment_name(study_name: str) -> str:
    """The MLflow experiment that holds a study's runs."""
    return f"tinyopt/{study_name}"


class Tracker:
    """Logs one study's sweep to MLflow.

    Args:
        tracking_uri: ``sqlite:///...`` for the embedded store or the URL of an ``mlflow server``.
        study_name: the Optuna study name; the experiment is ``tinyopt/<study_name>``.
        approach: recorded as a tag on every run.
    """

    def __init__(self, tracking_uri: str, study_name: str, approach: str):
        self.tracking_uri = tracking_uri
        self.study_name = study_name
        self.approach = approach
        try:
            self.client = _client(tracking_uri)
            self.experiment_id = self._experiment(experiment_name(study_name))
        except Exception as err:  # noqa: BLE001 - MLflow, SQLAlchemy and requests each raise their own
            raise StudyError(f"cannot use MLflow tracking store {redact(tracking_uri)} ({first_line(err)}); "
                             "check --tracking-uri") from err
        self.parent_run_id: str | None = None
        # One thread, so that each run's calls reach MLflow in order, and its close comes last.
        self._background = ThreadPoolExecutor(1, thread_name_prefix="tinyopt-mlflow")
        self._runs: list[TrialRun] = []  # trial runs whose background logging may not be done

    def _experiment(self, name: str) -> str:
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        try:
            return self.client.create_experiment(name, artifact_location=_artifact_location(self.tracking_uri, name))
        except mlflow.exceptions.MlflowException:
            # Another worker created it between our lookup and our create.
            experiment = self.client.get_experiment_by_name(name)
            if experiment is None:
                raise
            return experiment.experiment_id

    def start_sweep(self, config: dict[str, Any], tags: dict[str, str], *, reopen: bool = True) -> str:
        """Find (or create) the study's parent run and return its id; mark it RUNNING if ``reopen``.

        Call it holding ``tinyopt.storage.study_lock``: workers that start together then find one parent.
        Workers started by ``tinyopt sweep --workers`` pass ``reopen=False``: their supervisor owns the status.
        """
        parents = list(self.client.search_runs([self.experiment_id], f"tags.`{record.TAG_PARENT}` = 'true'",
                                               order_by=["attributes.start_time ASC"], max_results=1))
        if parents:
            self.parent_run_id = parents[0].info.run_id
        else:
            run = self.client.create_run(self.experiment_id, run_name=self.study_name,
                                         tags={record.TAG_APPROACH: self.approach, record.TAG_STUDY: self.study_name,
                                               record.TAG_PARENT: "true", **tags})
            self.client.log_dict(run.info.run_id, config, record.CONFIG_FILE)
            self.parent_run_id = run.info.run_id
        if reopen:
            self.client.update_run(self.parent_run_id, status="RUNNING")
        return self.parent_run_id

    def end_sweep(self, status: str = "FINISHED") -> None:
        """Close the parent run once every trial run is stored and closed.

        ``status`` is ``FINISHED``, or ``KILLED`` on Ctrl-C / ``FAILED`` on a fatal error; the parent
        is ``FAILED`` too when MLflow could not store what a trial logged.

        Raises:
            StudyError: MLflow could not store something a trial logged (its run is FAILED, with the reason).
        """
        try:
            self._settle(keep=0)
        except StudyError:
            status = "FAILED"
            raise
        finally:
            if self.parent_run_id:
                self.client.set_terminated(self.parent_run_id, status=status)

    def _settle(self, keep: int) -> None:
        """Wait for the background logging of every trial run but the last ``keep``; raise the first failure."""
        failure: StudyError | None = None
        while len(self._runs) > keep:
            try:
                self._runs.pop(0).wait()
            except StudyError as err:
                failure = failure or err
        if failure is not None:
            raise failure

    def close_if_running(self, run_id: str, reason: str) -> None:
        """Mark a run FAILED if it is still RUNNING (its process died before it could close it)."""
        if self.client.get_run(run_id).info.status == "RUNNING":
            TrialRun(self.client, run_id).end("FAIL", reason)

    def start_trial(self, number: int, params: dict[str, Any], config: dict[str, Any],
                    tags: dict[str, str], *, system_metrics: bool = False) -> TrialRun:
        """Create the nested run of one trial with its params and resolved config.

        With ``system_metrics``, MLflow samples GPU utilisation and memory, CPU and RAM into the run
        (``system/...`` metrics, every ``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` seconds, 10 by
        default) until it ends.

        Raises:
            StudyError: MLflow could not store something an earlier trial logged.
        """
        # Bounds the logging backlog (and the predictions it holds) to one trial, and stops the
        # sweep on a tracking store that fails rather than running trials it cannot record.
        self._settle(keep=1)
        run = self.client.create_run(
            self.experiment_id, run_name=f"{self.study_name}#{number}",
            tags={"mlflow.parentRunId": self.parent_run_id or "", record.TAG_APPROACH: self.approach,
                  record.TAG_STUDY: self.study_name, record.TAG_TRIAL_NUMBER: str(number),
                  record.TAG_TRIAL_STATE: "RUNNING", **tags},
        )
        trial_run = TrialRun(self.client, run.info.run_id, self._background)
        self._runs.append(trial_run)
        trial_run.log_params({**params, **_flatten(config, "config.")})
        trial_run.log_dict(config, record.CONFIG_FILE)
        if system_metrics:
            # Imported here: it needs psutil (and pynvml for GPUs), which a CPU sweep can do without.
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            trial_run.monitor = SystemMetricsMonitor(run.info.run_id, tracking_uri=self.tracking_uri)
            trial_run.monitor.start()
        return trial_run



class TrialRun:
    """The MLflow run of one trial.

    Args:
        client: the tracking store's client.
        run_id: the run.
        background: where to make the MLflow calls, in order; None makes them at once, raising
            their errors to the caller. In the background an error is kept: the run is closed
            FAILED with it, and ``wait`` raises it.
    """

    def __init__(self, client: MlflowClient, run_id: str, background: ThreadPoolExecutor | None = None):
        self.client = client
        self.run_id = run_id
        self.monitor: Any = None  # an MLflow SystemMetricsMonitor while it samples
        self._background = background
        self._last: Future | None = None  # the latest background call: the run's calls run in order
        self._failure: str | None = None  # what the first failed background call could not store, and why

    def log_params(self, params: dict[str, Any]) -> None:
        items = [Param(k, str(v)[:_PARAM_LIMIT]) for k, v in params.items()]
        for start in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            self._call("params", self.client.log_batch, self.run_id, params=items[start:start + 100])

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        now = int(time.time() * 1000)
        self._call("metrics", self.client.log_batch, self.run_id,
                   metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def set_tags(self, tags: dict[str, Any]) -> None:
        self._call("tags", self.client.log_batch, self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_dict(self, data: dict[str, Any], name: str) -> None:
        self._call(name, self.client.log_dict, self.run_id, data, name)

    def log_figure(self, figure: Any, name: str) -> None:
        """Store a matplotlib figure, or the one a function draws (drawn in the background too)."""
        self._call(name, self._store_figure, figure, name)

    def log_text(self, text: str, name: str) -> None:
        self._call(name, self.client.log_text, self.run_id, text, name)

    def log_predictions(self, arrays: dict[str, np.ndarray]) -> None:
        """Store the class-probability arrays the ensemble study reads back."""
        self._call(record.PREDICTIONS, self._store_predictions, arrays)

    def log_model(self, model: Any) -> None:
        """Store a Keras model as ``record.MODEL`` (reloadable without tinyopt)."""
        folder, name = record.MODEL.rsplit("/", 1)
        # Saved now, uploaded later: the next trial's clear_session would free the model.
        self._call(record.MODEL, self._store_file, _scratch_file(name, model.save), folder)

    def end(self, state: str, reason: str | None = None) -> None:
        """Close the run, after everything logged before, with the status that matches the Optuna trial state."""
        if self.monitor is not None:
            self.monitor.finish()  # its last samples belong to the run, so before it closes
            self.monitor = None
        self._call("status", self._close, state, reason)

    def wait(self) -> None:
        """Wait until the background calls made so far are done.

        Raises:
            StudyError: one of them failed.
        """
        if self._last is not None:
            self._last.result()
        if self._failure is not None:
            raise StudyError(f"MLflow could not store {self._failure}; "
                             "check --tracking-uri and the room left where it keeps artifacts")

    def _call(self, what: str, call: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        if self._background is None:
            call(*args, **kwargs)
            return

        def guarded() -> None:
            try:
                call(*args, **kwargs)
            except Exception as err:  # noqa: BLE001 - kept for the run's close and for wait(), whatever it is
                self._failure = self._failure or f"the {what} of run {self.run_id} ({first_line(err)})"

        self._last = self._background.submit(guarded)

    def _close(self, state: str, reason: str | None) -> None:
        status = _STATUS[state]
        if self._failure is not None:
            # The trial's state stands (Optuna has it); its run says what it misses.
            status = _STATUS["FAIL"]
            reason = f"could not store {self._failure}" + (f"; {reason}" if reason else "")
        tags = {record.TAG_TRIAL_STATE: state}
        if reason:
            tags[record.FAIL_REASON] = reason[:5000]
        self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        self.client.set_terminated(self.run_id, status=status)

    def _store_figure(self, figure: Any, name: str) -> None:
        self.client.log_figure(self.run_id, figure() if callable(figure) else figure, name)

    def _store_predictions(self, arrays: dict[str, np.ndarray]) -> None:
        self._store_file(_scratch_file(record.PREDICTIONS, lambda path: np.savez_compressed(path, **arrays)), None)

    def _store_file(self, path: Path, folder: str | None) -> None:
        """Upload a file of ``_scratch_file``, then remove its folder."""
        try:
            self.client.log_artifact(self.run_id, str(path), folder)
        finally:
            shutil.rmtree(path.parent, ignore_errors=True)


def _scratch_file(name: str, write: Callable[[Path], Any]) -> Path:
    """The file ``name`` that ``write`` makes in a new temporary folder (removed again if it fails)."""
    path = Path(tempfile.mkdtemp(prefix="tinyopt-artifact-")) / name
    try:
        write(path)
    except BaseException:
        shutil.rmtree(path.parent)
        raise
    return path


_STATUS = {
    "COMPLETE": RunStatus.to_string(RunStatus.FINISHED),
    "PRUNED": RunStatus.to_string(RunStatus.KILLED),
    "FAIL": RunStatus.to_string(RunStatus.FAILED),
    "KILLED": RunStatus.to_string(RunStatus.KILLED),
}


def _flatten(config: dict[str, Any], prefix: str) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if key == "space":
            flat[f"{prefix}space"] = json.dumps(value, sort_keys=True)
        elif isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def download_artifact(run_id: str, path: str, tracking_uri: str, dst: str | Path | None = None) -> Path:
    """Download one artifact of a run and return its local path.

    Raises:
        StudyError: the run or artifact does not exist in this tracking store.
    """
    client = _client(tracking_uri)
    try:
        if dst is None:
            dst = tempfile.mkdtemp(prefix="tinyopt-artifact-")
        return Path(client.download_artifacts(run_id, path, str(dst)))
    except (mlflow.exceptions.MlflowException, OSError) as err:
        raise StudyError(f"artifact {path!r} of MLflow run {run_id} is not in {redact(tracking_uri)} "
                         f"({first_line(err)}); check --tracking-uri") from err


def load_predictions(run_id: str, tracking_uri: str) -> dict[str, np.ndarray]:
    """The selection/test probabilities and labels a trial logged (see ``TrialRun.log_predictions``)."""
    with tempfile.TemporaryDirectory() as tmp:
        with np.load(download_artifact(run_id, record.PREDICTIONS, tracking_uri, tmp)) as saved:
            return {key: saved[key] for key in saved.files}


def get_run(run_id: str, tracking_uri: str) -> Any:
    """The MLflow run (info, params, metrics, tags)."""
    return _client(tracking_uri).get_run(run_id)


def register_model(bundle_dir: str | Path, name: str, tracking_uri: str, run_id: str | None = None) -> str:
    """Register an exported bundle in the MLflow model registry and return the new version.

    The bundle is logged as the ``export`` artifact of ``run_id`` (the winning trial's run), or of a
    new run in the ``tinyopt/exports`` experiment when there is none, and registered from there.

    Raises:
        StudyError: the registry refuses (e.g. a tracking store without one).
    """
    client = _client(tracking_uri)
    try:
        if run_id is None:
            experiment = Tracker(tracking_uri, "exports", "export").experiment_id
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


def ui_command(tracking_uri: str) -> str:
    """The shell command that opens the MLflow UI on this store (credentials hidden)."""
    if _sqlite_path(tracking_uri) is None:
        return f"open {redact(tracking_uri)} in a browser"
    return f"mlflow ui --backend-store-uri {tracking_uri}"
