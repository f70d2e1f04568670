"""A trial's Keras callbacks: each epoch logged and reported, pruning but never after the last epoch, the deadline."""

from __future__ import annotations

import keras
import numpy as np
import optuna
import pytest

from tinyopt.core import record
from tinyopt.objectives.callbacks import deadline_stop, progress_callback, trial_callback
from tinyopt.train import checkpoints

pytestmark = pytest.mark.backend  # Keras' fit loop, which each backend runs its own way

SAMPLES, BATCH = 16, 4  # 4 steps an epoch


class _Run:
    def __init__(self):
        self.logged = []

    def log_metrics(self, metrics, step=0):
        self.logged.append((step, dict(metrics)))


class _Events:
    def __init__(self):
        self.epochs = []

    def epoch_ended(self, number, epoch, logs):
        self.epochs.append((number, epoch))


class _Always(optuna.pruners.BasePruner):
    def prune(self, study, trial):
        return True


def _tiny():
    """A compiled two-class model and its 16 samples."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(inputs))
    model.compile(keras.optimizers.SGD(0.05), "sparse_categorical_crossentropy", metrics=["accuracy"])
    rng = np.random.default_rng(0)
    return model, rng.normal(size=(SAMPLES, 3)).astype("float32"), np.arange(SAMPLES) % 2


def _fit(epochs, pruner=None, deadline=None):
    """Fit a tiny model with the trial's callback; returns the trial, the run, the events and what fit raised."""
    model, x, y = _tiny()
    study = optuna.create_study(direction="maximize", pruner=pruner or optuna.pruners.NopPruner())
    trial, run, events = study.ask(), _Run(), _Events()
    stop = None if deadline is None else deadline_stop(deadline)
    callbacks = [*([stop] if stop else []), trial_callback(trial, run, events, SAMPLES, stop)]
    try:
        model.fit(x, y, validation_data=(x, y), batch_size=BATCH, epochs=epochs, verbose=0, callbacks=callbacks)
    except optuna.TrialPruned as pruned:
        return trial, run, events, pruned
    return trial, run, events, None


def test_each_epoch_is_logged_and_reported_at_the_step_of_epochs_trained():
    trial, run, events, pruned = _fit(epochs=2)
    assert pruned is None
    assert [step for step, _ in run.logged] == [1, 2] and events.epochs == [(0, 0), (0, 1)]
    for _, metrics in run.logged:
        assert {record.TRAIN_LOSS, record.TRAIN_TOP1, record.SELECTION_LOSS, record.SELECTION_TOP1, record.LR,
                record.EPOCH_SECONDS, record.IMAGES_PER_SECOND} <= set(metrics)
        assert metrics[record.LR] == pytest.approx(0.05)
    reported = trial.study.trials[0].intermediate_values
    assert reported == {step: metrics[record.SELECTION_TOP1] for step, metrics in run.logged}


def test_a_pruned_trial_stops_after_the_epoch_the_pruner_judged():
    trial, run, _, pruned = _fit(epochs=3, pruner=_Always())
    top1 = run.logged[0][1][record.SELECTION_TOP1]
    assert str(pruned) == f"pruned after epoch 1 of 3 by _Always (selection top-1 {top1:.3f})"  # which pruner
    assert [step for step, _ in run.logged] == [1]


def test_the_last_epoch_is_never_pruned():
    _, run, _, pruned = _fit(epochs=1, pruner=_Always())
    assert pruned is None and [step for step, _ in run.logged] == [1]


def test_a_passed_deadline_stops_after_the_first_batch_and_prunes_with_the_epochs_trained():
    trial, run, _, pruned = _fit(epochs=3, deadline=0.0)
    top1 = run.logged[0][1][record.SELECTION_TOP1]
    assert str(pruned) == f"stopped at the --timeout deadline after 0.25 epochs (selection top-1 {top1:.3f})"
    stored = trial.study.trials[0]
    assert stored.user_attrs[record.DEADLINE_STOP] == {"epochs": 0.25, record.SELECTION_TOP1: top1}
    assert stored.intermediate_values == {1: top1}


def test_a_deadline_not_reached_changes_nothing():
    trial, run, _, pruned = _fit(epochs=2, deadline=float("inf"))
    assert pruned is None and [step for step, _ in run.logged] == [1, 2]
    assert record.DEADLINE_STOP not in trial.study.trials[0].user_attrs


class _Saved:
    """A ``Checkpoints`` that records what it is asked to save."""

    def __init__(self):
        self.saved = []

    def save(self, model, epoch, history, stopping, best_weights):
        self.saved.append((epoch, {key: len(values) for key, values in history.items()}, dict(stopping),
                           best_weights is not None))


def _fit_with_progress(policy, resumed=None, epochs=3):
    model, x, y = _tiny()
    stopping = keras.callbacks.EarlyStopping(monitor="val_accuracy", mode="max", patience=50,
                                             restore_best_weights=True)
    saved = _Saved()
    progress = progress_callback(saved, policy, stopping, resumed)
    first = resumed.epoch if resumed else 0
    model.fit(x, y, validation_data=(x, y), batch_size=BATCH, initial_epoch=first, epochs=epochs, verbose=0,
              callbacks=[stopping, progress])
    return saved.saved, progress, stopping


def test_epoch_checkpoints_after_every_epoch_with_the_history_and_early_stopping_state():
    saved, progress, _ = _fit_with_progress("epoch")
    assert [epoch for epoch, *_ in saved] == [1, 2, 3]
    assert [history["loss"] for _, history, _, _ in saved] == [1, 2, 3]
    assert all(set(stopping) == {"wait", "best", "best_epoch", "stopped_epoch"} and best for *_, stopping, best
               in saved)
    assert len(progress.history["val_accuracy"]) == 3 and len(progress.saves) == 3


def test_auto_checkpoints_only_epochs_long_enough_to_be_worth_it_and_off_never(monkeypatch):
    assert _fit_with_progress("auto")[0] == []  # epochs of milliseconds
    monkeypatch.setattr(checkpoints, "AUTO_SECONDS", 0.0)
    assert [epoch for epoch, *_ in _fit_with_progress("auto")[0]] == [1, 2, 3]
    assert _fit_with_progress("off")[0] == []


def test_a_resumed_training_carries_the_history_and_early_stopping_state_on():
    resumed = checkpoints.Resumed(2, {"loss": [0.9, 0.8], "val_accuracy": [0.5, 0.75]},
                                  {"wait": 0, "best": 0.75, "best_epoch": 1, "stopped_epoch": 0}, None)
    saved, progress, stopping = _fit_with_progress("epoch", resumed, epochs=4)
    assert [epoch for epoch, *_ in saved] == [3, 4]
    assert progress.history["loss"][:2] == [0.9, 0.8] and len(progress.history["loss"]) == 4
    assert stopping.best >= 0.75 and (stopping.best_epoch >= 2 or stopping.best == 0.75)
