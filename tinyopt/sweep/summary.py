"""The sweep's summary on its MLflow parent run, brought up to date after every trial, and the models it keeps.

What a reviewer reads first in the MLflow UI: the best selection top-1 so far by trial number, the
trial counts and compute time, the best trial's link, the history and importance plots, a
description; and the retention of the kept models (the best ``study.keep_models`` complete trials).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tinyopt.core import forecast as forecasts
from tinyopt.core import plots, record
from tinyopt.core import space as search_space
from tinyopt.core.config.sections import Config
from tinyopt.core.objective import TOP1, Objective, of_study
from tinyopt.core.summary import StudySummary, members_of, study_config
from tinyopt.core.urls import ml_layout, redact
from tinyopt.stores import notes
from tinyopt.track.names import STATE_NAMES, TAG_LIMIT, markdown_table, run_path, ui_command

if TYPE_CHECKING:  # the tracker's module loads mlflow, which a sweep's --help and start-up do without
    from tinyopt.track.tracking import Tracker


@dataclass
class SweepResult:
    """What a sweep reports: counts, the best trials, where to look at them, and how it ended."""

    study_name: str
    approach: str
    storage: str
    counts: dict[str, int]
    top: list[dict[str, Any]]  # the best complete trials, best first: number, value, scores, params, run
    ui_command: str
    new_trials: int = 0
    notes: list[str] = field(default_factory=list)
    recovered: list[str] = field(default_factory=list)
    interrupted: str | None = None  # the signal that stopped the sweep, e.g. "SIGTERM"
    exit_code: int = 0
    objective: Objective = TOP1  # what ``value`` is


def log_summary(tracker: Tracker, study: Any, summary: StudySummary, number: int, command: str) -> None:
    """Bring the parent run up to date after trial ``number`` ended: the sweep's summary.

    Logs the best selection top-1 so far at step ``number`` (the experiment's chart view is the
    optimisation history), the trial counts and compute time, tags and links the best trial (and
    moves the ``best`` tag to its run), redraws the history and importance plots and rewrites the
    description, and deletes the kept models of complete trials no longer among the best
    ``study.keep_models``. Read from the study and its ``summary``
    (``tinyopt.core.summary.summarize_study``) here; stored in the background, like a trial's logging.
    """

    counts, best, objective = summary.counts, summary.best, summary.objective
    config = study_config(study)  # once per trial: it deep-copies the stored config
    metrics = {f"{record.COUNT_PREFIX}{name}": counts.get(state, 0) for state, name in STATE_NAMES.items()}
    metrics[record.COMPUTE_SECONDS] = summary.compute_seconds
    if summary.forecast is not None and summary.actual is not None:
        metrics.update(forecasts.metrics(summary.forecast, summary.actual))
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    ranked = objective.ranked(complete)
    tags: dict[str, Any] = {}
    if best is not None:
        metrics[objective.best_metric] = best.value
        tags = {record.TAG_BEST_TRIAL: best.number, record.TAG_BEST_RUN: best.run_id or "-",
                record.TAG_BEST_RUN_URL: tracker.run_url(best.run_id) if best.run_id else "-"}
    importances, why = plots.importances(study)
    description = _summary_text(tracker, study, config, command, summary, metrics, importances, why)
    tags[record.TAG_DESCRIPTION] = description[:TAG_LIMIT]
    notes.save(study, notes.absolute_links(description, tracker.ui_base()))  # the study's note in optuna-dashboard
    parent = tracker.parent_run()
    parent.log_metrics(metrics, step=number)
    parent.set_tags(tags)
    parent.log_figure(lambda: plots.history_chart(study.study_name, complete, objective), record.HISTORY)
    if summary.front:
        front = [t.number for t in summary.front]
        parent.log_figure(lambda: plots.pareto_chart(study.study_name, complete, front, summary.objectives),
                          record.PARETO)
    ranks = {t.user_attrs[record.RUN_ID]: place for place, t in enumerate(ranked, 1) if t.user_attrs.get(record.RUN_ID)}
    parent.call(record.RANK, tracker.rank_runs, ranks, len(ranked))
    if importances:
        parent.log_figure(lambda: plots.importance_chart(study.study_name, importances), record.IMPORTANCE)
    if best is not None and best.run_id:
        parent.call(record.TAG_BEST, tracker.move_best_tag, best.run_id)
    keep = config.study.keep_models
    if keep:
        # Only complete trials are ranked: a trial still running may have stored a model it keeps. The
        # trials of the Pareto front keep theirs: one of them may be the model a person exports.
        front = {t.number for t in summary.front}
        dropped = {t.user_attrs[record.RUN_ID] for t in ranked[keep:]
                   if t.user_attrs.get(record.MODEL_KEPT) and t.number not in front}
        if dropped:
            parent.call("deletion of models out of the top", tracker.drop_models, dropped)


def _summary_text(tracker: Tracker, study: Any, config: Config, command: str, summary: StudySummary,
                  metrics: dict[str, float], importances: dict[str, float], why: str | None) -> str:
    """The parent run's description, in markdown: the command, what is searched, the best trial."""

    counts, best, objective = summary.counts, summary.best, summary.objective
    searched = [name for name, entry in config.space.items() if search_space.is_distribution(entry)]
    lines = [f"**Sweep of study `{study.study_name}`** ({config.approach}), "
             f"command: `{redact(command)}`", "",
             f"Searched: {', '.join(searched) or 'the ensemble weights (shares of the vote)'}. "
             f"The objective{' is' if len(summary.objectives) == 1 else 's are'} the "
             f"{' and the '.join(o.heading for o in summary.objectives)}; test scores are only reported.", "",
             "Trials: " + ", ".join(f"{counts.get(state, 0)} {name}" for state, name in STATE_NAMES.items())
             + f"; compute {metrics[record.COMPUTE_SECONDS] / 60:.1f} min.", ""]
    if best is None:
        return "\n".join([*lines, "No complete trial yet."])
    link = f"[run {best.run_id[:8]}]({run_path(tracker.experiment_id, best.run_id)})" if best.run_id else "no run"
    # The objective first, then every score under its own name (a loss is never called top-1).
    labels = {objective.name: objective.label, **record.SCORE_LABELS}
    shown = {objective.name: best.value, **best.scores, **best.log_losses}
    lines += [f"**Best: trial {best.number}** ({link}): "
              + ", ".join(f"{labels[key]} {value:.4f}" for key, value in shown.items()), "",
              *markdown_table(best.params)]
    if summary.front:
        points = [f"trial {t.number} ({t.value:.4f}, {t.costs.get(record.LATENCY_MS, float('nan')):.3g} ms)"
                  for t in summary.front]
        lines += ["", f"**Pareto front** ({objective.label} and latency, the most accurate first): "
                  + "; ".join(points) + f". The plot is {record.PARETO}; `tinyopt best {study.study_name} --trial N "
                  "--export DIR` exports any of them."]
    if summary.forecast is not None and summary.actual is not None:
        lines += ["", f"**Forecast** (`tinyopt plan`, on {summary.forecast.device}) against what happened:", "",
                  *("| " + " | ".join(row) + " |" for row in (forecasts.HEADER, ("---",) * len(forecasts.HEADER),
                                                             *forecasts.comparison(summary.forecast, summary.actual)))]
    if importances:
        lines += ["", "Importance (PED-ANOVA, as in optuna-dashboard): "
                  + ", ".join(f"{key} {value:.2f}" for key, value in importances.items())]
    elif why:
        lines += ["", f"No importance yet: {why}."]
    return "\n".join(lines)


