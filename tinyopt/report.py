"""The approaches side by side: best trials, trial counts, compute time, plots.

``summarize_studies`` reads every study of an Optuna storage (``tinyopt best`` prints it);
``write_report`` adds the plots and files of ``tinyopt report`` and logs them to MLflow.
Optuna and matplotlib are imported inside the functions that use them.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tinyopt import record
from tinyopt import storage as storages
from tinyopt.config import APPROACHES
from tinyopt.errors import StudyError
from tinyopt.record import SCORES
from tinyopt.urls import redact

STATES = ("COMPLETE", "PRUNED", "FAIL", "RUNNING")
_SCORE_LABELS = {"selection_top1": "selection top-1", "selection_top5": "selection top-5",
                 "test_top1": "test top-1", "test_top5": "test top-5"}


@dataclass
class BestTrial:
    """The best complete trial of a study.

    Attributes:
        number: the trial number.
        value: the objective value (selection top-1, or minus the log loss for such an ensemble).
        scores: ``selection_top1``, ``selection_top5``, ``test_top1``, ``test_top5`` where recorded.
        params: every param of the trial, fixed ones included.
        run_id: its MLflow run.
        model_kept: whether that run holds the trained model.
        members: ensemble only: the ``members`` user attr (see ``tinyopt.ensemble``).
        uniform: ensemble only: scores of the uniform vote of the same members.
    """

    number: int
    value: float
    scores: dict[str, float]
    params: dict[str, Any]
    run_id: str | None
    model_kept: bool
    members: list[dict[str, Any]] = field(default_factory=list)
    uniform: dict[str, float] = field(default_factory=dict)

    def gains(self) -> dict[str, float]:
        """Ensemble only: top-1 over the best single member (chosen on selection) and over the uniform vote."""
        if not self.members:
            return {}
        best_member = max(self.members, key=lambda m: m["selection_top1"])
        return {f"{split}_top1_over_{what}": self.scores[f"{split}_top1"] - reference[f"{split}_top1"]
                for split in ("selection", "test")
                for what, reference in (("best_member", best_member), ("uniform", self.uniform))}


@dataclass
class StudySummary:
    """One study: its trial counts, compute time and best trial (``None`` without a complete trial)."""

    name: str
    approach: str
    counts: dict[str, int]
    compute_seconds: float
    best: BestTrial | None


def _study_order(names: Sequence[str]) -> list[str]:
    """Approach studies in the usual order (ensemble last), then any others by name."""
    rank = {approach: i for i, approach in enumerate(APPROACHES)}
    return sorted(names, key=lambda n: (rank.get(n, len(rank)), n))


def summarize_studies(storage_url: str, names: Sequence[str] = ()) -> list[StudySummary]:
    """Summaries of the named studies (default: every study in the storage), approaches first.

    Raises:
        StudyError: the storage is missing or empty, or a named study is not in it.
    """
    return [_summarize(study) for study in _load_studies(storage_url, names)]


def _load_studies(storage_url: str, names: Sequence[str]) -> list[Any]:
    existing = storages.study_names(storage_url)
    if not existing:
        raise StudyError(f"{redact(storage_url)} holds no studies; run `tinyopt sweep APPROACH` first")
    missing = [n for n in names if n not in existing]
    if missing:
        raise StudyError(f"no study named {', '.join(map(repr, missing))} in {redact(storage_url)}; "
                         f"it holds: {', '.join(_study_order(existing))}")
    return [storages.load_study(n, storage_url) for n in _study_order(names or existing)]


def _summarize(study: Any) -> StudySummary:
    trials = study.get_trials(deepcopy=False)
    counts = Counter(t.state.name for t in trials)
    seconds = sum(t.duration.total_seconds() for t in trials if t.duration is not None)
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    best = None
    if complete:
        trial = study.best_trial
        attrs = trial.user_attrs
        best = BestTrial(
            number=trial.number, value=trial.value, scores={k: attrs[k] for k in SCORES if k in attrs},
            params=attrs.get(record.PARAMS, trial.params), run_id=attrs.get(record.RUN_ID),
            model_kept=bool(attrs.get(record.MODEL_KEPT)), members=attrs.get(record.MEMBERS, []),
            uniform=attrs.get(record.UNIFORM, {}))
    return StudySummary(name=study.study_name, approach=study.user_attrs.get(record.APPROACH, study.study_name),
                        counts={state: counts.get(state, 0) for state in STATES}, compute_seconds=seconds,
                        best=best)


def comparison_chart(rows: Sequence[Mapping[str, Any]], title: str) -> Any:
    """A grouped bar chart of selection/test top-1/top-5, one group per row (``name`` + scores)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(max(6.0, 1.4 * len(rows) + 2), 4))
    axis = figure.subplots()
    width = 0.8 / len(SCORES)
    for i, key in enumerate(SCORES):
        positions = [j + (i - (len(SCORES) - 1) / 2) * width for j in range(len(rows))]
        bars = axis.bar(positions, [row.get(key) or 0.0 for row in rows], width, label=_SCORE_LABELS[key])
        axis.bar_label(bars, fmt="%.3f", fontsize=6, rotation=90, padding=2)
    axis.set_xticks(range(len(rows)), [row["name"] for row in rows], rotation=15, ha="right")
    axis.set_ylim(0, 1.25)  # headroom for the legend above the bars
    axis.set_ylabel("accuracy")
    axis.set_title(title)
    axis.legend(fontsize=7, ncols=4, loc="upper left")
    figure.tight_layout()
    return figure


