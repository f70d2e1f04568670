"""The Keras callbacks of a training trial: each epoch logged to MLflow and reported to Optuna, pruning, the deadline.

Keras and Optuna are imported inside, when a trial builds its callbacks (after ``backend.load``).
"""

from __future__ import annotations

import time
from typing import Any

from tinyopt.core import record
from tinyopt.train.training import epoch_metrics


def deadline_stop(deadline: float):
    """A Keras callback that stops training after the batch during which ``deadline`` (``time.monotonic()``)
    passes; its ``stopped_at`` is then the fraction of that epoch trained, else None.

    Waiting for the epoch's end could overrun a short deadline by a whole epoch (minutes on a CPU).
    """
    import keras

    class DeadlineStop(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.batches, self.stopped_at = 0, None

        def on_train_batch_end(self, batch, logs=None):
            self.batches += 1
            if self.stopped_at is None and time.monotonic() >= deadline:
                self.stopped_at = min(self.batches / (self.params.get("steps") or self.batches), 1.0)
                self.model.stop_training = True

    return DeadlineStop()


def progress_callback(checkpoints: Any, policy: str, stopping: Any, resumed: Any = None):
    """A Keras callback that keeps the whole history of a trial's epochs and checkpoints them.

    Args:
        checkpoints: the trial's ``tinyopt.train.checkpoints.Checkpoints``, or None (never written).
        policy: ``train.checkpoint``: ``epoch`` after every epoch, ``auto`` after an epoch of
            ``AUTO_SECONDS`` or more, ``off`` never.
        stopping: the trial's ``EarlyStopping``, listed before this callback: its state is saved after
            it has judged the epoch, and restored after its ``on_train_begin`` has reset it.
        resumed: what ``Checkpoints.load`` restored, or None for a trial from epoch 1.

    Its ``history`` holds every epoch from 1 (those before a resume included), ``saves`` the seconds
    each checkpoint took.
    """
    import keras

    from tinyopt.train.checkpoints import AUTO_SECONDS

    class Progress(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.history = {key: list(values) for key, values in (resumed.history if resumed else {}).items()}
            self.saves: list[float] = []

        def on_train_begin(self, logs=None):
            if resumed is not None and resumed.stopping:
                for key, value in resumed.stopping.items():
                    setattr(stopping, key, value)
                stopping.best_weights = resumed.best_weights

        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            for key, value in (logs or {}).items():
                self.history.setdefault(key, []).append(float(value))
            took = time.perf_counter() - self.started
            if checkpoints is not None and (policy == "epoch" or policy == "auto" and took >= AUTO_SECONDS):
                started = time.perf_counter()
                state = {key: int(getattr(stopping, key)) for key in ("wait", "best_epoch", "stopped_epoch")}
                state["best"] = None if stopping.best is None else float(stopping.best)  # numpy's, under JAX
                checkpoints.save(self.model, epoch + 1, self.history, state, stopping.best_weights)
                self.saves.append(time.perf_counter() - started)

    return Progress()


def trial_callback(trial, run, events: Any, train_images: int, deadline: Any = None,
                   reported: frozenset[int] = frozenset()):
    """A Keras callback that logs each epoch to MLflow, reports it to Optuna and prunes.

    Epochs in ``reported`` (the reports a retried trial inherited) are not reported to Optuna again, and
    none is in a study of several objectives, which Optuna cannot prune (its ``report`` raises there).
    When ``deadline`` (``deadline_stop``) stopped the epoch early, Keras still scores the selection
    split for that partial epoch, which is logged and reported like a full one (at the step of the
    epoch it interrupted), and the trial ends pruned with ``record.DEADLINE_STOP``.
    """
    import keras
    import optuna

    prunable = len(trial.study.directions) == 1

    class TrialCallback(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.started = self.trained = time.perf_counter()

        def on_test_begin(self, logs=None):
            self.trained = time.perf_counter()  # validation starts: the training part of the epoch ends

        def on_epoch_end(self, epoch, logs=None):
            metrics = epoch_metrics(logs or {}, self.model, seconds=time.perf_counter() - self.started,
                                    train_seconds=self.trained - self.started, train_images=train_images)
            # Step = epochs trained (from 1): the resource Hyperband and successive halving count, and
            # what the MLflow charts' step axis shows.
            run.log_metrics(metrics, step=epoch + 1)
            events.epoch_ended(trial.number, epoch, metrics)
            if record.SELECTION_TOP1 in metrics:
                if prunable and epoch + 1 not in reported:
                    trial.report(metrics[record.SELECTION_TOP1], epoch + 1)
                if deadline is not None and deadline.stopped_at is not None:
                    epochs = round(epoch + deadline.stopped_at, 2)
                    top1 = metrics[record.SELECTION_TOP1]
                    trial.set_user_attr(record.DEADLINE_STOP, {"epochs": epochs, record.SELECTION_TOP1: top1})
                    raise optuna.TrialPruned(f"stopped at the --timeout deadline after {epochs:g} epochs "
                                             f"(selection top-1 {top1:.3f})")
                # A trial that has trained its last epoch has finished its schedule: it completes, even where
                # a pruner's rung falls on that epoch (its model and probabilities are then kept).
                if prunable and epoch + 1 < self.params["epochs"] and trial.should_prune():
                    pruner = type(trial.study.pruner).__name__
                    raise optuna.TrialPruned(f"pruned after epoch {epoch + 1} of {self.params['epochs']} by "
                                             f"{pruner} (selection top-1 {metrics[record.SELECTION_TOP1]:.3f})")

    return TrialCallback()
