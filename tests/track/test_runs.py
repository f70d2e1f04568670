"""A trial run logs to MLflow in the background: in order, closed last, failures kept and raised.

The trials are played by hand against a real SQLite tracking store; a figure drawn in the
background that waits for the test holds the logging back where a test needs it held.
"""

from __future__ import annotations

import threading

import keras
import numpy as np
import pytest
from matplotlib.figure import Figure

from tinyopt.core import record
from tinyopt.core.config import load_config
from tinyopt.core.errors import StudyError
from tinyopt.track import runs, tracking
from tinyopt.track import store as mlflow_store

ARRAYS = {"selection_probs": np.full((4, 3), 1 / 3, dtype=np.float32), "selection_labels": np.arange(4) % 3}


def _tracker(tmp_path) -> tracking.Tracker:
    tracker = tracking.Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "scratch", "scratch")
    tracker.start_sweep({"approach": "scratch"}, {}, tags={})
    return tracker


def _trial(tracker: tracking.Tracker, number: int) -> runs.TrialRun:
    return tracker.start_trial(number, {"learning_rate": 0.1}, load_config("scratch"), tags={})


def _figure() -> Figure:
    figure = Figure(figsize=(2, 2))
    figure.subplots().plot([1, 2, 3])
    return figure


def _held_figure(release: threading.Event):
    """A figure function that draws only once the test releases it (or after a minute, not to hang)."""
    def draw() -> Figure:
        release.wait(60)
        return _figure()
    return draw


def _status(tracker: tracking.Tracker, run_id: str) -> str:
    return tracker.client.get_run(run_id).info.status


def _artifacts(tracker: tracking.Tracker, run_id: str, folder: str | None = None) -> set[str]:
    return {a.path for a in tracker.client.list_artifacts(run_id, folder)}


def _failing_upload(tracker: tracking.Tracker, monkeypatch, run_id: str, name: str) -> None:
    """Uploads of ``name`` to ``run_id`` fail as on a full disk."""
    upload = tracker.client.log_artifact

    def log_artifact(to_run, local_path, artifact_path=None):
        if to_run == run_id and local_path.endswith(name):
            raise OSError(28, "No space left on device")
        return upload(to_run, local_path, artifact_path)

    monkeypatch.setattr(tracker.client, "log_artifact", log_artifact)


def test_a_trial_run_is_closed_after_everything_it_logged_and_the_trial_does_not_wait(tmp_path):
    tracker = _tracker(tmp_path)
    run = _trial(tracker, 0)
    release = threading.Event()
    run.log_figure(_held_figure(release), record.LEARNING_CURVE)
    for epoch in range(3):
        run.log_metrics({"loss": 3.0 - epoch}, step=epoch)
    run.set_tags({record.TAG_PRECISION: "float32"})
    run.log_predictions(ARRAYS)
    run.log_text("0\tn01443537\tgoldfish\n", record.CLASSES_FILE)
    run.end("COMPLETE")
    assert _status(tracker, run.run_id) == "RUNNING"  # its logging is held back, so its close too
    release.set()
    tracker.end_sweep()
    stored = tracker.client.get_run(run.run_id)
    assert stored.info.status == "FINISHED" and _status(tracker, tracker.parent_run_id) == "FINISHED"
    assert stored.data.tags[record.TAG_TRIAL_STATE] == "COMPLETE" and record.FAIL_REASON not in stored.data.tags
    assert stored.data.tags[record.TAG_PRECISION] == "float32" and stored.data.params["learning_rate"] == "0.1"
    history = tracker.client.get_metric_history(run.run_id, "loss")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [(0, 3.0), (1, 2.0), (2, 1.0)]
    assert _artifacts(tracker, run.run_id) == {record.CONFIG_FILE, record.LEARNING_CURVE, record.PREDICTIONS,
                                               record.CLASSES_FILE}
    saved = mlflow_store.load_predictions(run.run_id, tracker.tracking_uri)
    for key, value in ARRAYS.items():
        np.testing.assert_array_equal(saved[key], value)


def test_the_model_is_saved_before_the_trial_goes_on(tmp_path):
    tracker = _tracker(tmp_path)
    run = _trial(tracker, 0)
    release = threading.Event()
    run.log_figure(_held_figure(release), record.LEARNING_CURVE)  # the upload waits behind it
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    x = np.eye(3, dtype=np.float32)
    expected = model.predict(x, verbose=0)
    run.log_model(model, tracker.experiment_id, "scratch-trial-0", params={"learning_rate": 0.00020074099},
                  metrics={record.final(record.SELECTION_TOP1): 0.41234567})
    model.set_weights([np.zeros_like(w) for w in model.get_weights()])  # what the next trial's clear_session may do
    release.set()
    run.end("COMPLETE")
    tracker.end_sweep()
    reloaded = keras.saving.load_model(mlflow_store.download_model(run.run_id, tracker.tracking_uri, tmp_path / "dl"))
    np.testing.assert_allclose(reloaded.predict(x, verbose=0), expected, rtol=1e-6)
    # MLflow's Models tab tells it apart and ranks it: its trial's name, params and scores.
    [logged] = tracker.client.search_logged_models([tracker.experiment_id])
    assert logged.name == "scratch-trial-0" and logged.params == {"learning_rate": "0.0002007"}
    assert {m.key: m.value for m in logged.metrics} == {record.final(record.SELECTION_TOP1): 0.4123}


