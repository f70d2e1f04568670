"""MLflow tracking: the only module that imports mlflow.

One MLflow experiment per study, one parent run per study (reopened by each sweep of it), and one
nested run per trial whose status follows the trial: COMPLETE -> FINISHED, PRUNED -> KILLED,
FAIL -> FAILED with the reason. Logging goes through ``MlflowClient`` with explicit run ids, so
nothing depends on MLflow's global "active run".

What a reviewer reads in the MLflow UI is made here too: the parent run is the sweep's summary
(best selection top-1 so far by trial number, counts, compute time, the best trial's link, the
history and importance plots, a description), a trial's run is named after the params that tell
trials apart (``t12 stages=2 adamw lr=3e-4``), carries only the searched and a few identifying
params, a description with every value, and the tags ``best`` and ``model_kept``; a kept model is
an MLflow logged model of the Keras flavour.

A trial run logs in the background, on one thread per tracker, in the order it was asked to: of
its logging, the trial itself only creates its run and saves its model file, and its run is closed
once everything logged before the close is stored. A sweep runs at most one trial ahead of its logging.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus, RunTag

from tinyopt.core import record
from tinyopt.core.damage import MLFLOW_FIX, damage_message
from tinyopt.core.errors import StudyError
from tinyopt.core.locks import file_lock
from tinyopt.core.urls import first_line, redact
from tinyopt.stores.storage import check_file, is_database, probe_database, read_sqlite

# MLflow's INFO lines (database migrations, run links) would interleave with the sweep's progress.
logging.getLogger("mlflow").setLevel(logging.WARNING)
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

_PARAM_LIMIT = 6000  # MLflow rejects longer param values
_TAG_LIMIT = 8000  # ... and longer tag values
_KERAS_FILE = "data/model.keras"  # where the mlflow.keras flavour keeps the model in a logged model's folder
_CHECK_TIMEOUT = 5  # seconds: an unreachable server fails the sweep before it starts, not after 4 minutes of retries
_FIX = "check --tracking-uri (sqlite:///FILE.db, the http(s) URL of an mlflow server, or a database URL)"
_OPENED: set[Path] = set()  # SQLite stores this process has opened (and MLflow created or migrated)
# Where `tinyopt ui` serves an embedded store: the links an Optuna trial carries to its run.
DEFAULT_UI = "http://127.0.0.1:5000"
# MLflow metrics keep 4 significant digits: a top-1 over 5,000 images moves by 2e-4, and 0.46399998664855957
# (float32 through float64) is noise to a reader.
_DIGITS = 4
_UNSAFE = re.compile(r"[^\w.\-]")  # MLflow accepts only these characters in param and metric names
_SHORT_KEYS = {"learning_rate": "lr", "weight_decay": "wd", "batch_size": "bs", "label_smoothing": "ls",
               "trainable_stages": "train_stages", "input_size": "px"}
_STATE_NAMES = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running"}


def safe_name(text: str) -> str:
    """``text`` with every character MLflow rejects in param and metric names replaced by ``_``."""
    return _UNSAFE.sub("_", text)


def short_value(value: Any) -> str:
    """A value as a run name shows it: ``3e-4``, ``0.25``, ``160``, ``adamw``, ``True``."""
    if isinstance(value, float) and not isinstance(value, bool):
        if value != 0 and (abs(value) < 1e-2 or abs(value) >= 1e4):
            mantissa, exponent = f"{value:.1e}".split("e")
            return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
        return f"{value:.3g}"
    return str(value)


def run_name(number: int, headline: dict[str, Any]) -> str:
    """``t12 stages=2 adamw lr=3e-4``: the trial number, then its telling params (a word alone is its own label)."""
    parts = [f"t{number}"]
    for key, value in headline.items():
        shown = short_value(value)
        # A word names itself (adamw, bicubic); "none" would not say of what.
        alone = isinstance(value, str) and value != "none"
        parts.append(shown if alone else f"{_SHORT_KEYS.get(key, key)}={shown}")
    return " ".join(parts)


def config_hash(config: dict[str, Any]) -> str:
    """A short digest of the resolved config: equal hashes, equal configs (the config itself is ``config.json``)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:12]


