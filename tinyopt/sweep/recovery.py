"""Trials whose process died: failed, queued again with the same params, their MLflow runs closed.

A process killed without a word (SIGKILL, the OOM killer, a power cut) leaves its trial RUNNING.
Two ways find such trials, when a sweep starts and when the supervisor of ``--workers`` sees a
worker die:

- every trial records the process that runs it (``record.WORKER``: host, pid, start time); a trial
  whose process is gone from this machine is dead at once, on every storage;
- on database storages, a trial whose heartbeat stopped is dead (Optuna's ``fail_stale_trials``);
  that is the only way to tell for a worker on another machine. Optuna also runs that check in
  every living worker before each trial: ``close_stale`` closes the run of a trial failed there.

A dead trial is failed and queued again with its params by Optuna's
``RetryHeartbeatStaleTrialCallback`` (at most twice), and its MLflow run is closed as FAILED.
Recovery also closes every trial run still RUNNING whose trial is not (failed by a heartbeat
check whose process could not close the run, or ended by a process killed before it closed it),
with the status of the trial's state.
"""

from __future__ import annotations

from typing import Any

from tinyopt.core import record
from tinyopt.core.worker import is_dead
from tinyopt.stores.retries import optuna_experimental, requeue, retry_callback


def recover(study: Any, storage: Any, tracker: Any, when: str = "when the next sweep started") -> list[str]:
    """Fail, retry and close the trials of ``study`` whose process died, and close the runs of ended trials.

    Args:
        study: the Optuna study.
        storage: its storage object (as opened by ``tinyopt.stores.storage.open_storage``).
        tracker: the study's ``tinyopt.track.tracking.Tracker``, to close the dead trials' runs.
        when: when the trials were found dead, as the closed runs' reason says it.

    Returns:
        One message per trial recovered and per run closed.
    """
    import optuna

    running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    dead: dict[int, str] = {}
    if running:
        with optuna_experimental():
            optuna.storages.fail_stale_trials(study)  # heartbeats; a no-op on SQLite and journal files
            retry = retry_callback()
        study_id = storage.get_study_id_from_name(study.study_name)
        for trial in running:
            trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
            current = storage.get_trial(trial_id)
            worker = current.user_attrs.get(record.WORKER)
            if current.state == optuna.trial.TrialState.FAIL and record.FAIL_REASON not in current.user_attrs:
                dead[trial.number] = "its worker sent no heartbeat"
            elif current.state == optuna.trial.TrialState.RUNNING and worker and is_dead(worker):
                try:
                    if storage.set_trial_state_values(trial_id, state=optuna.trial.TrialState.FAIL):
                        retry(study, storage.get_trial(trial_id))
                        dead[trial.number] = f"its worker, pid {worker['pid']} on {worker['host']}, is gone"
                except optuna.exceptions.UpdateFinishedTrialError:
                    pass  # another process recovered it first
    messages = [_close(study, tracker, number, reason, when) for number, reason in dead.items()]
    return messages + _close_ended_runs(study, tracker)


def requeue_preempted(study: Any, numbers: list[int]) -> list[str]:
    """Queue again those of trials ``numbers`` that a preemption failed (``record.PREEMPTED_BY``); a note for each."""
    import optuna

    trials = study.get_trials(deepcopy=False)
    notes = []
    for number in numbers:
        trial = trials[number]
        preempted = trial.user_attrs.get(record.PREEMPTED_BY)
        if trial.state == optuna.trial.TrialState.FAIL and preempted:
            retry = requeue(study, number)
            notes.append(f"trial {number} was stopped by {preempted} and queued again as trial {retry}: the next "
                         "`tinyopt sweep` of the study resumes it from its last checkpoint")
    return notes


def fail_interrupted(study: Any, storage: Any, tracker: Any, numbers: list[int], reason: str,
                     preempted_by: str | None = None) -> None:
    """Fail trials whose worker was killed after it ignored SIGINT/SIGTERM, as the signal would have.

    Like a trial the signal interrupted, they are queued again only where the signal was a preemption
    (``preempted_by``, as ``study.requeue`` says); else the user stopped the sweep.
    """
    import optuna

    study_id = storage.get_study_id_from_name(study.study_name)
    for number in numbers:
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, number)
        try:
            storage.set_trial_user_attr(trial_id, record.FAIL_REASON, reason)
            if preempted_by:
                storage.set_trial_user_attr(trial_id, record.PREEMPTED_BY, preempted_by)
            storage.set_trial_state_values(trial_id, state=optuna.trial.TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # it ended after all
        if preempted_by:
            requeue(study, number)
        run_id = storage.get_trial(trial_id).user_attrs.get(record.RUN_ID)
        if run_id:
            tracker.close_run(run_id, "KILLED", f"{reason} (its worker did not stop and was killed)")


def close_stale(tracker: Any, trial: Any, grace_seconds: int) -> None:
    """Close the run of a trial that a heartbeat check just failed (Optuna calls this in a living worker).

    Never raises: the worker that runs the check goes on with its own trial, and the next sweep's
    ``recover`` closes a run this could not.
    """
    run_id = trial.user_attrs.get(record.RUN_ID)
    if not run_id:
        return
    try:
        tracker.close_run(run_id, "FAIL", f"its worker sent no heartbeat for {grace_seconds} s; the trial was failed "
                                          "by another worker's heartbeat check")
    except Exception:  # noqa: BLE001 - see the docstring
        pass


def _close(study: Any, tracker: Any, number: int, why: str, when: str) -> str:
    import optuna

    trials = study.get_trials(deepcopy=False)
    run_id = trials[number].user_attrs.get(record.RUN_ID)
    if run_id:
        tracker.close_run(run_id, "FAIL", f"{why}; the trial was failed {when}")
    again = [t.number for t in trials if t.state == optuna.trial.TrialState.WAITING
             and t.system_attrs.get("retry_history", [None])[-1] == number]
    retried = f", queued again as trial {again[0]}" if again else ", not retried (it was retried twice already)"
    return f"recovered trial {number}: left RUNNING ({why}); failed{retried}"


def _close_ended_runs(study: Any, tracker: Any) -> list[str]:
    """Close the trial runs still RUNNING whose trial has ended, each with the status of its trial's state."""
    import optuna

    trials = study.get_trials(deepcopy=False)
    messages = []
    for number, run_id in sorted(tracker.open_trial_runs().items()):
        if number >= len(trials) or trials[number].state in (optuna.trial.TrialState.RUNNING,
                                                             optuna.trial.TrialState.WAITING):
            continue
        trial = trials[number]
        reason = None
        if trial.state == optuna.trial.TrialState.FAIL:
            reason = trial.user_attrs.get(record.FAIL_REASON, "its worker died: a heartbeat check failed the trial")
        if tracker.close_run(run_id, trial.state.name, reason):
            messages.append(f"closed the MLflow run of trial {number}: left RUNNING though the trial is "
                            f"{trial.state.name}")
    return messages
