"""Trials queued again: a dead worker's (at most twice) and a preempted one's (always), and what they carry.

Optuna's ``RetryHeartbeatStaleTrialCallback`` makes the retry: a WAITING trial with the same params,
whose ``retry_history`` names the trials it replaces. Here it also keeps the reports the pruner
already has, since the retry resumes after them from the trial's checkpoint, and drops the user
attrs that described the attempt it replaces.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator
from typing import Any

from tinyopt.core import record

# What a trial queued again keeps of the attempt it replaces: its params, and its run and seed, which the
# retry continues (same seed; the earlier epochs carried over), and where a warm start took its params from.
# The rest described that attempt only: its worker (a dead process, which recovery would take the retry for),
# why it failed, when it stopped.
CARRIED_ON_RETRY = (record.PARAMS, record.RUN_ID, record.RUN_URL, record.SEED, record.WARM_START_FROM)
# A trial whose worker died is queued again twice at most: a third death is the trial's own doing (OOM).
MAX_RETRIES = 2


def retry_callback(max_retry: int | None = MAX_RETRIES) -> Any:
    """What happens to a trial whose worker died: queued again with the same params, at most ``max_retry`` times.

    The retry keeps the reports the pruner already has (it resumes after them, from the trial's
    checkpoint) and ``CARRIED_ON_RETRY`` of the user attrs.
    """
    import optuna

    with optuna_experimental():
        class Retry(optuna.storages.RetryHeartbeatStaleTrialCallback):
            def __call__(self, study: Any, trial: Any) -> None:
                kept = copy.copy(trial)
                kept.user_attrs = {key: value for key, value in trial.user_attrs.items() if key in CARRIED_ON_RETRY}
                super().__call__(study, kept)

        return Retry(max_retry=max_retry, inherit_intermediate_values=True)


def requeue(study: Any, number: int) -> int | None:
    """Queue trial ``number`` (failed by a preemption) again, like a dead worker's; the new trial's number.

    A preemption is no fault of the trial, so it is queued again however often it was before.
    """
    import optuna

    trial = study.get_trials(deepcopy=False)[number]
    before = len(study.get_trials(deepcopy=False))
    retry_callback(max_retry=None)(study, trial)
    waiting = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
    again = [t.number for t in waiting if t.number >= before and t.system_attrs.get("retry_history", [None])[-1]
             == number]
    return again[0] if again else None


def retried_from(trial: Any) -> int | None:
    """The number of the trial that ``trial`` (running) was queued again to replace, the first of a chain; or None."""
    import optuna

    with optuna_experimental():
        return optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(
            trial.study.get_trials(deepcopy=False)[trial.number])


def standing(study: Any) -> list[Any]:
    """The trials that count towards ``--max-trials``: finished or running, less those queued again.

    A failed trial that was queued again (a dead worker's, a preempted one) is replaced by its retry,
    which counts once it starts.
    """
    import optuna

    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL,
              optuna.trial.TrialState.RUNNING)
    trials = study.get_trials(deepcopy=False)
    replaced = {number for trial in trials for number in trial.system_attrs.get("retry_history", ())}
    return [trial for trial in trials if trial.state in states and trial.number not in replaced]


@contextlib.contextmanager
def optuna_experimental() -> Iterator[None]:
    """Silence Optuna's ExperimentalWarning: heartbeats and retries are how it recovers a dead worker's trial."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield
