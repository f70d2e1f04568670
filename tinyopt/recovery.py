"""Trials whose process died: failed, queued again with the same params, their MLflow runs closed.

A process killed without a word (SIGKILL, the OOM killer, a power cut) leaves its trial RUNNING.
Two ways find such trials when a sweep starts:

- every trial records the process that runs it (``record.WORKER``: host, pid, start time); a trial
  whose process is gone from this machine is dead at once, on every storage;
- on database storages, a trial whose heartbeat stopped is dead (Optuna's ``fail_stale_trials``);
  that is the only way to tell for a worker on another machine.

A dead trial is failed and queued again with its params by Optuna's
``RetryHeartbeatStaleTrialCallback`` (at most twice), and its MLflow run is closed as FAILED.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

from tinyopt import record
from tinyopt.storage import optuna_experimental, retry_callback


def identity() -> dict[str, Any]:
    """This process, as recorded on the trials it runs."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": _start_time(os.getpid())}


def _start_time(pid: int) -> int | None:
    """When the process started (clock ticks since boot, Linux), so that a reused pid is not mistaken for it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The second field, the command name, may hold spaces and parentheses: count from its end.
    return int(stat.rsplit(")", 1)[1].split()[19])


def is_dead(worker: dict[str, Any]) -> bool:
    """Whether the process that ran a trial is known to be gone (only a process of this machine can be known)."""
    if worker.get("host") != socket.gethostname():
        return False
    pid = int(worker["pid"])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, under another user
        return False
    started = _start_time(pid)
    return started is not None and worker.get("started") is not None and started != worker["started"]


def recover(study: Any, storage: Any, tracker: Any) -> list[str]:
    """Fail, retry and close the trials of ``study`` whose process died; one message per trial recovered.

    Args:
        study: the Optuna study.
        storage: its storage object (as opened by ``tinyopt.storage.open_storage``).
        tracker: the study's ``tinyopt.tracking.Tracker``, to close the dead trials' runs.
    """
    import optuna

    running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    if not running:
        return []
    with optuna_experimental():
        optuna.storages.fail_stale_trials(study)  # heartbeats; a no-op on SQLite and journal files
        retry = retry_callback()
    study_id = storage.get_study_id_from_name(study.study_name)
    dead: dict[int, str] = {}
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
    return [_close(study, tracker, number, reason) for number, reason in dead.items()]


def _close(study: Any, tracker: Any, number: int, why: str) -> str:
    import optuna

    trials = study.get_trials(deepcopy=False)
    run_id = trials[number].user_attrs.get(record.RUN_ID)
    if run_id:
        tracker.close_if_running(run_id, f"{why}; the trial was failed when the next sweep started")
    again = [t.number for t in trials if t.state == optuna.trial.TrialState.WAITING
             and t.system_attrs.get("retry_history", [None])[-1] == number]
    retried = f", queued again as trial {again[0]}" if again else ", not retried (it was retried twice already)"
    return f"recovered trial {number}: left RUNNING ({why}); failed{retried}"
