"""A study of several objectives, for people: its Pareto front as a table, and any trial picked by number.

``tinyopt best`` prints the front (``rows``) where a study of one objective shows its best trial, and
``tinyopt report`` adds it as a table; ``tinyopt best STUDY --trial N`` exports or refits trial N of
any study (``pick_trial``), a trial of the front or another one.
"""

from __future__ import annotations

from tinyopt.core import record
from tinyopt.core.summary import BestTrial, StudySummary, pick
from tinyopt.stores import storage as storages

# The columns of a front, (record key, heading): what it trades, then what a person checks it against.
COLUMNS = ((record.SELECTION_TOP1, record.SCORE_LABELS[record.SELECTION_TOP1]), (record.LATENCY_MS, "latency ms"),
           (record.MODEL_PARAMS, "model params"), (record.TEST_TOP1, record.SCORE_LABELS[record.TEST_TOP1]))
HEADER = ("trial", *(label for _, label in COLUMNS))


def rows(summary: StudySummary) -> list[list[str]]:
    """The trials of the study's front, the most accurate first, as the cells of ``HEADER``."""
    return [[str(trial.number), *(_cell(key, trial) for key, _ in COLUMNS)] for trial in summary.front]


def _cell(key: str, trial: BestTrial) -> str:
    value = {**trial.scores, **trial.costs}.get(key)
    if value is None:
        return "-"
    if key == record.MODEL_PARAMS:
        return f"{int(value):,}"
    return f"{value:.3g}" if key == record.LATENCY_MS else f"{value:.4f}"


def pick_trial(storage_url: str, summary: StudySummary, number: int) -> StudySummary:
    """``summary`` with trial ``number`` of its study in place of its best (``tinyopt best --trial N``).

    Export and refit then take that trial as they take a study's best.

    Raises:
        StudyError: the study has no such trial, or it is not complete.
    """
    return pick(summary, storages.load_study(summary.name, storage_url), number)
