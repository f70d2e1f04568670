"""The approaches side by side: best trials, trial counts, compute time, plots.

``summarize_studies`` reads every study of an Optuna storage (``tinyopt best`` prints it);
``write_report`` adds the plots (``tinyopt.core.plots``) and files of ``tinyopt report`` and logs them to
MLflow, where ``report.html`` shows them inline. Optuna and matplotlib are imported inside the
functions that use them.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tinyopt.core import forecast as forecasts
from tinyopt.core import plots, record
from tinyopt.core.config import APPROACHES
from tinyopt.core.errors import StudyError
from tinyopt.core.forecast import format_seconds
from tinyopt.core.record import SCORES
from tinyopt.core.summary import BestTrial, StudySummary, summarize_study
from tinyopt.core.urls import redact
from tinyopt.results import pareto
from tinyopt.stores import storage as storages
from tinyopt.track.names import config_hash, safe_name


def _study_order(names: Sequence[str]) -> list[str]:
    """Approach studies in the usual order (ensemble last), then any others by name."""
    rank = {approach: i for i, approach in enumerate(APPROACHES)}
    return sorted(names, key=lambda n: (rank.get(n, len(rank)), n))


def summarize_studies(storage_url: str, names: Sequence[str] = ()) -> list[StudySummary]:
    """Summaries of the named studies (default: every study in the storage), approaches first.

    Raises:
        StudyError: the storage is missing or empty, or a named study is not in it.
    """
    return [summarize_study(study) for study in _load_studies(storage_url, names)]


def _load_studies(storage_url: str, names: Sequence[str]) -> list[Any]:
    existing = storages.study_names(storage_url)
    if not existing:
        raise StudyError(f"{redact(storage_url)} holds no studies; run `tinyopt sweep APPROACH` first")
    missing = [n for n in names if n not in existing]
    if missing:
        raise StudyError(f"no study named {', '.join(map(repr, missing))} in {redact(storage_url)}; "
                         f"it holds: {', '.join(_study_order(existing))}")
    return [storages.load_study(n, storage_url) for n in _study_order(names or existing)]


@dataclass
class Report:
    """What ``write_report`` produced."""

    summaries: list[StudySummary]
    files: list[Path]
    notes: list[str]
    mlflow_run_id: str | None = None
    # By ensemble study: each member whose top-1 in the vote differs from its own trial's, as a line to show.
    members: dict[str, list[str]] = field(default_factory=dict)


def write_report(storage_url: str, tracking_uri: str, out_dir: str | Path, *, log_to_mlflow: bool = True) -> Report:
    """Compare every study of a storage and write the comparison to ``out_dir``.

    Writes ``report.md``, ``report.html`` (the same, its plots inline) and ``report.json`` (the
    numbers), ``comparison.png`` (best trial of each study), and per study ``history_<study>.png``,
    ``importance_<study>.png`` (PED-ANOVA, as optuna-dashboard ranks params) and, for a study of two
    objectives, ``pareto_<study>.png`` beside a table of its Pareto front; then logs them
    to one MLflow run of the experiment ``tinyopt/report``, with ``report.html`` for reading there.
    Each study's best trial links to its MLflow run; an ensemble's members are listed with the scores
    they have in its vote, and a member whose own trial scored otherwise says so (``Report.members``).

    Raises:
        StudyError: no storage or no studies.
    """

    if log_to_mlflow:
        from tinyopt.track import store

        store.check(tracking_uri)  # before the report's files are written, not after
    studies = _load_studies(storage_url, ())
    summaries = [summarize_study(study) for study in studies]
    figures: dict[str, Any] = {}
    titles: dict[str, str] = {}  # the heading of each plot in report.md and report.html
    notes: list[str] = []
    importances: dict[str, dict[str, float]] = {}
    for study, summary in zip(studies, summaries, strict=True):
        if summary.best is None:
            notes.append(f"study {summary.name!r} has no complete trial")
            continue
        complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
        name = f"history_{summary.name}.png"
        figures[name] = plots.history_chart(summary.name, complete, summary.objective)
        titles[name] = (f"Optimisation history of {summary.name}: {summary.objective.label} by trial, "
                        "and the best so far")
        found, why = plots.importances(study)
        if found:
            importances[summary.name] = found
            name = f"importance_{summary.name}.png"
            figures[name] = plots.importance_chart(summary.name, found)
            titles[name] = f"Parameter importance in {summary.name} ({plots.IMPORTANCE_METHOD})"
        else:
            notes.append(f"no parameter importance for {summary.name!r} ({why})")
        if summary.front:
            name = f"pareto_{summary.name}.png"
            figures[name] = plots.pareto_chart(summary.name, complete, [t.number for t in summary.front],
                                               summary.objectives)
            titles[name] = f"Pareto front of {summary.name}: {summary.objective.label} against latency"
    rows = [{"name": s.name, **s.best.scores} for s in summaries if s.best]
    if rows:
        figures["comparison.png"] = plots.comparison_chart(rows, "best trial of each study")
        titles["comparison.png"] = "Best trial of each study: selection and test scores"
    members = _member_notes(summaries, _own_scores(studies, summaries))
    numbers = {"storage": redact(storage_url), "studies": [asdict(s) for s in summaries],
               "gains": {s.name: s.best.gains() for s in summaries if s.best and s.best.members},
               "importances": importances, "notes": notes}
    images = {name: _png(figure) for name, figure in figures.items()}
    texts = {"report.json": json.dumps(numbers, indent=2, default=str) + "\n",
             "report.md": _markdown(summaries, members, notes, titles),
             "report.html": _html(summaries, members, notes, titles, images)}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = [out / name for name in [*texts, *images]]
    for name, text in texts.items():
        (out / name).write_text(text)
    for name, data in images.items():
        (out / name).write_bytes(data)
    run_id = _log(tracking_uri, summaries, texts, figures) if log_to_mlflow else None
    return Report(summaries, files, notes, run_id, members)


def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    return buffer.getvalue()


def _log(tracking_uri: str, summaries: Sequence[StudySummary], texts: Mapping[str, str],
         figures: Mapping[str, Any]) -> str:
    from tinyopt.track.runs import TrialRun
    from tinyopt.track.tracking import Tracker

    # The study-level run of a pseudo study "report": each report updates the one latest report run.
    tracker = Tracker(tracking_uri, "report", "report")
    studies = {"studies": [s.name for s in summaries]}
    run_id = tracker.start_sweep(studies, {"approach": "", record.CONFIG_HASH: config_hash(studies)}, tags={})
    run = TrialRun(tracker.client, run_id)
    run.log_metrics({f"{safe_name(s.name)}.{key}": value for s in summaries if s.best
                     for key, value in {**s.best.scores, **s.best.gains()}.items()})
    # MLflow shows markdown as text, its image links unresolved: report.html carries the images inline.
    for name, text in texts.items():
        if name != "report.md":
            run.log_text(text, name)
    for name, figure in figures.items():
        run.log_figure(figure, name)
    tracker.end_sweep()
    return run_id


def gain_label(key: str) -> str:
    """``selection_top1_over_uniform`` -> ``selection top-1 over uniform``."""
    return key.replace("_top1_", " top-1 ").replace("_", " ")


def _score(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _temperature(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


# The columns of an ensemble's comparison, (score key, label), in the report and `tinyopt best`.
VERSUS_COLUMNS = tuple((key, record.SCORE_LABELS[key]) for key in (record.SELECTION_TOP1, record.TEST_TOP1,
                                                                    record.SELECTION_LOG_LOSS, record.TEST_LOG_LOSS))
# A member's top-1 in the vote differs from its own trial's (by more than rounding) where its probabilities
# were restricted to the 200 classes on the way into the vote: a pretrained trial of restrict_200 = false
# scores its own top-1 over all 1000 ImageNet outputs. The calibration keeps the order of each image's classes.
_DIFFERENT = 0.005
_TOP1 = (record.SELECTION_TOP1, record.TEST_TOP1)


def _own_scores(studies: Sequence[Any], summaries: Sequence[StudySummary]) -> dict[tuple[str, int], dict[str, float]]:
    """The top-1 each ensemble member's trial recorded in its own study, by (study, trial number).

    A member whose study is no longer in the storage is left out.
    """
    wanted = {(m.study, m.trial_number) for s in summaries if s.best for m in s.best.members}
    trials = {(study.study_name, t.number): t for study in studies if study.study_name in {n for n, _ in wanted}
              for t in study.get_trials(deepcopy=False)}
    return {key: {k: trials[key].user_attrs[k] for k in _TOP1 if k in trials[key].user_attrs}
            for key in wanted if key in trials}


def _member_notes(summaries: Sequence[StudySummary],
                  own: Mapping[tuple[str, int], Mapping[str, float]]) -> dict[str, list[str]]:
    """By ensemble study: a line for each member whose top-1 in the vote differs from its own trial's (``own``)."""
    found: dict[str, list[str]] = {}
    for s in summaries:
        for m in s.best.members if s.best else []:
            theirs = own.get((m.study, m.trial_number), {})
            keys = [key for key in _TOP1 if key in theirs and key in m.scores]
            if any(abs(m.scores[key] - theirs[key]) > _DIFFERENT for key in keys):
                vote = " and ".join(f"{record.SCORE_LABELS[key]} {_score(m.scores[key])}" for key in keys)
                alone = " and ".join(_score(theirs[key]) for key in keys)
                found.setdefault(s.name, []).append(
                    f"{m.label} scores {vote} in the vote (calibrated, restricted to the 200 classes), {alone} "
                    f"as {m.study} trial {m.trial_number} in its own study")
    return found