def identity(config: dict[str, Any]) -> dict[str, Any]:
    """The few params that say what a run is, beside the searched ones: approach, backbone, weights, data slice."""
    model, data = config.get("model", {}), config.get("data", {})
    found: dict[str, Any] = {"approach": config.get("approach", "")}
    if "backbone" in model:
        found["backbone"] = f"{model['backbone']}" + (f" alpha={model['alpha']}" if model["backbone"] == "mobilenet"
                                                      else "")
    if "weights" in model:
        found["weights"] = Path(str(model["weights"])).name  # a path says where, its name says which
    if data:
        caps = [f"{split}={data.get(f'{split}_per_class', 0) or 'all'}" for split in ("train", "selection", "test")]
        found["data"] = "per class " + " ".join(caps)
    if "ensemble" in config:
        found["members_of"] = ",".join(config["ensemble"].get("studies", []))
    found[record.CONFIG_HASH] = config_hash(config)
    return found


def _markdown_table(params: dict[str, Any]) -> list[str]:
    rows = [f"| {key} | {short_value(value)} |" for key, value in params.items()]
    return ["| param | value |", "| --- | --- |", *rows]


def _round(value: float) -> float:
    return float(f"{float(value):.{_DIGITS}g}")


def _client(tracking_uri: str) -> MlflowClient:
    # The registry defaults to the tracking store; set both so that model registration works too.
    local = _sqlite_path(tracking_uri)
    if local is None or local in _OPENED:
        return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    # A damaged store is one line here, not MLflow's and SQLAlchemy's chained tracebacks later.
    check_file(local, "the MLflow store", _FIX, writable=False, read=read_sqlite)
    local.parent.mkdir(parents=True, exist_ok=True)
    # MLflow creates and migrates a new SQLite store when it first opens it; two processes doing it
    # at once fail ("duplicate column name"), so each process's first open takes its turn.
    with file_lock(local.with_name(f"{local.name}.tinyopt-lock")):
        client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        client.search_experiments(max_results=1)
    _OPENED.add(local)
    return client


def check(tracking_uri: str) -> None:
    """Make sure the tracking store can be reached, without creating anything in it.

    A local SQLite store must be intact and writable, with its artifacts folder, or be a file its
    folder can hold; a server must answer an MLflow API request within a few seconds (MLflow's own
    client would retry for minutes).

    Raises:
        StudyError: an unsupported URI, an unusable path, a damaged or read-only store, or a server that
            does not answer as MLflow.
    """
    local = _sqlite_path(tracking_uri)
    if local is not None:
        check_file(local, "the MLflow store", _FIX, writable=True, read=read_sqlite)
        artifacts = local.parent / "artifacts"  # where _artifact_location puts them
        if artifacts.exists() and not os.access(artifacts, os.W_OK | os.X_OK):
            raise StudyError(f"the MLflow artifacts folder {artifacts} is read-only; make it writable "
                             f"(chmod -R u+w {artifacts}) or {_FIX}")
        return
    if is_database(tracking_uri):
        probe_database(tracking_uri, "the MLflow tracking store", _FIX)
        return
    if not tracking_uri.startswith(("http://", "https://")):
        raise StudyError(f"unsupported MLflow tracking URI {redact(tracking_uri)!r}; {_FIX}")
    with _environment(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT=str(_CHECK_TIMEOUT)):
        try:
            MlflowClient(tracking_uri=tracking_uri).search_experiments(max_results=1)
        except mlflow.exceptions.MlflowException as err:
            raise StudyError(f"cannot use the MLflow tracking server {redact(tracking_uri)} ({_why(err)}); "
                             f"start it or {_FIX}") from err


@contextlib.contextmanager
def _environment(**values: str) -> Iterator[None]:
    """Set environment variables for the body only (MLflow reads its HTTP settings on every request)."""
    before = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _why(err: BaseException) -> str:
    """The short reason of a failed MLflow HTTP request: the OS error, or the HTTP status."""
    text = str(err)
    found = re.search(r"\[Errno -?\d+\] ([^'\")]+)", text) or re.search(r"(error code \d+)", text)
    if found:
        return found.group(1).strip()
    return "timed out" if "timed out" in text.lower() else first_line(err)[:200]


