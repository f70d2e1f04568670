"""The MLflow run of one trial (or of a sweep's parent): what it logs, in order, in the background."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus, RunTag

from tinyopt.core import record
from tinyopt.core.errors import StudyError
from tinyopt.core.urls import first_line
from tinyopt.track.names import param_text

_PARAM_LIMIT = 6000  # MLflow rejects longer param values
# MLflow metrics keep 4 significant digits: a top-1 over 5,000 images moves by 2e-4, and 0.46399998664855957
# (float32 through float64) is noise to a reader.
_DIGITS = 4


def _round(value: float) -> float:
    return float(f"{float(value):.{_DIGITS}g}")



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
        items = [Param(k, param_text(v)[:_PARAM_LIMIT]) for k, v in params.items()]
        for start in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            self.call("params", self.client.log_batch, self.run_id, params=items[start:start + 100])

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        """Log metrics at ``step``, rounded to 4 significant digits."""
        now = int(time.time() * 1000)
        self.call("metrics", self.client.log_batch, self.run_id,
                  metrics=[Metric(k, _round(v), now, step) for k, v in metrics.items()])

    def carry_epochs(self, source_run_id: str, through: int) -> None:
        """Copy the per-epoch metrics of epochs 1 to ``through`` from another run, as it logged them.

        A resumed trial's run thereby shows one curve from epoch 1: the epochs the attempt it replaces
        trained, then its own.
        """
        def carry() -> None:
            carried = [m for key in record.EPOCH_METRICS for m in self.client.get_metric_history(source_run_id, key)
                       if 1 <= m.step <= through]
            for start in range(0, len(carried), 1000):  # MLflow's limit of metrics per batch
                self.client.log_batch(self.run_id, metrics=carried[start:start + 1000])

        self.call("epochs carried over", carry)

    def set_tags(self, tags: dict[str, Any]) -> None:
        self.call("tags", self.client.log_batch, self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_dict(self, data: dict[str, Any], name: str) -> None:
        self.call(name, self.client.log_dict, self.run_id, data, name)

    def log_figure(self, figure: Any, name: str) -> None:
        """Store a matplotlib figure, or the one a function draws (drawn in the background too)."""
        self.call(name, self._store_figure, figure, name)

    def log_text(self, text: str, name: str) -> None:
        self.call(name, self.client.log_text, self.run_id, text, name)

    def log_predictions(self, arrays: dict[str, np.ndarray]) -> None:
        """Store the class-probability arrays the ensemble study reads back."""
        self.call(record.PREDICTIONS, self._store_predictions, arrays)

    def log_model(self, model: Any, experiment_id: str, name: str, params: dict[str, Any] | None = None,
                  metrics: dict[str, float] | None = None) -> None:
        """Store a Keras model as an MLflow logged model of this run (``mlflow.keras``, reloadable without tinyopt).

        The model is named ``name`` (``tinyopt.track.names.model_name``) and carries ``params`` and
        ``metrics`` (the trial's searched params and final scores), so that MLflow's Models tab tells
        kept models apart and ranks them. The metrics are logged on the run too, linked to the model:
        a caller does not log them again, or the run's history holds each twice. The run gets the tags
        ``model_kept`` and ``model_uri`` (``models:/<id>``); the model's ``data/model.keras`` loads with plain
        Keras too.
        """
        # Saved now, uploaded later: the next trial's clear_session would free the model.
        folder = _scratch_file("model", lambda path: _save_keras(model, path))
        self.call(record.LOGGED_MODEL, self._store_model, folder, experiment_id, name, params or {}, metrics or {})

    def end(self, state: str, reason: str | None = None) -> None:
        """Close the run, after everything logged before, with the status that matches the Optuna trial state."""
        if self.monitor is not None:
            self.monitor.finish()  # its last samples belong to the run, so before it closes
            self.monitor = None
        self.call("status", self._close, state, reason)

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

    def call(self, what: str, call: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Make an MLflow call for this run, after every call asked before (``what`` names it in an error)."""
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
        outcome = outcome_text(state, reason)
        if self._failure is not None:
            # The trial's state stands (Optuna has it); its run says what it misses.
            status = _STATUS["FAIL"]
            reason = f"could not store {self._failure}" + (f"; {reason}" if reason else "")
            outcome = f"{outcome}; could not store {self._failure}"
        tags = {record.TAG_TRIAL_STATE: state, record.TAG_OUTCOME: outcome[:5000]}
        if reason and (state in ("FAIL", "KILLED") or self._failure is not None):
            tags[record.FAIL_REASON] = reason[:5000]
        self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        self.client.set_terminated(self.run_id, status=status)

    def _store_model(self, folder: Path, experiment_id: str, name: str, params: dict[str, Any],
                     metrics: dict[str, float]) -> None:
        from mlflow.entities import LoggedModelOutput, LoggedModelStatus

        try:
            logged = self.client.create_logged_model(experiment_id, name=name, source_run_id=self.run_id,
                                                     model_type="keras",
                                                     params={k: param_text(v) for k, v in params.items()})
            if metrics:
                now = int(time.time() * 1000)
                self.client.log_batch(self.run_id, metrics=[Metric(k, _round(v), now, 0, model_id=logged.model_id)
                                                            for k, v in metrics.items()])
            self.client.log_model_artifacts(logged.model_id, str(folder))
            self.client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
            self.client.log_outputs(self.run_id, [LoggedModelOutput(logged.model_id, step=0)])
            self.client.log_batch(self.run_id, tags=[RunTag(record.TAG_MODEL_KEPT, "true"),
                                                     RunTag(record.TAG_MODEL_URI, f"models:/{logged.model_id}")])
        finally:
            shutil.rmtree(folder.parent, ignore_errors=True)

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


def _save_keras(model: Any, path: Path) -> None:
    """An MLflow Keras-flavour model folder: ``MLmodel``, ``data/model.keras``, the signature, pinned requirements."""
    import keras
    import mlflow.keras
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    def spec(shape: Any, dtype: str) -> Schema:
        return Schema([TensorSpec(np.dtype(dtype), (-1, *tuple(shape)[1:]))])

    signature = ModelSignature(inputs=spec(model.input_shape, model.inputs[0].dtype),
                               outputs=spec(model.output_shape, "float32"))
    # Pinned here: MLflow would otherwise load the model in a subprocess to guess them (seconds per kept model).
    requirements = [f"keras=={keras.__version__}", f"mlflow=={mlflow.__version__}"]
    mlflow.keras.save_model(model, str(path), signature=signature, pip_requirements=requirements)



def _scratch_file(name: str, write: Callable[[Path], Any]) -> Path:
    """The file ``name`` that ``write`` makes in a new temporary folder (removed again if it fails)."""
    path = Path(tempfile.mkdtemp(prefix="tinyopt-artifact-")) / name
    try:
        write(path)
    except BaseException:
        shutil.rmtree(path.parent)
        raise
    return path


def outcome_text(state: str, reason: str | None) -> str:
    """What happened to a trial, in words, as its run's ``outcome`` tag says it."""
    if state == "COMPLETE":
        return "complete"
    if state == "PRUNED":
        return reason or "pruned"
    if state == "FAIL":
        return f"failed: {reason}" if reason else "failed"
    return reason or "interrupted"


# A pruned trial ran as the pruner meant it to: its run is FINISHED, its outcome says where it stopped.
# KILLED is for a trial a signal interrupted.
_STATUS = {
    "COMPLETE": RunStatus.to_string(RunStatus.FINISHED),
    "PRUNED": RunStatus.to_string(RunStatus.FINISHED),
    "FAIL": RunStatus.to_string(RunStatus.FAILED),
    "KILLED": RunStatus.to_string(RunStatus.KILLED),
}