_INTRO = "Selection scores chose every model; test scores (the official validation set) are only reported."
_WEIGHTS = ("Weights are the share of each member in the vote (they sum to 1), as in `tinyopt best` and MLflow. "
            "Each member is calibrated before the vote: its probabilities p become softmax(log(p) / T), the "
            "temperature T fitted on the selection split. A member's scores are those of its calibrated "
            "probabilities over the 200 classes, as they vote: they can differ from the scores of its own trial "
            "(a pretrained trial of restrict_200 = false scored its top-1 over all 1000 ImageNet outputs).")


@dataclass(frozen=True)
class _Link:
    """A table cell that opens a page: the MLflow run of a study's best trial."""

    text: str
    url: str


def _best_cell(best: BestTrial | None) -> str | _Link:
    if best is None:
        return "-"
    return _Link(str(best.number), best.run_url) if best.run_url else str(best.number)


def _tables(summaries: Sequence[StudySummary], members: Mapping[str, Sequence[str]]
            ) -> list[tuple[str, list[str], list[list[str | _Link]], list[str]]]:
    """The report's tables, as (title, header, rows, lines after), for both the markdown and the HTML."""
    header = ["study", "approach", "best trial", "objective", "objective value",
              *(record.SCORE_LABELS[key] for key in SCORES), "complete", "pruned", "failed", "compute"]
    rows: list[list[str | _Link]] = []
    for s in summaries:
        best = s.best
        cells = [s.name, s.approach, _best_cell(best), s.objective.heading, _score(best.value if best else None)]
        cells += [_score(best.scores.get(k) if best else None) for k in SCORES]
        cells += [str(s.counts[state]) for state in ("COMPLETE", "PRUNED", "FAIL")]
        cells.append(format_seconds(s.compute_seconds))
        rows.append(cells)
    tables = [("Studies", header, rows, [])]
    for s in summaries:
        if s.best and s.best.members:
            table = [[m.label, f"{m.weight:.3f}", _temperature(m.temperature),
                      *[_score(m.scores.get(key)) for key, _ in VERSUS_COLUMNS]] for m in s.best.members]
            table += [[name, "-", "-", *[_score(found.get(key)) for key, _ in VERSUS_COLUMNS]]
                      for name, found in s.best.versus()]
            gains = [f"{gain_label(key)}: {value:+.4f}" for key, value in s.best.gains().items()]
            tables.append((f"Ensemble study {s.name}",
                           ["member", "weight", "temperature", *[label for _, label in VERSUS_COLUMNS]],
                           table, [_WEIGHTS, *members.get(s.name, []), *gains]))
        if s.front:
            tables.append((f"Pareto front of {s.name}", list(pareto.HEADER), pareto.rows(s),
                           [f"Latency: the median of one image's prediction on the sweep's device. Export any "
                            f"trial with `tinyopt best {s.name} --trial N --export DIR`."]))
    for s in summaries:
        if s.forecast is not None and s.actual is not None:
            tables.append((f"Forecast of {s.name} against what happened", list(forecasts.HEADER),
                           [list(row) for row in forecasts.comparison(s.forecast, s.actual)],
                           [f"Forecast by `tinyopt plan` on {s.forecast.device}, kept with the study by "
                            "`tinyopt sweep --forecast`; the wall time runs from the first trial's start to the "
                            "last one's end."]))
    return tables