def _sqlite_path(tracking_uri: str) -> Path | None:
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return Path(tracking_uri.removeprefix("sqlite:///"))


def _artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """Artifacts of an embedded store go beside its database; a server decides for itself."""
    local = _sqlite_path(tracking_uri)
    if local is None:
        return None
    return (local.parent.resolve() / "artifacts" / experiment).as_uri()


def experiment_name(study_name: str) -> str:
    """The MLflow experiment that holds a study's runs."""
    return f"tinyopt/{study_name}"


class Tracker:
    """Logs one study's sweep to MLflow.

    Args:
        tracking_uri: ``sqlite:///...`` for the embedded store or the URL of an ``mlflow server``.
        study_name: the Optuna study name; the experiment is ``tinyopt/<study_name>``.
        approach: recorded as a tag on every run.
    """

    def __init__(self, tracking_uri: str, study_name: str, approach: str):
        self.tracking_uri = tracking_uri
        self.study_name = study_name
        self.approach = approach
        try:
            self.client = _client(tracking_uri)
            self.experiment_id = self._experiment(experiment_name(study_name))
        except Exception as err:  # noqa: BLE001 - MLflow, SQLAlchemy and requests each raise their own
            raise StudyError(f"cannot use MLflow tracking store {redact(tracking_uri)} ({first_line(err)}); "
                             "check --tracking-uri") from err
        self.parent_run_id: str | None = None
        # One thread, so that each run's calls reach MLflow in order, and its close comes last.
        self._background = ThreadPoolExecutor(1, thread_name_prefix="tinyopt-mlflow")
        self._runs: list[TrialRun] = []  # trial runs whose background logging may not be done
        self._summary: TrialRun | None = None  # the parent run's logging, made by update_summary

    def _experiment(self, name: str) -> str:
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            try:
                self.client.create_experiment(name, artifact_location=_artifact_location(self.tracking_uri, name))
            except mlflow.exceptions.MlflowException:
                pass  # another worker created it between our lookup and our create
            experiment = self.client.get_experiment_by_name(name)
            if experiment is None:
                raise StudyError(f"MLflow could not create the experiment {name!r}")
        return experiment.experiment_id

    def run_url(self, run_id: str, base: str | None = None) -> str:
        """The run's page in the MLflow UI at ``base``: the tracking server, or ``tinyopt ui``'s default address."""
        if base is None:
            base = redact(self.tracking_uri) if self.tracking_uri.startswith(("http://", "https://")) else DEFAULT_UI
        return f"{base.rstrip('/')}/{_run_path(self.experiment_id, run_id)}"

    def start_sweep(self, config: dict[str, Any], tags: dict[str, str], *, reopen: bool = True) -> str:
        """Find (or create) the study's parent run and return its id; mark it RUNNING if ``reopen``.

        Call it holding ``tinyopt.stores.storage.study_lock``: workers that start together then find one parent.
        Workers started by ``tinyopt sweep --workers`` pass ``reopen=False``: their supervisor owns the status.
        """
        try:
            parents = list(self.client.search_runs([self.experiment_id], f"tags.`{record.TAG_PARENT}` = 'true'",
                                                   order_by=["attributes.start_time ASC"], max_results=1))
            if parents:
                self.parent_run_id = parents[0].info.run_id
            else:
                tags = {record.TAG_APPROACH: self.approach, record.TAG_STUDY: self.study_name,
                        record.TAG_PARENT: "true", **tags}
                run = self.client.create_run(self.experiment_id, run_name=self.study_name, tags=tags)
                self.client.log_dict(run.info.run_id, config, record.CONFIG_FILE)
                self.client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in identity(config).items()])
                self.parent_run_id = run.info.run_id
            if reopen:
                self.client.update_run(self.parent_run_id, status="RUNNING")
        except Exception as err:  # noqa: BLE001 - MLflow, SQLAlchemy and requests each raise their own
            raise StudyError(f"cannot write to the MLflow tracking store {redact(self.tracking_uri)} "
                             f"({first_line(err)}); check --tracking-uri") from err
        return self.parent_run_id

    def end_sweep(self, status: str = "FINISHED") -> None:
        """Close the parent run once every trial run is stored and closed.

        ``status`` is ``FINISHED``, or ``KILLED`` on Ctrl-C / ``FAILED`` on a fatal error; the parent
        is ``FAILED`` too when MLflow could not store what a trial logged.

        Raises:
            StudyError: MLflow could not store something a trial logged (its run is FAILED, with the reason).
        """
        try:
            self._settle(keep=0)
            if self._summary is not None:
                self._summary.wait()
        except StudyError:
            status = "FAILED"
            raise
        finally:
            if self.parent_run_id:
                self.client.set_terminated(self.parent_run_id, status=status)

    def _settle(self, keep: int) -> None:
        """Wait for the background logging of every trial run but the last ``keep``; raise the first failure."""
        failure: StudyError | None = None
        while len(self._runs) > keep:
            try:
                self._runs.pop(0).wait()
            except StudyError as err:
                failure = failure or err
        if failure is not None:
            raise failure

    def close_run(self, run_id: str, state: str, reason: str | None = None) -> bool:
        """Close a trial's run left RUNNING by a process that is gone, with the status of the trial's ``state``.

        Made on the logging thread, after what it is storing (SQLite serves one writer).

        Returns:
            Whether the run was still RUNNING (and is closed now).
        """
        def close() -> bool:
            if self.client.get_run(run_id).info.status != "RUNNING":
                return False
            TrialRun(self.client, run_id).end(state, reason)
            return True

        return self._background.submit(close).result()

    def open_trial_runs(self) -> dict[int, str]:
        """The runs of this study's trials that are still RUNNING, by trial number."""
        runs = self.client.search_runs([self.experiment_id], "attributes.status = 'RUNNING'")
        return {int(run.data.tags[record.TAG_TRIAL_NUMBER]): run.info.run_id for run in runs
                if record.TAG_TRIAL_NUMBER in run.data.tags}

    def update_summary(self, study: Any, summary: Any, number: int, command: str) -> None:
        """Bring the parent run up to date after trial ``number`` ended: the sweep's summary.

        Logs the best selection top-1 so far at step ``number`` (the experiment's chart view is the
        optimisation history), the trial counts and compute time, tags and links the best trial (and
        moves the ``best`` tag to its run), redraws the history and importance plots and rewrites the
        description, and deletes the kept models of complete trials no longer among the best
        ``study.keep_models``. Read from the study and its ``summary`` (``tinyopt.results.report.summarize_study``)
        here; stored in the background, like a trial's logging.
        """
        from tinyopt.core import plots

        counts, best = summary.counts, summary.best
        metrics = {f"{record.COUNT_PREFIX}{name}": counts.get(state, 0) for state, name in _STATE_NAMES.items()}
        metrics[record.COMPUTE_SECONDS] = summary.compute_seconds
        complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
        tags: dict[str, Any] = {}
        if best is not None:
            metrics[f"best_{_objective(study)}"] = best.value
            tags = {record.TAG_BEST_TRIAL: best.number, record.TAG_BEST_RUN: best.run_id or "-",
                    record.TAG_BEST_RUN_URL: self.run_url(best.run_id) if best.run_id else "-"}
        importances, why = plots.importances(study)
        tags[record.TAG_DESCRIPTION] = self._summary_text(study, command, counts, metrics, best, importances,
                                                          why)[:_TAG_LIMIT]
        if self._summary is None:
            self._summary = TrialRun(self.client, self.parent_run_id or "", self._background)
        parent = self._summary
        parent.log_metrics(metrics, step=number)
        parent.set_tags(tags)
        parent.log_figure(lambda: plots.history_chart(study.study_name, complete), record.HISTORY)
        if importances:
            parent.log_figure(lambda: plots.importance_chart(study.study_name, importances), record.IMPORTANCE)
        if best is not None and best.run_id:
            parent.call(record.TAG_BEST, self._move_best_tag, best.run_id)
        keep = study.user_attrs.get(record.CONFIG, {}).get("study", {}).get("keep_models")
        if keep:
            # Only complete trials are ranked: a trial still running may have stored a model it keeps.
            ranked = sorted(complete, key=lambda t: -t.value)
            dropped = {t.user_attrs[record.RUN_ID] for t in ranked[keep:] if t.user_attrs.get(record.MODEL_KEPT)}
            if dropped:
                parent.call("deletion of models out of the top", self._drop_models, dropped)

    def _move_best_tag(self, run_id: str) -> None:
        """Tag ``best`` on ``run_id`` only: the tag leaves the run of the former best trial."""
        tagged = self.client.search_runs([self.experiment_id], f"tags.`{record.TAG_BEST}` = 'true'")
        for run in tagged:
            if run.info.run_id != run_id:
                self.client.delete_tag(run.info.run_id, record.TAG_BEST)
        self.client.set_tag(run_id, record.TAG_BEST, "true")

    def _drop_models(self, run_ids: set[str]) -> None:
        """Delete the logged models of these runs (MLflow's soft delete: ``mlflow gc`` frees the space)."""
        for run in self.client.search_runs([self.experiment_id], f"tags.`{record.TAG_MODEL_KEPT}` = 'true'"):
            if run.info.run_id not in run_ids:
                continue
            uri = run.data.tags.get(record.TAG_MODEL_URI)
            if uri:
                self.client.delete_logged_model(uri.removeprefix("models:/"))
                self.client.delete_tag(run.info.run_id, record.TAG_MODEL_URI)
            self.client.set_tag(run.info.run_id, record.TAG_MODEL_KEPT, "false")

    def _summary_text(self, study: Any, command: str, counts: dict[str, int], metrics: dict[str, float], best: Any,
                      importances: dict[str, float], why: str | None) -> str:
        """The parent run's description, in markdown: the command, what is searched, the best trial."""
        from tinyopt.core import space as search_space

        config = study.user_attrs.get(record.CONFIG, {})
        space = config.get("space", {})
        searched = [name for name, entry in space.items() if search_space.is_distribution(entry)]
        lines = [f"**Sweep of study `{study.study_name}`** ({config.get('approach', self.approach)}), "
                 f"command: `{redact(command)}`", "",
                 f"Searched: {', '.join(searched) or 'the ensemble weights'}. "
                 f"The objective is {_objective(study).replace('_', ' ')}; test scores are only reported.", "",
                 "Trials: " + ", ".join(f"{counts.get(state, 0)} {name}" for state, name in _STATE_NAMES.items())
                 + f"; compute {metrics[record.COMPUTE_SECONDS] / 60:.1f} min.", ""]
        if best is None:
            return "\n".join([*lines, "No complete trial yet."])
        link = f"[run {best.run_id[:8]}]({_run_path(self.experiment_id, best.run_id)})" if best.run_id else "no run"
        lines += [f"**Best: trial {best.number}** ({link}), selection top-1 {best.value:.4f}"
                  + "".join(f", {key.replace('_', ' ')} {value:.4f}" for key, value in best.scores.items()
                            if key != "selection_top1"), "",
                  *_markdown_table(best.params)]
        if importances:
            lines += ["", "Importance (PED-ANOVA, as in optuna-dashboard): "
                      + ", ".join(f"{key} {value:.2f}" for key, value in importances.items())]
        elif why:
            lines += ["", f"No importance yet: {why}."]
        return "\n".join(lines)

    def start_trial(self, number: int, params: dict[str, Any], config: dict[str, Any],
                    tags: dict[str, str], *, searched: dict[str, Any] | None = None,
                    headline: dict[str, Any] | None = None, system_metrics: bool = False) -> TrialRun:
        """Create the nested run of one trial: its name, searched and identifying params, description, config.

        Args:
            params: every value the trial runs with (its description lists them).
            searched: the values Optuna drew, logged as params (default: ``params``).
            headline: the values its run name shows (default: none).

        With ``system_metrics``, MLflow samples GPU utilisation and memory, CPU and RAM into the run
        (``system/...`` metrics, every ``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` seconds, 10 by
        default) until it ends.

        Raises:
            StudyError: MLflow could not store something an earlier trial logged.
        """
        # Bounds the logging backlog (and the predictions it holds) to one trial, and stops the
        # sweep on a tracking store that fails rather than running trials it cannot record.
        self._settle(keep=1)
        trial_run = self._child_run(
            run_name(number, headline or {}), self.parent_run_id, f"Trial {number} of study `{self.study_name}`.",
            params, {record.TAG_TRIAL_NUMBER: str(number), record.TAG_TRIAL_STATE: "RUNNING", **tags},
            params if searched is None else searched, config, self._background)
        self._runs.append(trial_run)
        if system_metrics:
            # Imported here: it needs psutil (and pynvml for GPUs), which a CPU sweep can do without.
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            trial_run.monitor = SystemMetricsMonitor(trial_run.run_id, tracking_uri=self.tracking_uri)
            trial_run.monitor.start()
        return trial_run

    def start_refit(self, number: int, trial_run_id: str | None, params: dict[str, Any], config: dict[str, Any],
                    tags: dict[str, str], *, parent_run_id: str | None, searched: dict[str, Any],
                    headline: dict[str, Any], what: str) -> TrialRun:
        """Create the run of a refit of trial ``number`` (``tinyopt best --refit``), nested under the study's parent.

        Named ``refit of`` the trial's run name, tagged with the trial (``record.TAG_REFIT_OF``) and its
        run, with the trial's searched and identifying params and the resolved config. Its calls are made
        at once, raising their errors: a refit has nothing else to do meanwhile.

        Args:
            params: every value the refit runs with (its description lists them).
            searched: the values the trial's Optuna drew, logged as params beside the identifying ones.
            headline: the values its run name shows.
            what: the first paragraph of its description (how the refit trains).
        """
        return self._child_run(
            f"refit of {run_name(number, headline)}", parent_run_id, what, params,
            {record.TAG_REFIT_OF: str(number), record.TAG_REFIT_OF_RUN: trial_run_id or "-", **tags},
            searched, config, None)

    def _child_run(self, name: str, parent_run_id: str | None, what: str, params: dict[str, Any],
                   tags: dict[str, str], logged: dict[str, Any], config: dict[str, Any],
                   background: ThreadPoolExecutor | None) -> TrialRun:
        """A run nested under ``parent_run_id``: described by ``what`` and a table of ``params``, with the
        ``logged`` and identifying params and the resolved config; its calls go through ``background``."""

        def create() -> Any:
            description = "\n".join([what, "", *_markdown_table(params)])[:_TAG_LIMIT]
            return self.client.create_run(
                self.experiment_id, run_name=name,
                tags={"mlflow.parentRunId": parent_run_id or "", record.TAG_APPROACH: self.approach,
                      record.TAG_STUDY: self.study_name, record.TAG_MODEL_KEPT: "false",
                      record.TAG_DESCRIPTION: description, **tags})

        # On the logging thread when there is one: SQLite serves one writer, and a run created here while
        # that thread writes the last trial's close or the sweep's summary could fail with "database is locked".
        run = background.submit(create).result() if background is not None else create()
        child = TrialRun(self.client, run.info.run_id, background)
        child.log_params({**logged, **identity(config)})
        child.log_dict(config, record.CONFIG_FILE)
        return child



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
        items = [Param(k, str(v)[:_PARAM_LIMIT]) for k, v in params.items()]
        for start in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            self.call("params", self.client.log_batch, self.run_id, params=items[start:start + 100])

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        """Log metrics at ``step``, rounded to 4 significant digits."""
        now = int(time.time() * 1000)
        self.call("metrics", self.client.log_batch, self.run_id,
                  metrics=[Metric(k, _round(v), now, step) for k, v in metrics.items()])

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

    def log_model(self, model: Any, experiment_id: str) -> None:
        """Store a Keras model as an MLflow logged model of this run (``mlflow.keras``, reloadable without tinyopt).

        The run gets the tags ``model_kept`` and ``model_uri`` (``models:/<id>``); the model's
        ``data/model.keras`` loads with plain Keras too.
        """
        # Saved now, uploaded later: the next trial's clear_session would free the model.
        folder = _scratch_file("model", lambda path: _save_keras(model, path))
        self.call(record.LOGGED_MODEL, self._store_model, folder, experiment_id)

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
        if self._failure is not None:
            # The trial's state stands (Optuna has it); its run says what it misses.
            status = _STATUS["FAIL"]
            reason = f"could not store {self._failure}" + (f"; {reason}" if reason else "")
        tags = {record.TAG_TRIAL_STATE: state}
        if reason:
            tags[record.FAIL_REASON] = reason[:5000]
        self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        self.client.set_terminated(self.run_id, status=status)

    def _store_model(self, folder: Path, experiment_id: str) -> None:
        from mlflow.entities import LoggedModelOutput, LoggedModelStatus

        try:
            logged = self.client.create_logged_model(experiment_id, name=record.LOGGED_MODEL, source_run_id=self.run_id,
                                                     model_type="keras")
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


