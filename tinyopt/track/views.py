"""tinyopt's saved view of each experiment's runs table in the MLflow UI, and the links that open it.

The view is kept in an experiment tag, as the MLflow UI keeps a view saved from its Views menu
(``mlflow.sharedViewState.<key>``): a link with ``viewStateShareKey=<key>`` opens it. Without it the
table shows no metric, folds the trials under their parent and sorts them by start time. tinyopt's
view sorts by ``record.RANK`` (the parent 0, then the trials from the best by the objective; pruned and
failed trials, which have none, last), shows the objective, selection top-1, state and ``best``
columns wide enough to read, and opens its chart view on a parallel-coordinates chart of the searched
params against the objective and the parent's best-so-far line, one card a row so that both can be read.
An MLflow that reads no such view ignores the link's viewStateShareKey and opens its plain runs table.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from typing import Any

from tinyopt.core import record
from tinyopt.core.objective import TOP1, Objective
from tinyopt.core.urls import ML_LAYOUT
from tinyopt.track.names import experiment_name
from tinyopt.track.store import open_client

RUNS_VIEW = "tinyopt"
_RUNS_VIEW_TAG = f"mlflow.sharedViewState.{RUNS_VIEW}"
# The metric whose chart the MLflow UI draws first in an experiment's chart view.
_PRIMARY_METRIC_TAG = "mlflow.experiment.primaryMetric.name"
# MLflow's own first columns of the runs table. The UI applies saved widths only to the columns its saved
# order names, so the order names them all: MLflow's first, then tinyopt's, rank first and Models last.
_LEADING_COLUMNS = ("attributes.`Run Name`", "runDateAndNestInfo", "duration")
_MODELS_COLUMN = "attributes.`Models`"
_SECTION = "tinyopt"
# How many runs the parallel-coordinates chart draws (MLflow's default is 10).
_PARALLEL_RUNS = 100


def experiment_urls(tracking_uri: str, base_url: str) -> list[tuple[str, str]]:
    """Each tinyopt experiment and the URL of its runs table in the MLflow UI at ``base_url``.

    Saves tinyopt's view of the runs table in each experiment that has none (a sweep saves it
    when it starts). MLflow 3 opens an experiment without ``workflowType=machine_learning`` on its
    GenAI overview, not on its runs.
    """
    client = open_client(tracking_uri)
    experiments = client.search_experiments(filter_string=f"name LIKE '{experiment_name('')}%'",
                                            order_by=["name ASC"])
    urls = []
    for experiment in experiments:
        if _RUNS_VIEW_TAG not in experiment.tags:
            save_view(client, experiment.experiment_id, experiment.creation_time or 0, TOP1, [])
        urls.append((experiment.name, f"{base_url}/#/experiments/{experiment.experiment_id}/runs"
                                      f"?{ML_LAYOUT}&viewStateShareKey={RUNS_VIEW}"))
    return urls


def save_view(client: Any, experiment_id: str, created_ms: int, objective: Objective, searched: Sequence[str]) -> None:
    """Save tinyopt's runs view of the experiment of a study of ``objective`` that searches ``searched``.

    ``searched`` names params every trial has: MLflow's parallel-coordinates chart draws only the runs
    that have each param it shows, and hides itself when none has them all.
    """
    view = runs_view(created_ms, objective, searched)
    client.set_experiment_tag(experiment_id, _RUNS_VIEW_TAG, view)
    client.set_experiment_tag(experiment_id, _PRIMARY_METRIC_TAG, record.final(objective.name))


def runs_view(created_ms: int, objective: Objective, searched: Sequence[str]) -> str:
    """The saved view, as MLflow 3.17's UI writes one (its state holds only what differs from the defaults)."""
    shown = [record.final(objective.name)]
    if objective.name != record.SELECTION_TOP1:
        shown.append(record.final(record.SELECTION_TOP1))  # the score a person reads beside a loss
    metrics = [record.RANK, *shown]
    tags = (record.TAG_TRIAL_STATE, record.TAG_BEST)
    named = {f"metrics.`{key}`": key for key in metrics} | {f"tags.`{key}`": key for key in tags}
    columns = [*named, _MODELS_COLUMN]
    section = str(uuid.uuid5(uuid.NAMESPACE_URL, f"tinyopt/{objective.name}"))
    charts = [_chart("LINE", section, "best so far", metricKey=objective.best_metric,
                     selectedMetricKeys=[objective.best_metric], xAxisKey="step", lineSmoothness=0,
                     scaleType="linear", xAxisScaleType="linear", useGlobalXaxisKey=False,
                     useGlobalLineSmoothing=False, range={}, yAxisKey="metric", yAxisExpressions=[],
                     ignoreOutliers=False, selectedXAxisMetricKey="")]
    if searched:
        # Every trial, not only the first 10 rows the chart view shows by default; the lines coloured by the
        # objective (MLflow colours them by the last metric).
        charts.insert(0, _chart("PARALLEL", section, "searched params and the objective",
                                selectedParams=list(searched), selectedMetrics=shown[::-1], showAllRuns=True,
                                runsCountToCompare=_PARALLEL_RUNS))
    state = {"orderByKey": f"metrics.`{record.RANK}`", "orderByAsc": True, "selectedColumns": columns,
             "columnOrder": [*_LEADING_COLUMNS, *columns],
             "columnWidths": {column: _column_width(key) for column, key in named.items()},
             "compareRunCharts": charts,
             "compareRunSections": [{"uuid": section, "name": _SECTION, "display": True, "isReordered": False,
                                     "deleted": False, "isGenerated": False, "columns": 1}]}
    return json.dumps({"name": RUNS_VIEW, "createdAt": created_ms, "updatedAt": created_ms,
                       "state": json.dumps(state)})


def _column_width(header: str) -> int:
    """Pixels that show ``header`` whole: MLflow's default 100 cuts "final_selection_top1" to "final_selec..."."""
    return max(80, 7 * len(header) + 30)


def _chart(kind: str, section: str, name: str, **settings: Any) -> dict[str, Any]:
    """One card of the chart view, as the MLflow UI stores it."""
    return {"uuid": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{section}/{kind}")), "type": kind,
            "runsCountToCompare": settings.pop("runsCountToCompare", 10), "metricSectionId": section,
            "deleted": False, "isGenerated": False, "displayName": name, **settings}
