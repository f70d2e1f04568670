"""Running a sweep: storage, study, sampler, pruner, data, tracking and the failure policy.

``run_sweep`` is what ``tinyopt sweep`` calls. Rerunning it with the same study name and storage
continues the study: Optuna keeps every trial, MLflow reopens the study's parent run.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tinyopt import space as search_space
from tinyopt.config import load_config
from tinyopt.errors import StudyError
from tinyopt.urls import redact

DEFAULT_STORAGE = "sqlite:///studies/tinyopt.db"
DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"


@dataclass
class SweepResult:
    """What a finished sweep reports: counts, the best trials and where to look at them."""

    study_name: str
    approach: str
    storage: str
    counts: dict[str, int]
    top: list[dict[str, Any]]
    ui_command: str
    new_trials: int = 0
    notes: list[str] = field(default_factory=list)


@contextlib.contextmanager
def _optuna_experimental():
    """Silence Optuna's ExperimentalWarning around heartbeats.

    Heartbeats are marked experimental, yet they are Optuna's way to recover a dead worker's trial.
    """
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


def open_storage(url: str, heartbeat_interval: int = 60):
    """An Optuna storage for a URL.

    ``sqlite:///file.db`` (one process), ``postgresql+psycopg://...`` or ``mysql+...://`` (several
    workers, with heartbeats so that a killed worker's trial is failed and retried), or
    ``journal:PATH`` (Optuna's journal file, several processes on one file system).

    Raises:
        StudyError: an unsupported scheme or a database that cannot be reached.
    """
    import optuna
    import sqlalchemy.exc

    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend

        path = Path(url.removeprefix("journal:"))
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        kwargs: dict[str, Any] = {}
    elif url.split(":", 1)[0].split("+")[0] in ("postgresql", "mysql"):
        # Several workers share this database: a worker that dies leaves a RUNNING trial behind,
        # which the heartbeat turns into FAIL and the callback re-queues with the same params.
        with _optuna_experimental():
            retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2)
        kwargs = {
            "heartbeat_interval": heartbeat_interval,
            "grace_period": 2 * heartbeat_interval,
            "heartbeat_stale_trial_callback": retry,
            "engine_kwargs": {"pool_pre_ping": True},
        }
    else:
        raise StudyError(f"unsupported storage URL {redact(url)!r}; use sqlite:///FILE.db, "
                         "postgresql+psycopg://USER@HOST/DB or journal:PATH")
    try:
        with _optuna_experimental():
            return optuna.storages.RDBStorage(url, **kwargs)
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError) as err:
        first = redact(str(err).strip().splitlines()[0]) if str(err).strip() else type(err).__name__
        raise StudyError(f"cannot open Optuna storage {redact(url)} ({first}); check --storage "
                         "(PostgreSQL needs `pip install tinyopt[postgres]`)") from err


def make_sampler(study_cfg: dict[str, Any], seed: int):
    """The configured sampler, seeded."""
    import optuna

    name = study_cfg.get("sampler", "tpe")
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=int(study_cfg.get("n_startup_trials", 10)))
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise StudyError(f"unknown study.sampler {name!r}; use tpe or random")


def make_pruner(study_cfg: dict[str, Any], max_epochs: int):
    """The configured pruner: ``median``, ``hyperband`` or ``none``."""
    import optuna

    name = study_cfg.get("pruner", "median")
    warmup = int(study_cfg.get("pruner_warmup_epochs", 1))
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=int(study_cfg.get("n_startup_trials", 5)),
                                           n_warmup_steps=warmup)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(warmup, 1), max_resource=max(max_epochs, 1))
    if name == "none":
        return optuna.pruners.NopPruner()
    raise StudyError(f"unknown study.pruner {name!r}; use median, hyperband or none")


def open_study(name: str, approach: str, storage: Any, config: dict[str, Any], seed: int):
    """Create or load a study and check that it belongs to ``approach``."""
    import optuna

    study_cfg = config.get("study", {})
    epochs = config.get("space", {}).get("epochs", 1)
    max_epochs = epochs["high"] if search_space.is_distribution(epochs) else int(epochs)
    study = optuna.create_study(study_name=name, storage=storage, pruner=make_pruner(study_cfg, max_epochs),
                                direction="maximize", load_if_exists=True)
    # Offset the seed by the trials already run, or a rerun would replay the same random start-up trials.
    study.sampler = make_sampler(study_cfg, seed + len(study.get_trials(deepcopy=False)))
    owner = study.user_attrs.get("approach")
    if owner is None:
        study.set_user_attr("approach", approach)
    elif owner != approach:
        raise StudyError(f"study {name!r} holds {owner} trials, not {approach}; pass --study with another name")
    return study


def load_sweep_data(config: dict[str, Any], source: str | None, cache_dir: str | None, progress: bool):
    """Prepare (once) and load the splits a model approach needs, sliced as ``[data]`` says."""
    from tinyopt import data
    from tinyopt.objectives import SweepData

    cache = _prepared_cache(cache_dir) if source is None else None
    if cache is None:
        cache = data.prepare(source, cache_dir, progress=progress)
    data_cfg = config.get("data", {})
    splits = {}
    for split in ("train", "selection", "test"):
        x, y = data.load_split(split, cache)
        cap = int(data_cfg.get(f"{split}_per_class", 0))
        if cap:
            keep = data.stratified_subset(y, per_class=cap, seed=int(data_cfg.get("seed", 0)))
            x, y = x[keep], y[keep]
        splits[split] = (x, y)
    return SweepData(splits=splits, classes=data.load_classes(cache))


def _prepared_cache(cache_dir: str | None):
    """The cache when it already holds a prepared dataset: a sweep without --data uses it as it is."""
    from tinyopt import data
    from tinyopt.errors import DataError

    try:
        data.info(cache_dir)
    except DataError:
        return None
    return cache_dir if cache_dir is not None else data.default_cache_dir()


def run_sweep(approach: str, *, trials: int | None, timeout: float | None = None, source: str | None = None,
              cache_dir: str | None = None, config_path: str | None = None, overrides: tuple[str, ...] = (),
              study_name: str | None = None, storage: str = DEFAULT_STORAGE,
              tracking_uri: str = DEFAULT_TRACKING_URI, seed: int = 0, events: Any = None,
              progress: bool = True) -> SweepResult:
    """Run (or continue) the study of one approach and record every trial in MLflow.

    Args:
        approach: ``pretrained``, ``finetune``, ``scratch`` or ``ensemble``.
        trials: number of trials to add; ``None`` runs until ``timeout``.
        timeout: stop starting new trials after this many seconds.
        source: dataset source for ``tinyopt.data.prepare`` (URL, zip or folder).
        cache_dir: dataset cache folder.
        config_path: a config file merged onto ``sweeps/<approach>.toml``.
        overrides: ``key=value`` overrides.
        study_name: defaults to the approach.
        storage: Optuna storage URL.
        tracking_uri: MLflow tracking URI.
        seed: seeds the sampler and every trial.
        events: progress listener (see ``tinyopt.objectives.Events``).
        progress: show the data preparation progress bar.

    Raises:
        TinyoptError: bad config, data, storage or weights, or too many consecutive failed trials.
    """
    import optuna

    from tinyopt.objectives import ModelObjective, TrialFailed
    from tinyopt.tracking import Tracker

    config = load_config(approach, config_path, overrides)
    name = study_name or approach
    study_cfg = config.get("study", {})
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    opened = open_storage(storage, int(study_cfg.get("heartbeat_interval", 60)))
    if approach != "ensemble":
        from tinyopt.approaches import get_approach

        module = get_approach(approach)
        # Before the study exists: bad data leaves no empty study behind.
        sweep_data = load_sweep_data(config, source, cache_dir, progress)
    study = open_study(name, approach, opened, config, seed)
    before = len(study.get_trials(deepcopy=False))
    if before == 0 and config.get("space"):
        # The first trial runs the defaults of the space: a known-sane baseline for TPE to beat.
        defaults = search_space.defaults(config["space"])
        study.enqueue_trial(search_space.searched(config["space"], defaults), skip_if_exists=True)

    tracker = Tracker(tracking_uri, name, approach)
    study.set_user_attr("config", config)
    study.set_user_attr("mlflow_experiment_id", tracker.experiment_id)
    parent = tracker.start_sweep(config, tags={"storage": redact(storage)})
    _close_runs_of_dead_workers(study, tracker)
    study.set_user_attr("mlflow_parent_run_id", parent)
    if approach == "ensemble":
        from tinyopt.ensemble import make_ensemble_objective

        objective = make_ensemble_objective(study, config, opened, tracker, tracking_uri, events)
    else:
        objective = ModelObjective(module, config, sweep_data, tracker, seed, events)
    policy = _FailurePolicy(int(study_cfg.get("max_consecutive_failures", 5)))
    status = "FAILED"
    try:
        study.optimize(objective, n_trials=trials, timeout=timeout, catch=(TrialFailed,), callbacks=[policy])
        status = "FAILED" if policy.stopped else "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracker.end_sweep(status)
    if policy.stopped:
        raise StudyError(f"stopped after {policy.limit} consecutive failed trials (last: {policy.last_reason}); "
                         "see the FAILED runs in MLflow, fix the config, and rerun to continue the study")
    result = summarize(study, storage, tracking_uri, new_trials=len(study.get_trials(deepcopy=False)) - before)
    result.notes = list(getattr(objective, "notes", []))
    return result


def _close_runs_of_dead_workers(study, tracker) -> None:
    """Fail the trials whose worker died (heartbeat gone), and their MLflow runs with them.

    A killed worker cannot close its own runs; Optuna marks its trial FAIL (and, with the retry
    callback, queues it again), and the run that stayed RUNNING is closed here as FAILED.
    """
    import optuna

    with _optuna_experimental():
        optuna.storages.fail_stale_trials(study)
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,)):
        if "mlflow_run_id" in trial.user_attrs and "fail_reason" not in trial.user_attrs:
            tracker.close_if_running(trial.user_attrs["mlflow_run_id"], "its worker stopped (no heartbeat)")


class _FailurePolicy:
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
        self.last_reason = trial.user_attrs.get("fail_reason", "unknown")
        if self.limit and self.in_a_row >= self.limit:
            self.stopped = True
            study.stop()


def summarize(study, storage: str, tracking_uri: str, new_trials: int = 0, top: int = 5) -> SweepResult:
    """Counts by state and the ``top`` best complete trials of a study."""
    import optuna

    from tinyopt.tracking import ui_command

    trials = study.get_trials(deepcopy=False)
    counts = {state.name: 0 for state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED,
                                          optuna.trial.TrialState.FAIL, optuna.trial.TrialState.RUNNING)}
    for trial in trials:
        if trial.state.name in counts:
            counts[trial.state.name] += 1
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    best = sorted(complete, key=lambda t: t.value, reverse=True)[:top]
    rows = [{"number": t.number, "value": t.value, "test_top1": t.user_attrs.get("test_top1"),
             "params": t.params, "run_id": t.user_attrs.get("mlflow_run_id")} for t in best]
    return SweepResult(study_name=study.study_name, approach=study.user_attrs.get("approach", ""),
                       storage=redact(storage), counts=counts, top=rows, ui_command=ui_command(tracking_uri),
                       new_trials=new_trials)