def _objective(study: Any) -> str:
    """The name of the study's value (``selection_top1``, ``minus_selection_log_loss``), as the runner set it."""
    return (study.metric_names or [record.OBJECTIVE_NAME])[0]


def _run_path(experiment_id: str, run_id: str) -> str:
    """A run's page within the MLflow UI, relative to its address (a description's links work on any host)."""
    return f"#/experiments/{experiment_id}/runs/{run_id}"


def _scratch_file(name: str, write: Callable[[Path], Any]) -> Path:
    """The file ``name`` that ``write`` makes in a new temporary folder (removed again if it fails)."""
    path = Path(tempfile.mkdtemp(prefix="tinyopt-artifact-")) / name
    try:
        write(path)
    except BaseException:
        shutil.rmtree(path.parent)
        raise
    return path


_STATUS = {
    "COMPLETE": RunStatus.to_string(RunStatus.FINISHED),
    "PRUNED": RunStatus.to_string(RunStatus.KILLED),
    "FAIL": RunStatus.to_string(RunStatus.FAILED),
    "KILLED": RunStatus.to_string(RunStatus.KILLED),
}


def download_artifact(run_id: str, path: str, tracking_uri: str, dst: str | Path | None = None) -> Path:
    """Download one artifact of a run and return its local path.

    Raises:
        StudyError: the run or artifact does not exist in this tracking store.
    """
    client = _client(tracking_uri)
    try:
        if dst is None:
            dst = tempfile.mkdtemp(prefix="tinyopt-artifact-")
        return Path(client.download_artifacts(run_id, path, str(dst)))
    except (mlflow.exceptions.MlflowException, OSError) as err:
        raise StudyError(f"artifact {path!r} of MLflow run {run_id} is not in {redact(tracking_uri)} "
                         f"({first_line(err)}); check --tracking-uri") from err


