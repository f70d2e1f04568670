"""tinyopt's saved view of each experiment's runs table in the MLflow UI, and the links that open it."""

from __future__ import annotations

import json

from mlflow import MlflowClient

from tinyopt.core import record
from tinyopt.core.objective import LOG_LOSS
from tinyopt.track import tracking, views
from tinyopt.track.store import open_client

BASE = "http://127.0.0.1:5000"


def test_each_tinyopt_experiment_gets_a_link_to_its_runs_table_and_the_saved_view(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ids = {name: tracking.Tracker(uri, name, "scratch").experiment_id for name in ("x", "ensemble")}
    client = open_client(uri)
    client.create_experiment("not-tinyopt")
    assert views.experiment_urls(uri, BASE) == [
        (f"tinyopt/{name}", f"{BASE}/#/experiments/{ids[name]}/runs?workflowType=machine_learning"
                            f"&viewStateShareKey={views.RUNS_VIEW}") for name in ("ensemble", "x")]
    experiment = client.get_experiment(ids["x"])
    saved = json.loads(experiment.tags[f"mlflow.sharedViewState.{views.RUNS_VIEW}"])
    assert saved["name"] == views.RUNS_VIEW and saved["createdAt"] == experiment.creation_time
    state = json.loads(saved["state"])
    assert state["orderByKey"] == f"metrics.`{record.RANK}`" and state["orderByAsc"] is True
    assert state["selectedColumns"] == [f"metrics.`{record.RANK}`", f"metrics.`{record.final(record.OBJECTIVE_NAME)}`",
                                        f"tags.`{record.TAG_TRIAL_STATE}`", f"tags.`{record.TAG_BEST}`",
                                        "attributes.`Models`"]
    tagged = []
    monkeypatch.setattr(MlflowClient, "set_experiment_tag", lambda self, *args: tagged.append(args))
    assert views.experiment_urls(uri, BASE)[1][0] == "tinyopt/x"
    assert tagged == []  # a view already saved is left alone


def test_a_sweep_saves_the_view_of_its_objective_with_its_charts(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = tracking.Tracker(uri, "ensemble", "ensemble")
    tracker.start_sweep({}, {}, tags={}, objective=LOG_LOSS, searched=["weight_a-0", "weight_b-1"])
    experiment = tracker.client.get_experiment(tracker.experiment_id)
    state = json.loads(json.loads(experiment.tags[f"mlflow.sharedViewState.{views.RUNS_VIEW}"])["state"])
    loss, top1 = record.final(record.SELECTION_LOG_LOSS), record.final(record.SELECTION_TOP1)
    # The objective, and the top-1 a person reads beside a loss.
    assert state["selectedColumns"][:3] == [f"metrics.`{record.RANK}`", f"metrics.`{loss}`", f"metrics.`{top1}`"]
    parallel, line = state["compareRunCharts"]
    assert parallel["type"] == "PARALLEL" and parallel["selectedParams"] == ["weight_a-0", "weight_b-1"]
    assert parallel["selectedMetrics"] == [top1, loss] and parallel["showAllRuns"] is True  # coloured by the last
    # The UI applies saved widths to the columns its saved order names: all of them, MLflow's first.
    assert state["columnOrder"] == [*views._LEADING_COLUMNS, *state["selectedColumns"]]
    widths = state["columnWidths"]
    assert set(widths) <= set(state["columnOrder"])
    assert widths[f"metrics.`{loss}`"] > widths[f"metrics.`{top1}`"] > 100 >= widths[f"metrics.`{record.RANK}`"]
    assert [section["columns"] for section in state["compareRunSections"]] == [1]  # one card a row: readable
    assert line["type"] == "LINE" and line["metricKey"] == "best_selection_log_loss"
    assert {chart["metricSectionId"] for chart in (parallel, line)} == {state["compareRunSections"][0]["uuid"]}
    assert experiment.tags["mlflow.experiment.primaryMetric.name"] == loss
    parent = tracker.client.get_run(tracker.parent_run_id)
    assert parent.data.metrics[record.RANK] == 0  # first in the table sorted by rank
    assert parent.data.tags[record.TAG_OBJECTIVE] == "selection log loss (lower is better)"


def test_a_store_without_experiments_has_no_links(tmp_path):
    assert views.experiment_urls(f"sqlite:///{tmp_path / 'mlflow.db'}", BASE) == []
