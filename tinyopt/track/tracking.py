"""The sweep's runs in MLflow: one experiment per study, its parent run, and a nested run per trial or refit.

The ``tinyopt.track`` package is the only one that imports mlflow. One parent run per study (reopened by
each sweep of it), and one nested run per trial whose status follows the trial: COMPLETE -> FINISHED,
PRUNED -> KILLED, FAIL -> FAILED with the reason. Logging goes through ``MlflowClient`` with explicit
run ids, so nothing depends on MLflow's global "active run". A trial's run is named after the params
that tell trials apart (``t12 stages=2 adamw lr=3e-4``), carries only the searched and a few
identifying params, a description with every value, and the tags ``best`` and ``model_kept``.

A trial run logs in the background (``tinyopt.track.runs``), on one thread per tracker, in the order it
was asked to; its run is closed once everything logged before the close is stored. A sweep runs at
most one trial ahead of its logging.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from mlflow.entities import Metric, Param, RunTag

from tinyopt.core import record
from tinyopt.core.config.sections import Config
from tinyopt.core.errors import StudyError
from tinyopt.core.objective import TOP1, Objective
from tinyopt.core.urls import first_line, redact
from tinyopt.track import views
from tinyopt.track.names import (
    BEST_COLOUR,
    DEFAULT_UI,
    TAG_LIMIT,
    experiment_name,
    identity,
    markdown_table,
    run_colour,
    run_name,
    run_path,
)
from tinyopt.track.runs import TrialRun
from tinyopt.track.store import ensure_experiment, open_client


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
            self.client = open_client(tracking_uri)
            self.experiment_id = ensure_experiment(self.client, tracking_uri, experiment_name(study_name))
        except Exception as err:  # noqa: BLE001 - MLflow, SQLAlchemy and requests each raise their own
            raise StudyError(f"cannot use MLflow tracking store {redact(tracking_uri)} ({first_line(err)}); "
                             "check --tracking-uri") from err
        self.parent_run_id: str | None = None
        # One thread, so that each run's calls reach MLflow in order, and its close comes last.
        self._background = ThreadPoolExecutor(1, thread_name_prefix="tinyopt-mlflow")
        self._runs: list[TrialRun] = []  # trial runs whose background logging may not be done
        self._summary: TrialRun | None = None  # the parent run's logging, made by parent_run
        self._ranks: dict[str, int] = {}  # the rank this process last logged on each trial run

    def ui_base(self) -> str:
        """The MLflow UI's address: the tracking server, or ``tinyopt ui``'s default address."""
        base = redact(self.tracking_uri) if self.tracking_uri.startswith(("http://", "https://")) else DEFAULT_UI
        return base.rstrip("/")

    def run_url(self, run_id: str) -> str:
        """The run's page in the MLflow UI (``ui_base``), in its model-training layout."""
        return f"{self.ui_base()}/{run_path(self.experiment_id, run_id)}"

    def start_sweep(self, config: dict[str, Any], params: dict[str, Any], tags: dict[str, str], *,
                    reopen: bool = True, objective: Objective = TOP1, searched: Sequence[str] = ()) -> str:
        """Find (or create) the study's parent run and return its id; mark it RUNNING if ``reopen``.

        A new parent run gets ``config`` as its ``config.json`` and ``params`` as its params: a sweep's
        resolved config and ``tinyopt.track.names.identity`` of it. The experiment gets tinyopt's view of
        its runs (``tinyopt.track.views``): ranked by ``objective``, charting the ``searched`` params.

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
                self.client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()])
                self.parent_run_id = run.info.run_id
            self.client.set_tag(self.parent_run_id, record.TAG_OBJECTIVE, objective.heading)
            self.client.log_batch(self.parent_run_id, metrics=[Metric(record.RANK, 0, _now(), 0)])
            created = self.client.get_experiment(self.experiment_id).creation_time or 0
            views.save_view(self.client, self.experiment_id, created, objective, searched)
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

    def link_takeover(self, run_id: str, trial_number: int, url: str) -> None:
        """Say on the run of a trial queued again which trial's run took over (``taken_over_by``, its outcome)."""
        def link() -> None:
            run = self.client.get_run(run_id)
            outcome = run.data.tags.get(record.TAG_OUTCOME, "")
            taken = f"taken over by trial {trial_number}: {url}"
            outcome = f"{outcome}; {taken}" if outcome else taken
            self.client.log_batch(run_id, tags=[RunTag(record.TAG_TAKEN_OVER_BY, url),
                                                RunTag(record.TAG_OUTCOME, outcome)])

        self._background.submit(link).result()

    def open_trial_runs(self) -> dict[int, str]:
        """The runs of this study's trials that are still RUNNING, by trial number."""
        runs = self.client.search_runs([self.experiment_id], "attributes.status = 'RUNNING'")
        return {int(run.data.tags[record.TAG_TRIAL_NUMBER]): run.info.run_id for run in runs
                if record.TAG_TRIAL_NUMBER in run.data.tags}

    def parent_run(self) -> TrialRun:
        """The parent run, logging in the background like a trial's (the sweep's summary writes it)."""
        if self._summary is None:
            self._summary = TrialRun(self.client, self.parent_run_id or "", self._background)
        return self._summary

    def move_best_tag(self, run_id: str) -> None:
        """Tag ``best`` on ``run_id`` only, in the best trial's own colour: both leave the former best trial."""
        tagged = self.client.search_runs([self.experiment_id], f"tags.`{record.TAG_BEST}` = 'true'")
        for run in tagged:
            if run.info.run_id != run_id:
                self.client.delete_tag(run.info.run_id, record.TAG_BEST)
                number = run.data.tags.get(record.TAG_TRIAL_NUMBER, "0")
                self.client.set_tag(run.info.run_id, record.TAG_COLOR, run_colour(int(number)))
        self.client.set_tag(run_id, record.TAG_BEST, "true")
        self.client.set_tag(run_id, record.TAG_COLOR, BEST_COLOUR)

    def rank_runs(self, ranks: dict[str, int], step: int) -> None:
        """Log each trial run's ``rank`` by the objective (``record.RANK``) where it changed.

        ``step`` is the number of complete trials ranked: when workers rank at once, the ranking
        of the most trials is the one the runs table shows.
        """
        now = _now()
        for run_id, rank in ranks.items():
            if self._ranks.get(run_id) != rank:
                self.client.log_batch(run_id, metrics=[Metric(record.RANK, rank, now, step)])
                self._ranks[run_id] = rank

    def drop_models(self, run_ids: set[str]) -> None:
        """Delete the logged models of these runs (MLflow's soft delete: ``mlflow gc`` frees the space)."""
        for run in self.client.search_runs([self.experiment_id], f"tags.`{record.TAG_MODEL_KEPT}` = 'true'"):
            if run.info.run_id not in run_ids:
                continue
            uri = run.data.tags.get(record.TAG_MODEL_URI)
            if uri:
                self.client.delete_logged_model(uri.removeprefix("models:/"))
                self.client.delete_tag(run.info.run_id, record.TAG_MODEL_URI)
            self.client.set_tag(run.info.run_id, record.TAG_MODEL_KEPT, "false")

    def start_trial(self, number: int, params: dict[str, Any], config: Config,
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
            params, {record.TAG_TRIAL_NUMBER: str(number), record.TAG_TRIAL_STATE: "RUNNING",
                     record.TAG_COLOR: run_colour(number), **tags},
            params if searched is None else searched, config, self._background)
        self._runs.append(trial_run)
        if system_metrics:
            # Imported here: it needs psutil (and pynvml for GPUs), which a CPU sweep can do without.
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            trial_run.monitor = SystemMetricsMonitor(trial_run.run_id, tracking_uri=self.tracking_uri)
            trial_run.monitor.start()
        return trial_run

    def start_refit(self, number: int, trial_run_id: str | None, params: dict[str, Any], config: Config,
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
                   tags: dict[str, str], logged: dict[str, Any], config: Config,
                   background: ThreadPoolExecutor | None) -> TrialRun:
        """A run nested under ``parent_run_id``: described by ``what`` and a table of ``params``, with the
        ``logged`` and identifying params and the resolved config; its calls go through ``background``."""

        def create() -> Any:
            description = "\n".join([what, "", *markdown_table(params)])[:TAG_LIMIT]
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
        child.log_dict(config.as_dict(), record.CONFIG_FILE)
        return child


def _now() -> int:
    return int(time.time() * 1000)