def download_model(run_id: str, tracking_uri: str, dst: str | Path) -> Path:
    """Download the Keras file of the logged model a trial's run kept (``TrialRun.log_model``).

    Raises:
        StudyError: the run kept no model, or the store does not hold it.
    """
    client = _client(tracking_uri)
    try:
        uri = client.get_run(run_id).data.tags.get(record.TAG_MODEL_URI)
        if uri is None:
            raise StudyError(f"MLflow run {run_id} kept no model (it has no {record.TAG_MODEL_URI} tag)")
        location = client.get_logged_model(uri.removeprefix("models:/")).artifact_location
        Path(dst).mkdir(parents=True, exist_ok=True)
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{location}/{_KERAS_FILE}",
                                                        dst_path=str(dst), tracking_uri=tracking_uri))
    except (mlflow.exceptions.MlflowException, OSError) as err:
        raise StudyError(f"the model of MLflow run {run_id} is not in {redact(tracking_uri)} "
                         f"({first_line(err)}); check --tracking-uri") from err


def load_predictions(run_id: str, tracking_uri: str) -> dict[str, np.ndarray]:
    """The selection/test probabilities and labels a trial logged (see ``TrialRun.log_predictions``).

    Raises:
        StudyError: the run or its ``predictions.npz`` is not in the store, or the file is damaged.
    """
    with tempfile.TemporaryDirectory() as tmp:
        path = download_artifact(run_id, record.PREDICTIONS, tracking_uri, tmp)
        try:
            # The arrays are read inside the try: a damaged member of the archive only fails when it is read.
            with np.load(path) as saved:
                return {key: saved[key] for key in saved.files}
        except Exception as err:  # noqa: BLE001 - a damaged file raises BadZipFile, EOFError, ValueError, zlib.error...
            raise StudyError(damage_message(f"{record.PREDICTIONS} of MLflow run {run_id}", path, err,
                                            MLFLOW_FIX)) from err