def history_chart(study: Any) -> Any:
    """Objective value of each complete trial, and the best so far, by trial number."""
    from matplotlib.figure import Figure

    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    figure = Figure(figsize=(6, 3.5))
    axis = figure.subplots()
    numbers = [t.number for t in complete]
    values = [t.value for t in complete]
    axis.scatter(numbers, values, s=12, label="trial")
    axis.step(numbers, [max(values[: i + 1]) for i in range(len(values))], where="post", color="C1",
              label="best so far")
    axis.set_xlabel("trial")
    axis.set_ylabel("objective (selection)")
    axis.set_title(f"optimisation history: {study.study_name}")
    axis.legend()
    figure.tight_layout()
    return figure


def importance_chart(study: Any) -> tuple[Any, dict[str, float]]:
    """fANOVA importance of each param (``optuna.importance``), as a bar chart and as numbers.

    Raises:
        ValueError, RuntimeError: from optuna, when the complete trials cannot rank the params
            (fewer than two, or no param that varies).
    """
    import optuna
    from matplotlib.figure import Figure

    importances = optuna.importance.get_param_importances(
        study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
    if not importances:
        raise ValueError("no searched param is shared by the complete trials")
    figure = Figure(figsize=(6, 0.4 * len(importances) + 1.5))
    axis = figure.subplots()
    names = list(importances)[::-1]
    axis.barh(names, [importances[n] for n in names])
    axis.set_xlabel("importance (fANOVA, normalised)")
    axis.set_title(f"parameter importance: {study.study_name}")
    figure.tight_layout()
    return figure, importances


@dataclass
class Report:
    """What ``write_report`` produced."""

    summaries: list[StudySummary]
    files: list[Path]
    notes: list[str]
    mlflow_run_id: str | None = None


def write_report(storage_url: str, tracking_uri: str, out_dir: str | Path, *, log_to_mlflow: bool = True) -> Report:
    """Compare every study of a storage and write the comparison to ``out_dir``.

    Writes ``report.md`` and ``report.json`` (the numbers), ``comparison.png`` (best trial of each
    study), and per study ``history_<study>.png`` and ``importance_<study>.png``; then logs them
    all to one MLflow run of the experiment ``tinyopt/report``.

    Raises:
        StudyError: no storage or no studies.
    """
    studies = _load_studies(storage_url, ())
    summaries = [_summarize(study) for study in studies]
    figures: dict[str, Any] = {}
    notes: list[str] = []
    importances: dict[str, dict[str, float]] = {}
    for study, summary in zip(studies, summaries, strict=True):
        if summary.best is None:
            notes.append(f"study {summary.name!r} has no complete trial")
            continue
        figures[f"history_{summary.name}.png"] = history_chart(study)
        try:
            figures[f"importance_{summary.name}.png"], importances[summary.name] = importance_chart(study)
        except (ValueError, RuntimeError) as err:
            notes.append(f"no parameter importance for {summary.name!r} ({err})")
    rows = [{"name": s.name, **s.best.scores} for s in summaries if s.best]
    if rows:
        figures["comparison.png"] = comparison_chart(rows, "best trial of each study")
    numbers = {"storage": redact(storage_url), "studies": [asdict(s) for s in summaries],
               "gains": {s.name: s.best.gains() for s in summaries if s.best and s.best.members},
               "importances": importances, "notes": notes}
    texts = {"report.json": json.dumps(numbers, indent=2, default=str) + "\n",
             "report.md": _markdown(summaries, notes, figures)}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = [out / name for name in [*texts, *figures]]
    for name, text in texts.items():
        (out / name).write_text(text)
    for name, figure in figures.items():
        figure.savefig(out / name, dpi=120)
    run_id = _log(tracking_uri, summaries, texts, figures) if log_to_mlflow else None
    return Report(summaries, files, notes, run_id)


def _log(tracking_uri: str, summaries: Sequence[StudySummary], texts: Mapping[str, str],
         figures: Mapping[str, Any]) -> str:
    from tinyopt.ensemble import safe_name
    from tinyopt.tracking import Tracker, TrialRun

    # The study-level run of a pseudo study "report": each report updates the one latest report run.
    tracker = Tracker(tracking_uri, "report", "report")
    run_id = tracker.start_sweep({"studies": [s.name for s in summaries]}, tags={})
    run = TrialRun(tracker.client, run_id)
    run.log_metrics({f"{safe_name(s.name)}.{key}": value for s in summaries if s.best
                     for key, value in {**s.best.scores, **s.best.gains()}.items()})
    for name, text in texts.items():
        run.log_text(text, name)
    for name, figure in figures.items():
        run.log_figure(figure, name)
    tracker.end_sweep()
    return run_id


def format_seconds(seconds: float) -> str:
    """``1h 02m``, ``3m 05s`` or ``12s``."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def gain_label(key: str) -> str:
    """``selection_top1_over_uniform`` -> ``selection top-1 over uniform``."""
    return key.replace("_top1_", " top-1 ").replace("_", " ")


def _score(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _markdown(summaries: Sequence[StudySummary], notes: Sequence[str], figures: Mapping[str, Any]) -> str:
    lines = ["# tinyopt report", "",
             "Selection scores chose every model; test scores (the official validation set) are only reported.",
             "", "| study | approach | best trial | " + " | ".join(_SCORE_LABELS.values())
             + " | complete | pruned | failed | compute |",
             "|" + " --- |" * 11]
    for s in summaries:
        best = s.best
        cells = [s.name, s.approach, "-" if best is None else str(best.number)]
        cells += [_score(best.scores.get(k) if best else None) for k in SCORES]
        cells += [str(s.counts[state]) for state in ("COMPLETE", "PRUNED", "FAIL")]
        cells.append(format_seconds(s.compute_seconds))
        lines.append("| " + " | ".join(cells) + " |")
    for s in summaries:
        if s.best and s.best.members:
            lines += ["", f"## Ensemble study {s.name}", "", "| member | weight | selection top-1 | test top-1 |",
                      "| --- | --- | --- | --- |"]
            lines += [f"| {m['label']} | {m['weight']:.3f} | {_score(m['selection_top1'])} | "
                      f"{_score(m['test_top1'])} |" for m in s.best.members]
            lines += ["", *[f"- {gain_label(key)}: {value:+.4f}" for key, value in s.best.gains().items()]]
    lines += ["", "## Plots", "", *[f"![{name}]({name})" for name in figures]]
    if notes:
        lines += ["", "## Notes", "", *[f"- {note}" for note in notes]]
    return "\n".join(lines) + "\n"
