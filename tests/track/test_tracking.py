"""A study's sweep in MLflow: one experiment, one parent run found again by every sweep, a nested run per trial."""

from __future__ import annotations

import re

import pytest

from tinyopt.core import record
from tinyopt.core.config import load_config
from tinyopt.core.errors import StudyError
from tinyopt.track import names as run_names
from tinyopt.track import tracking

SCRATCH = load_config("scratch")


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory):
    """One store for the module (MLflow creates its tables once); each test tracks a study of its own."""
    return f"sqlite:///{tmp_path_factory.mktemp('tracking') / 'mlflow.db'}"


def _tracker(tracking_uri, study) -> tracking.Tracker:
    tracker = tracking.Tracker(tracking_uri, study, "scratch")
    tracker.start_sweep({"approach": "scratch", "study": study}, {"approach": "scratch"}, tags={"extra": "1"})
    return tracker


def test_every_sweep_of_a_study_finds_its_one_parent_run(tracking_uri):
    first = _tracker(tracking_uri, "parent")
    assert first.client.get_experiment(first.experiment_id).name == "tinyopt/parent"
    first.end_sweep()
    parent = first.client.get_run(first.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.info.run_name == "parent"
    assert {key: parent.data.tags[key] for key in (record.TAG_PARENT, record.TAG_STUDY, record.TAG_APPROACH, "extra")} \
        == {record.TAG_PARENT: "true", record.TAG_STUDY: "parent", record.TAG_APPROACH: "scratch", "extra": "1"}
    assert parent.data.params == {"approach": "scratch"}
    assert [a.path for a in first.client.list_artifacts(first.parent_run_id)] == [record.CONFIG_FILE]
    again = _tracker(tracking_uri, "parent")
    assert again.parent_run_id == first.parent_run_id and again.experiment_id == first.experiment_id
    assert again.client.get_run(again.parent_run_id).info.status == "RUNNING"  # reopened
    again.end_sweep("KILLED")
    assert again.client.get_run(again.parent_run_id).info.status == "KILLED"


def test_a_trial_run_is_nested_named_and_identified(tracking_uri):
    tracker = _tracker(tracking_uri, "trials")
    params = {"stages": 2, "width": 16, "learning_rate": 3e-4, "epochs": 3}
    run = tracker.start_trial(7, params, SCRATCH, tags={record.TAG_DEVICE: "cpu"},
                              searched={"stages": 2, "learning_rate": 3e-4}, headline={"stages": 2, "optimizer": "sgd"})
    run.end("COMPLETE")
    tracker.end_sweep()
    stored = tracker.client.get_run(run.run_id)
    assert stored.info.run_name == "t7 stages=2 sgd" and stored.info.status == "FINISHED"
    tags = stored.data.tags
    assert tags["mlflow.parentRunId"] == tracker.parent_run_id and tags[record.TAG_TRIAL_NUMBER] == "7"
    assert tags[record.TAG_DEVICE] == "cpu" and tags[record.TAG_MODEL_KEPT] == "false"
    assert tags[record.TAG_DESCRIPTION].startswith("Trial 7 of study `trials`.\n\n| param | value |")
    assert "| width | 16 |" in tags[record.TAG_DESCRIPTION]
    identity = {key: str(value) for key, value in run_names.identity(SCRATCH).items()}
    assert stored.data.params == {"stages": "2", "learning_rate": "0.0003", **identity}


def test_run_url_is_the_run_in_the_ui(tracking_uri):
    tracker = tracking.Tracker(tracking_uri, "links", "scratch")
    path = f"#/experiments/{tracker.experiment_id}/runs/abc?workflowType=machine_learning"
    assert tracker.run_url("abc") == f"http://127.0.0.1:5000/{path}"  # tinyopt ui's address, for an embedded store
    server = tracking.Tracker.__new__(tracking.Tracker)
    server.tracking_uri, server.experiment_id = "https://bob:hunter2@mlflow.example.com/", "4"
    assert server.run_url("abc") == ("https://bob:***@mlflow.example.com/#/experiments/4/runs/abc"
                                     "?workflowType=machine_learning")


def test_the_best_tag_moves_to_the_new_best_run(tracking_uri):
    tracker = _tracker(tracking_uri, "best")
    runs = [tracker.start_trial(number, {}, SCRATCH, tags={}) for number in range(3)]
    for run in runs:
        run.end("COMPLETE")
    tracker.end_sweep()
    tracker.move_best_tag(runs[0].run_id)
    tracker.move_best_tag(runs[2].run_id)
    tags = [tracker.client.get_run(run.run_id).data.tags for run in runs]
    assert [t.get(record.TAG_BEST) for t in tags] == [None, None, "true"]
    # The best trial's colour goes with the tag; the former best gets its own back.
    assert [t[record.TAG_COLOR] for t in tags] == [run_names.run_colour(0), run_names.run_colour(1),
                                                   run_names.BEST_COLOUR]


def test_trial_runs_are_ranked_by_the_objective_and_only_changes_are_logged(tracking_uri, monkeypatch):
    tracker = _tracker(tracking_uri, "ranks")
    runs = [tracker.start_trial(number, {}, SCRATCH, tags={}) for number in range(3)]
    for run in runs:
        run.end("COMPLETE")
    tracker.end_sweep()
    ids = [run.run_id for run in runs]
    tracker.rank_runs({ids[1]: 1, ids[0]: 2}, step=2)
    logged = []
    log_batch = tracker.client.log_batch
    monkeypatch.setattr(tracker.client, "log_batch",
                        lambda run_id, **kw: (logged.append(run_id), log_batch(run_id, **kw)))
    tracker.rank_runs({ids[2]: 1, ids[1]: 2, ids[0]: 3}, step=3)
    assert sorted(logged) == sorted(ids)  # all three moved
    logged.clear()
    tracker.rank_runs({ids[2]: 1, ids[1]: 2, ids[0]: 3}, step=3)
    assert logged == []
    ranked = tracker.client.search_runs([tracker.experiment_id], order_by=[f"metrics.`{record.RANK}` ASC"])
    assert [run.info.run_id for run in ranked] == [tracker.parent_run_id, ids[2], ids[1], ids[0]]


def test_a_run_left_running_is_found_and_closed_once(tracking_uri):
    tracker = _tracker(tracking_uri, "recovery")
    left = tracker.start_trial(4, {}, SCRATCH, tags={})
    done = tracker.start_trial(5, {}, SCRATCH, tags={})
    done.end("COMPLETE")
    left.wait()
    done.wait()
    assert tracker.open_trial_runs() == {4: left.run_id}
    assert tracker.close_run(left.run_id, "FAIL", "the worker's process is gone") is True
    assert tracker.close_run(left.run_id, "FAIL", "again") is False
    closed = tracker.client.get_run(left.run_id)
    assert closed.info.status == "FAILED" and closed.data.tags[record.FAIL_REASON] == "the worker's process is gone"
    assert tracker.open_trial_runs() == {}
    tracker.end_sweep()


def test_a_refit_run_names_the_trial_it_retrains(tracking_uri):
    tracker = _tracker(tracking_uri, "refit")
    trial = tracker.start_trial(3, {}, SCRATCH, tags={})
    trial.end("COMPLETE")
    tracker.end_sweep()
    refit = tracker.start_refit(3, trial.run_id, {"epochs": 4}, SCRATCH, tags={}, parent_run_id=tracker.parent_run_id,
                                searched={"stages": 2}, headline={"stages": 2}, what="Refit on train + selection.")
    stored = tracker.client.get_run(refit.run_id)
    assert stored.info.run_name == "refit of t3 stages=2"
    assert stored.data.tags[record.TAG_REFIT_OF] == "3" and stored.data.tags[record.TAG_REFIT_OF_RUN] == trial.run_id
    assert stored.data.tags["mlflow.parentRunId"] == tracker.parent_run_id
    assert stored.data.params["stages"] == "2"


def test_an_unusable_store_is_a_study_error(tmp_path):
    path = tmp_path / "mlflow.db"
    path.write_bytes(b"garbage" * 1000)
    with pytest.raises(StudyError, match=re.escape(f"the MLflow store {path} is damaged")):
        tracking.Tracker(f"sqlite:///{path}", "scratch", "scratch")