def get_run(run_id: str, tracking_uri: str) -> Any:
    """The MLflow run (info, params, metrics, tags)."""
    return _client(tracking_uri).get_run(run_id)


def register_model(bundle_dir: str | Path, name: str, tracking_uri: str, run_id: str | None = None) -> str:
    """Register an exported bundle in the MLflow model registry and return the new version.

    The bundle is logged as the ``export`` artifact of ``run_id`` (the winning trial's run), or of a
    new run in the ``tinyopt/exports`` experiment when there is none, and registered from there.

    Raises:
        StudyError: the registry refuses (e.g. a tracking store without one).
    """
    client = _client(tracking_uri)
    try:
        if run_id is None:
            experiment = Tracker(tracking_uri, "exports", "export").experiment_id
            run_id = client.create_run(experiment, run_name=f"export {name}").info.run_id
            client.set_terminated(run_id)
        client.log_artifacts(run_id, str(bundle_dir), "export")
        try:
            client.create_registered_model(name)
        except mlflow.exceptions.MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        source = f"{client.get_run(run_id).info.artifact_uri}/export"
        return str(client.create_model_version(name, source, run_id=run_id).version)
    except mlflow.exceptions.MlflowException as err:
        raise StudyError(f"cannot register {name!r} in {redact(tracking_uri)} ({first_line(err)})") from err