def _markdown(summaries: Sequence[StudySummary], members: Mapping[str, Sequence[str]], notes: Sequence[str],
              titles: Mapping[str, str]) -> str:
    def cell(value: str | _Link) -> str:
        return f"[{value.text}]({value.url})" if isinstance(value, _Link) else value

    lines = ["# tinyopt report", "", _INTRO]
    for title, header, rows, after in _tables(summaries, members):
        lines += ["", f"## {title}", "", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        lines += ["| " + " | ".join(map(cell, row)) + " |" for row in rows]
        lines += ["", *[f"- {line}" for line in after]] if after else []
    lines += ["", "## Plots"]
    for name, title in titles.items():
        lines += ["", f"### {title}", "", f"![{title}]({name})"]
    if notes:
        lines += ["", "## Notes", "", *[f"- {note}" for note in notes]]
    return "\n".join(lines) + "\n"


def _html(summaries: Sequence[StudySummary], members: Mapping[str, Sequence[str]], notes: Sequence[str],
          titles: Mapping[str, str], images: Mapping[str, bytes]) -> str:
    """The report as one HTML page, its plots inline: MLflow's artifact view shows it as a person reads it."""
    def cell(value: str | _Link) -> str:
        if isinstance(value, _Link):  # a new tab: inside MLflow's artifact view the run opens beside the report
            return f"<a href='{html.escape(value.url)}' target='_blank'>{html.escape(value.text)}</a>"
        return html.escape(value)

    def cells(tag: str, row: Sequence[str | _Link]) -> str:
        return "<tr>" + "".join(f"<{tag}>{cell(value)}</{tag}>" for value in row) + "</tr>"

    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>tinyopt report</title><style>"
             "body{font-family:sans-serif;margin:1em}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}img{max-width:100%}"
             "</style></head><body>", "<h1>tinyopt report</h1>", f"<p>{html.escape(_INTRO)}</p>"]
    for title, header, rows, after in _tables(summaries, members):
        parts += [f"<h2>{html.escape(title)}</h2><table>", cells("th", header), *[cells("td", r) for r in rows],
                  "</table>", *[f"<p>{html.escape(line.replace('`', ''))}</p>" for line in after]]
    parts.append("<h2>Plots</h2>")
    parts += [f"<h3>{html.escape(titles[name])}</h3><img alt='{html.escape(titles[name])}' "
              f"src='data:image/png;base64,{base64.b64encode(data).decode()}'>" for name, data in images.items()]
    if notes:
        parts += ["<h2>Notes</h2><ul>", *[f"<li>{html.escape(note)}</li>" for note in notes], "</ul>"]
    return "\n".join([*parts, "</body></html>"]) + "\n"
