"""What ends a sweep before its trials are done: ``--max-trials``, a deferred signal, failures in a row.

Each is an Optuna callback, called when a trial ends, that calls ``study.stop()``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tinyopt.core import record, signals
from tinyopt.stores import retries


def stop_on_signal(study, _trial) -> None:
    """Start no trial after a deferred SIGINT/SIGTERM: the one that was running has ended."""
    if signals.pending():
        study.stop()


class TrialCap:
    """``--max-trials``: no trial starts once the study holds ``limit`` finished or running trials.

    Optuna's ``MaxTrialsCallback`` counts after each trial ends, so K workers that pass the check
    together overshoot by up to K - 1. Here the count and the creation of the next trial happen
    under the study's lock (a file lock, or an advisory lock in the database, shared by every
    machine): the lock is taken when a trial ends (Optuna calls this object as a callback), and
    released once the next trial exists (``release`` at the top of the objective).
    """

    def __init__(self, study: Any, limit: int | None, lock: Callable[[], Any]):
        self.study = study
        self.limit = limit
        self._lock = lock
        self._held: Any = None

    def acquire(self) -> bool:
        """Take the lock and say whether another trial may start (releasing the lock if not)."""
        if self.limit is None:
            return True
        self._held = self._lock()
        self._held.__enter__()
        if len(retries.standing(self.study)) < self.limit:
            return True
        self.release()
        return False

    def release(self) -> None:
        if self._held is not None:
            held, self._held = self._held, None
            held.__exit__(None, None, None)

    def __call__(self, study, _trial) -> None:
        if not self.acquire():
            study.stop()


class FailurePolicy:
    """Stops the study after ``limit`` failed trials in a row: something is wrong with every trial."""

    def __init__(self, limit: int):
        self.limit = limit
        self.in_a_row = 0
        self.stopped = False
        self.last_reason = ""

    def __call__(self, study, trial) -> None:
        import optuna

        if trial.state != optuna.trial.TrialState.FAIL:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        self.last_reason = trial.user_attrs.get(record.FAIL_REASON, "unknown")
        if self.limit and self.in_a_row >= self.limit:
            self.stopped = True
            study.stop()