@pytest.mark.parametrize("state, reason, status, outcome", [
    ("COMPLETE", None, "FINISHED", "complete"),
    ("PRUNED", "pruned after epoch 3 of 10 by MedianPruner (selection top-1 0.120)", "FINISHED",
     "pruned after epoch 3 of 10 by MedianPruner (selection top-1 0.120)"),
    ("FAIL", "ValueError: bad", "FAILED", "failed: ValueError: bad"),
    ("KILLED", "interrupted by SIGTERM", "KILLED", "interrupted by SIGTERM"),
])
def test_a_closed_run_says_what_happened_to_its_trial(tmp_path, state, reason, status, outcome):
    tracker = _tracker(tmp_path)
    run = _trial(tracker, 0)
    run.end(state, reason)
    tracker.end_sweep()
    stored = tracker.client.get_run(run.run_id)
    assert stored.info.status == status and stored.data.tags[record.TAG_OUTCOME] == outcome
    assert stored.data.tags[record.TAG_TRIAL_STATE] == state
    # A pruned trial is not a failure: only a failed or interrupted one carries a fail reason.
    assert stored.data.tags.get(record.FAIL_REASON) == (reason if state in ("FAIL", "KILLED") else None)


def test_a_failed_upload_fails_the_run_with_the_reason_and_the_sweep_end(tmp_path, monkeypatch):
    tracker = _tracker(tmp_path)
    run = _trial(tracker, 0)
    _failing_upload(tracker, monkeypatch, run.run_id, record.PREDICTIONS)
    run.log_predictions(ARRAYS)
    run.log_text("0\tn01443537\tgoldfish\n", record.CLASSES_FILE)
    run.end("COMPLETE")
    with pytest.raises(StudyError, match=f"predictions.npz of run {run.run_id} .*No space left on device"):
        tracker.end_sweep()
    stored = tracker.client.get_run(run.run_id)
    assert stored.info.status == "FAILED" and stored.data.tags[record.TAG_TRIAL_STATE] == "COMPLETE"
    assert stored.data.tags[record.FAIL_REASON].startswith("could not store the predictions.npz of run")
    assert _artifacts(tracker, run.run_id) == {record.CONFIG_FILE, record.CLASSES_FILE}  # the rest is stored
    assert _status(tracker, tracker.parent_run_id) == "FAILED"


def test_a_failed_upload_stops_the_sweep_by_the_trial_after_next(tmp_path, monkeypatch):
    tracker = _tracker(tmp_path)
    first = _trial(tracker, 0)
    _failing_upload(tracker, monkeypatch, first.run_id, record.PREDICTIONS)
    first.log_predictions(ARRAYS)
    first.end("COMPLETE")
    second = _trial(tracker, 1)
    second.log_predictions(ARRAYS)
    second.end("COMPLETE")
    with pytest.raises(StudyError, match=f"predictions.npz of run {first.run_id}"):
        _trial(tracker, 2)
    tracker.end_sweep()  # raised once: the failure is not raised again
    assert _status(tracker, first.run_id) == "FAILED" and _status(tracker, second.run_id) == "FINISHED"


def test_a_run_without_a_background_thread_raises_at_once(tmp_path, monkeypatch):
    tracker = _tracker(tmp_path)
    _failing_upload(tracker, monkeypatch, tracker.parent_run_id, record.PREDICTIONS)
    run = runs.TrialRun(tracker.client, tracker.parent_run_id)  # as report and recovery use it
    with pytest.raises(OSError, match="No space left"):
        run.log_predictions(ARRAYS)


def test_metrics_keep_four_significant_digits(tmp_path):
    tracker = _tracker(tmp_path)
    run = _trial(tracker, 0)
    run.log_metrics({"final_selection_top1": 0.46399998664855957, "lr": 0.000312345678, "epoch_seconds": 123.456})
    run.end("COMPLETE")
    tracker.end_sweep()
    assert tracker.client.get_run(run.run_id).data.metrics == {"final_selection_top1": 0.464, "lr": 0.0003123,
                                                              "epoch_seconds": 123.5}
