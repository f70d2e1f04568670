"""Running a sweep: checks first, then the study, its MLflow runs, its trials, and how it stops.

``run_sweep`` is what ``tinyopt sweep`` calls (in each worker process, when there are several). It
checks everything it can before it creates anything: the config when it loads, the storage and the
tracking store (reachable, within seconds), the data (prepared once, the slow part), the pretrained
weights. Only then does it open the study and the MLflow parent run, recover the trials of dead
workers, and run trials until ``trials``, ``timeout``, ``max_trials``, a signal or the failure
policy stops it. Rerunning it with the same study name and storage continues the study.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tinyopt.core import record, signals
from tinyopt.core import space as search_space
from tinyopt.core.config import load_config
from tinyopt.core.config.sections import Config
from tinyopt.core.errors import StudyError
from tinyopt.core.objective import objectives_of, of_config
from tinyopt.core.objective import of_study as objective_of_study
from tinyopt.core.summary import summarize_study
from tinyopt.core.urls import DEFAULT_STORAGE, DEFAULT_TRACKING_URI, redact
from tinyopt.data.splits import load_sweep_data
from tinyopt.models import approaches
from tinyopt.objectives.ensemble import EnsembleObjective, prepare_search
from tinyopt.objectives.model import ModelObjective, QuietEvents, TrialFailed
from tinyopt.stores import storage as storages
from tinyopt.sweep import recovery, warmstart
from tinyopt.sweep.stopping import FailurePolicy, TrialCap, stop_on_signal
from tinyopt.sweep.summary import SweepResult, log_summary, summarize
from tinyopt.track.names import identity
from tinyopt.train import backend


@dataclass
class Prepared:
    """A sweep checked and ready: the resolved config, its data and the device trials run on."""

    config: Config
    data: Any  # tinyopt.data.splits.SweepData, or for the ensemble its weight search and notes
    device: str
    warm_start: warmstart.WarmStart | None = None  # what --warm-start queues once the study is open


def prepare(approach: str, *, study_name: str | None = None, config_path: str | None = None,
            overrides: tuple[str, ...] = (), source: str | None = None, cache_dir: str | None = None,
            storage: str = DEFAULT_STORAGE, tracking_uri: str = DEFAULT_TRACKING_URI, progress: bool = True,
            preset: str | None = None, warm_start: str | None = None,
            warm_start_storage: str | None = None) -> Prepared:
    """Check a sweep without creating a study or a run: config, stores, data, weights, ensemble members.

    ``warm_start`` names an earlier study to start from (``--warm-start``), in ``warm_start_storage``
    (default ``storage``); its best trials are read here (``tinyopt.sweep.warmstart.plan``).

    Only the data cache may be written: ``tinyopt.data.cache.prepare`` decodes the dataset once (an
    interrupted or failed prepare leaves the cache as it was).

    Raises:
        TinyoptError: a bad config value, an unreachable storage or tracking store, bad data or weights,
            too few ensemble members, or a study to warm-start from that cannot be.
    """
    config = load_config(approach, config_path, overrides, preset=preset)
    if approach != "ensemble":
        backend.check()
        backend.set_gpu_memory(config.train.gpu_memory)
    storages.check(storage, study_name or approach)
    from tinyopt.track import store  # mlflow: after the config, whose mistakes are found in a blink

    store.check(tracking_uri)
    _check_study_approach(storage, study_name or approach, approach)
    warm = None if warm_start is None else warmstart.plan(approach, study_name or approach, config, storage,
                                                          warm_start, warm_start_storage)
    if approach == "ensemble":
        return Prepared(config, prepare_search(study_name or approach, config, storage, tracking_uri), "cpu (numpy)")
    data = load_sweep_data(config.data, source, cache_dir, progress)
    device = backend.load()
    if config.model.backbone is not None:
        from tinyopt.models import backbones

        backbones.check_weights(config.model)
    return Prepared(config, data, device, warm)


def _check_study_approach(storage: str, name: str, approach: str) -> None:
    """Refuse, before anything is created, a study that holds the trials of another approach.

    Raises:
        StudyError: the study exists and belongs to another approach.
    """
    _refuse_other_approach(name, storages.study_attr(storage, name, record.APPROACH), approach)


def _refuse_other_approach(name: str, owner: str | None, approach: str) -> None:
    if owner is not None and owner != approach:
        raise StudyError(f"study {name!r} holds {owner} trials, not {approach}; pass --study with another name")


def _refuse_other_objectives(name: str, made: list[str], wanted: list[str]) -> None:
    if made != wanted:
        raise StudyError(f"study {name!r} optimises study.objectives = {json.dumps(made)}, not {json.dumps(wanted)}; "
                         f"pass --study with another name for the new objectives, or --set "
                         f"'study.objectives={json.dumps(made)}' to continue it")


@dataclass
class Session:
    """An opened sweep: the study, where it lives, its tracker and what recovery found."""

    study: Any
    storage: Any
    url: str
    tracker: Any
    recovered: list[str]
    notes: list[str] = field(default_factory=list)  # for the sweep's end: what the warm start queued


def open_sweep(approach: str, name: str, config: Config, *, storage: str, tracking_uri: str,
               seed: int = 0, owner: bool = True, workers: int = 1,
               first_trial: dict[str, Any] | None = None, shares: Sequence[str] = (),
               warm_start: warmstart.WarmStart | None = None, forecast: dict[str, Any] | None = None) -> Session:
    """Create or load the study and its MLflow parent run, and recover the trials of dead workers.

    Everything happens under the study's lock, so workers that start together on fresh stores
    create one study, one first trial and one parent run between them.

    Args:
        owner: this process opens and closes the parent run (a worker of ``--workers`` does not).
        workers: how many worker processes will share the study (a SQLite study moves to a journal file).
        first_trial: the params of the study's first trial, enqueued when it has no trial yet
            (default: the defaults of the config's ``[space]``).
        shares: params sampled together as shares of one whole, summing to 1 (an ensemble's weights).
        warm_start: the earlier study's best params (``prepare``'s), queued after the first trial,
            once per study however many workers open it.
        forecast: ``tinyopt plan``'s forecast of the sweep (``--forecast``), kept by a study that has none.

    Raises:
        StudyError: the study belongs to another approach, or a store cannot be opened.
    """
    import optuna

    from tinyopt.sweep import sampling
    from tinyopt.track.tracking import Tracker

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with storages.study_lock(storage, name):
        # MLflow first: a tracking store that cannot be opened leaves no study behind.
        tracker = Tracker(tracking_uri, name, approach)
        url = (storages.move_to_journal(storage, name) if storages.needs_journal(storage, workers)
               else storages.home(storage, name))
        interval = config.study.heartbeat_interval
        opened = storages.open_storage(url, interval,
                                       on_stale=lambda trial: recovery.close_stale(tracker, trial, 2 * interval))
        pruner = sampling.make_pruner(config.study, sampling.max_epochs(config.space))
        # A study keeps the directions it was made with (ensemble studies made before minimised nothing).
        wanted = of_config(config)
        study = optuna.create_study(study_name=name, storage=opened, pruner=pruner,
                                    directions=[o.direction for o in wanted], load_if_exists=True)
        study.sampler = sampling.make_sampler(config.study, seed, shares=shares)
        owner_approach = study.user_attrs.get(record.APPROACH)
        _refuse_other_approach(name, owner_approach, approach)  # checked again: another command may have made it
        if owner_approach is None:
            study.set_user_attr(record.APPROACH, approach)
        if not study.metric_names and len(study.directions) == len(wanted):
            with storages.optuna_experimental():
                study.set_metric_names([o.name for o in wanted])  # optuna-dashboard's names for the values
        if config.ensemble is None:
            _refuse_other_objectives(name, [o.name for o in objectives_of(study)], [o.name for o in wanted])
        if not study.get_trials(deepcopy=False):
            # The first trial is a known-sane baseline for TPE to beat: the defaults of the space, or the
            # ensemble's greedy weights (tinyopt.objectives.voting.greedy_weights), so its best is at least theirs.
            if first_trial is None and config.space:
                first_trial = search_space.searched(config.space, search_space.defaults(config.space))
            if first_trial:
                study.enqueue_trial(first_trial)
        notes = [warmstart.queue(study, warm_start)] if warm_start is not None else []
        if forecast is not None and record.FORECAST not in study.user_attrs:
            study.set_user_attr(record.FORECAST, forecast)
        study.set_user_attr(record.CONFIG, config.as_dict())
        study.set_user_attr(record.EXPERIMENT_ID, tracker.experiment_id)
        tags = {"storage": redact(storage), record.TAG_BACKEND: backend.name()}
        # What the parallel-coordinates chart shows: MLflow draws only the runs that have each of its params.
        charted = list(shares) or search_space.in_every_trial(config.space or {})
        parent = tracker.start_sweep(config.as_dict(), identity(config), tags=tags, reopen=owner,
                                     objective=objective_of_study(study), searched=charted)
        study.set_user_attr(record.PARENT_RUN_ID, parent)
        recovered = recovery.recover(study, opened, tracker)
    pruning = sampling.pruning_note(config.study)
    return Session(study, opened, url, tracker, recovered, [pruning, *notes] if pruning else notes)


def run_sweep(approach: str, *, trials: int | None, timeout: float | None = None, max_trials: int | None = None,
              source: str | None = None, cache_dir: str | None = None, config_path: str | None = None,
              overrides: tuple[str, ...] = (), study_name: str | None = None, storage: str = DEFAULT_STORAGE,
              tracking_uri: str = DEFAULT_TRACKING_URI, seed: int = 0, events: Any = None, progress: bool = True,
              owner: bool = True, preset: str | None = None, warm_start: str | None = None,
              warm_start_storage: str | None = None, forecast: dict[str, Any] | None = None) -> SweepResult:
    """Run (or continue) the study of one approach and record every trial in MLflow.

    SIGINT and SIGTERM end it cleanly: the running trial is failed with the reason, every MLflow run
    of this process is closed, and the result says which signal stopped it (``exit_code`` 130/143).

    Args:
        approach: ``pretrained``, ``finetune``, ``scratch`` or ``ensemble``.
        trials: number of trials this process adds; ``None`` runs until ``timeout``.
        timeout: seconds from this call (data preparation included) at which the sweep ends: no trial starts
            after it, and a trial still training stops after its current batch and ends pruned.
        max_trials: start no trial once the study holds this many finished or running trials,
            counted over every worker of every machine.
        source: dataset source for ``tinyopt.data.cache.prepare`` (URL, zip or folder).
        cache_dir: dataset cache folder.
        config_path: a config file merged onto ``sweeps/<approach>.toml`` and the preset.
        overrides: ``key=value`` overrides.
        study_name: defaults to the approach.
        storage: Optuna storage URL.
        tracking_uri: MLflow tracking URI.
        seed: seeds the sampler and every trial.
        events: progress listener (see ``tinyopt.objectives.model.Events``).
        progress: show the data preparation progress bar.
        owner: open and close the parent run; False in the workers of ``tinyopt sweep --workers``.
        preset: a packaged preset (``cpu``: ``sweeps/cpu/<approach>.toml``) merged before ``config_path``.
        warm_start: an earlier study whose best trials the study starts with, once (``tinyopt.sweep.warmstart``).
        warm_start_storage: the storage of ``warm_start`` (default ``storage``).
        forecast: ``tinyopt plan``'s forecast (``Forecast.as_dict()``), stored with a new study to compare.

    Raises:
        TinyoptError: bad config, data, storage or weights; too many consecutive failed trials; or
            every trial of this run failed.
    """

    deadline = None if timeout is None else time.monotonic() + timeout
    events = events or QuietEvents()
    name = study_name or approach
    prepared = prepare(approach, study_name=name, config_path=config_path, overrides=overrides, source=source,
                       cache_dir=cache_dir, storage=storage, tracking_uri=tracking_uri, progress=progress,
                       preset=preset, warm_start=warm_start, warm_start_storage=warm_start_storage)
    config = prepared.config
    with signals.deferred(), _quiet_trial_failures():
        session = open_sweep(approach, name, config, storage=storage, tracking_uri=tracking_uri, seed=seed,
                             owner=owner,
                             first_trial=prepared.data[0].greedy_params() if approach == "ensemble" else None,
                             shares=[m.param for m in prepared.data[0].members] if approach == "ensemble" else (),
                             warm_start=prepared.warm_start, forecast=forecast)
        study, tracker = session.study, session.tracker
        policy = FailurePolicy(config.study.max_consecutive_failures)
        cap = TrialCap(study, max_trials, lambda: storages.study_lock(storage, name))
        ran: list[int] = []
        objective = None
        status, stopped, all_failed = "FAILED", None, False
        try:
            shown = prepared.device if approach == "ensemble" else f"{prepared.device} (Keras {backend.name()} backend)"
            events.sweep_started(shown, session.recovered)
            if approach == "ensemble":
                search, skipped = prepared.data
                objective = EnsembleObjective(search, config, tracker, events, notes=skipped,
                                              objective=objective_of_study(study))
            else:
                objective = ModelObjective(approaches.get_approach(approach), config, prepared.data, tracker,
                                           seed, events, prepared.device, deadline,
                                           checkpoint_dir=storages.checkpoint_dir(config.train.checkpoint_dir, storage))

            def counted(trial) -> float:
                cap.release()  # the trial exists now: other workers may count it
                ran.append(trial.number)
                return objective(trial)

            signals.raise_pending()
            # What is loaded by now (Keras, TensorFlow, MLflow, the data) lives as long as the sweep:
            # kept out of the collector's scans, the full collection each trial's clear_session runs
            # takes milliseconds instead of about a second.
            gc.freeze()
            command = _command()

            def summarize_in_mlflow(study, trial) -> None:
                log_summary(tracker, study, summarize_study(study), trial.number, command)

            if cap.acquire():
                left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
                study.optimize(counted, n_trials=trials, timeout=left, catch=(TrialFailed,),
                               callbacks=[policy, cap, summarize_in_mlflow, stop_on_signal])
            stopped, all_failed = signals.pending(), _all_failed(study, ran)
            status = "KILLED" if stopped else "FAILED" if policy.stopped or all_failed else "FINISHED"
        except signals.Interrupted as err:
            stopped, status = err, "KILLED"
            objective.notes.extend(recovery.requeue_preempted(study, ran[-1:]))  # ran: objective is made
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            cap.release()
            if owner:
                tracker.end_sweep(status)
    result = summarize(study, storage, tracking_uri, new_trials=len(ran))
    result.notes = session.notes + list(getattr(objective, "notes", [])) + deadline_notes(study, ran)
    result.recovered = session.recovered
    if stopped is not None:
        result.interrupted, result.exit_code = stopped.name, stopped.exit_code
        return result
    if policy.stopped:
        raise StudyError(f"stopped after {policy.limit} consecutive failed trials (last: {policy.last_reason}); "
                         "see the FAILED runs in MLflow, fix the config, and rerun to continue the study")
    if all_failed:
        raise StudyError(f"all {len(ran)} trials of this run failed (last: {_reason(study, ran[-1])}); "
                         "see the FAILED runs in MLflow, fix the cause, and rerun to continue the study")
    return result


def deadline_notes(study: Any, numbers: list[int]) -> list[str]:
    """One note per trial of ``numbers`` that the ``--timeout`` deadline stopped."""
    notes = []
    trials = study.get_trials(deepcopy=False)
    for number in numbers:
        stop = trials[number].user_attrs.get(record.DEADLINE_STOP)
        if stop:
            notes.append(f"trial {number} was still training at the --timeout deadline: stopped after "
                         f"{stop['epochs']:g} epochs and recorded as pruned "
                         f"(selection top-1 {stop[record.SELECTION_TOP1]:.3f} then)")
    return notes


def _command() -> str:
    """The command line that runs this sweep, as the parent run's description shows it (secrets hidden)."""
    program = "tinyopt" if sys.argv and sys.argv[0].endswith(("tinyopt", "tinyopt/__main__.py")) else sys.argv[0]
    return redact(shlex.join([program, *sys.argv[1:]]))


def _all_failed(study, numbers: list[int]) -> bool:
    import optuna

    trials = study.get_trials(deepcopy=False)
    return bool(numbers) and all(trials[n].state == optuna.trial.TrialState.FAIL for n in numbers)


def _reason(study, number: int) -> str:
    return study.get_trials(deepcopy=False)[number].user_attrs.get(record.FAIL_REASON, "unknown")


@contextlib.contextmanager
def _quiet_trial_failures():
    """Drop Optuna's "Trial N failed" warning and its traceback while trials run.

    tinyopt reports a failure itself: one line in the terminal, the reason and the traceback in the
    trial's MLflow run. (An interrupted trial would otherwise print a KeyboardInterrupt traceback.)
    """

    class _Filter(logging.Filter):
        def filter(self, log: logging.LogRecord) -> bool:
            return " failed with " not in log.getMessage()

    logger = logging.getLogger("optuna.study._optimize")  # where Optuna logs a failed trial
    dropped = _Filter()
    logger.addFilter(dropped)
    try:
        yield
    finally:
        logger.removeFilter(dropped)