def ui_command(tracking_uri: str) -> str:
    """The shell command that opens the MLflow UI on this store (credentials hidden)."""
    if _sqlite_path(tracking_uri) is None:
        return f"open {redact(tracking_uri)} in a browser"
    return f"tinyopt ui --tracking-uri {tracking_uri}"


# tinyopt's view of an experiment's runs table, kept in an experiment tag as the MLflow UI keeps a
# view saved from its Views menu: without it the table shows no metric and folds the trials under
# their parent. Sorted by the best-so-far metric, which only the parent has, the runs come flat:
# the parent first, then every trial, newest first. An MLflow that reads no such view ignores the
# link's viewStateShareKey and opens its plain runs table.
RUNS_VIEW = "tinyopt"
_RUNS_VIEW_TAG = f"mlflow.sharedViewState.{RUNS_VIEW}"


def experiment_urls(tracking_uri: str, base_url: str) -> list[tuple[str, str]]:
    """Each tinyopt experiment and the URL of its runs table in the MLflow UI at ``base_url``.

    Saves tinyopt's view of the runs table in each experiment that lacks it. MLflow 3 opens an
    experiment without ``workflowType=machine_learning`` on its GenAI overview, not on its runs.
    """
    client = _client(tracking_uri)
    experiments = client.search_experiments(filter_string=f"name LIKE '{experiment_name('')}%'",
                                            order_by=["name ASC"])
    urls = []
    for experiment in experiments:
        view = _runs_view(experiment.creation_time or 0)
        if experiment.tags.get(_RUNS_VIEW_TAG) != view:
            client.set_experiment_tag(experiment.experiment_id, _RUNS_VIEW_TAG, view)
        urls.append((experiment.name, f"{base_url}/#/experiments/{experiment.experiment_id}/runs"
                                      f"?workflowType=machine_learning&viewStateShareKey={RUNS_VIEW}"))
    return urls


def _runs_view(created_ms: int) -> str:
    """The saved view, as MLflow 3.17's UI writes one (its state holds only what differs from the defaults)."""
    metrics = (record.BEST_SO_FAR, record.final(record.OBJECTIVE_NAME))
    tags = (record.TAG_TRIAL_STATE, record.TAG_BEST)
    columns = ["attributes.`Models`", *(f"metrics.`{key}`" for key in metrics), *(f"tags.`{key}`" for key in tags)]
    state = {"orderByKey": f"metrics.`{record.BEST_SO_FAR}`", "orderByAsc": False, "selectedColumns": columns}
    return json.dumps({"name": RUNS_VIEW, "createdAt": created_ms, "updatedAt": created_ms,
                       "state": json.dumps(state)})