def _shown_params(trial) -> dict[str, Any]:
    """The searched params as a person reads them: an ensemble's weights as shares of the vote (sum 1)."""

    members = members_of(trial)
    if members:
        return {f"{record.WEIGHT_PREFIX}{m.label}": round(m.weight, 3) for m in members}
    return trial.params


def summarize(study, storage: str, tracking_uri: str, new_trials: int = 0, top: int = 5) -> SweepResult:
    """Counts by state and the ``top`` best complete trials of a study."""
    import optuna


    trials = study.get_trials(deepcopy=False)
    counts = {state.name: 0 for state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED,
                                          optuna.trial.TrialState.FAIL, optuna.trial.TrialState.RUNNING)}
    for trial in trials:
        if trial.state.name in counts:
            counts[trial.state.name] += 1
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    objective = of_study(study)
    rows = [{"number": t.number, "value": objective.of(t), "selection_top1": t.user_attrs.get(record.SELECTION_TOP1),
             "test_top1": t.user_attrs.get(record.TEST_TOP1), "params": _shown_params(t),
             record.LATENCY_MS: t.user_attrs.get(record.LATENCY_MS),
             "run_id": t.user_attrs.get(record.RUN_ID), "run_url": ml_layout(t.user_attrs.get(record.RUN_URL))}
            for t in objective.ranked(complete)[:top]]
    return SweepResult(study_name=study.study_name, approach=study.user_attrs.get(record.APPROACH, ""),
                       storage=redact(storage), counts=counts, top=rows, ui_command=ui_command(tracking_uri),
                       new_trials=new_trials, objective=objective)
