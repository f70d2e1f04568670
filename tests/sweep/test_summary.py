"""What a sweep reports: counts by state, its best trials in order, and its summary on the MLflow parent run."""

from __future__ import annotations

import optuna

from tinyopt.core import record
from tinyopt.core.config import load_config
from tinyopt.core.summary import summarize_study
from tinyopt.sweep.summary import log_summary, summarize
from tinyopt.track import tracking

TRACKING = "sqlite:///mlruns/mlflow.db"
COMPLETE, PRUNED, FAIL = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED,
                          optuna.trial.TrialState.FAIL)
LR = optuna.distributions.FloatDistribution(1e-4, 1.0, log=True)


def _study(storage=None, run_ids=("run-0", "run-1", "run-2", "run-3")) -> optuna.Study:
    study = optuna.create_study(study_name="scratch", storage=storage, direction="maximize")
    study.set_user_attr(record.APPROACH, "scratch")
    study.set_user_attr(record.CONFIG, load_config("scratch").as_dict())
    for number, value in enumerate((0.3, 0.6, 0.1, 0.5)):
        study.add_trial(optuna.trial.create_trial(
            value=value, params={"learning_rate": 10.0 ** -(number + 1)}, distributions={"learning_rate": LR},
            user_attrs={record.TEST_TOP1: value / 2, record.RUN_ID: run_ids[number]}))
    study.add_trial(optuna.trial.create_trial(state=PRUNED))
    study.add_trial(optuna.trial.create_trial(state=FAIL))
    study.ask()  # running
    return study


def test_summarize_counts_every_state_and_lists_the_best_first():
    result = summarize(_study(), "postgresql+psycopg://bob:hunter2@db/x", TRACKING, new_trials=3, top=3)
    assert (result.study_name, result.approach, result.new_trials) == ("scratch", "scratch", 3)
    assert result.counts == {"COMPLETE": 4, "PRUNED": 1, "FAIL": 1, "RUNNING": 1}
    shown = [{key: row[key] for key in ("number", "value", "test_top1", "params", "run_id")} for row in result.top]
    assert shown == [
        {"number": 1, "value": 0.6, "test_top1": 0.3, "params": {"learning_rate": 0.01}, "run_id": "run-1"},
        {"number": 3, "value": 0.5, "test_top1": 0.25, "params": {"learning_rate": 0.0001}, "run_id": "run-3"},
        {"number": 0, "value": 0.3, "test_top1": 0.15, "params": {"learning_rate": 0.1}, "run_id": "run-0"}]
    assert result.objective.name == record.SELECTION_TOP1
    assert result.storage == "postgresql+psycopg://bob:***@db/x"
    assert result.ui_command == f"tinyopt ui --tracking-uri {TRACKING}"
    assert (result.exit_code, result.notes, result.interrupted) == (0, [], None)


def test_summarize_reads_a_sqlite_study_and_shows_an_ensembles_weights_as_shares(tmp_path):
    storage = f"sqlite:///{tmp_path / 'studies.db'}"
    study = _study(storage)
    members = [{"label": label, "study": label.split("-")[0], "trial_number": 0, "run_id": "r", "model_kept": True,
                "weight": weight} for label, weight in (("finetune-0", 0.6666), ("scratch-0", 0.3334))]
    study.add_trial(optuna.trial.create_trial(value=0.9, user_attrs={record.MEMBERS: members}))
    result = summarize(optuna.load_study(study_name="scratch", storage=storage), storage, "http://mlflow:5000", top=2)
    assert [row["number"] for row in result.top] == [7, 1]
    assert result.top[0]["params"] == {"weight_finetune-0": 0.667, "weight_scratch-0": 0.333}
    assert result.top[0]["test_top1"] is None and result.counts["COMPLETE"] == 5
    assert result.ui_command == "open http://mlflow:5000 in a browser"


def test_log_summary_brings_the_parent_run_up_to_date(tmp_path):
    tracker = tracking.Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "scratch", "scratch")
    tracker.start_sweep({"approach": "scratch"}, {}, tags={})
    runs = [tracker.start_trial(number, {}, load_config("scratch"), tags={}) for number in range(4)]
    for run in runs:
        run.end("COMPLETE")
    study = _study(run_ids=[run.run_id for run in runs])
    log_summary(tracker, study, summarize_study(study), 5, "tinyopt sweep scratch --storage x")
    tracker.end_sweep()
    parent = tracker.client.get_run(tracker.parent_run_id)
    assert parent.data.metrics[record.BEST_SO_FAR] == 0.6
    assert {key: parent.data.metrics[f"{record.COUNT_PREFIX}{key}"] for key in ("complete", "pruned", "failed")} \
        == {"complete": 4, "pruned": 1, "failed": 1}
    assert parent.data.tags[record.TAG_BEST_TRIAL] == "1" and parent.data.tags[record.TAG_BEST_RUN] == runs[1].run_id
    assert [tracker.client.get_run(run.run_id).data.tags.get(record.TAG_BEST) for run in runs] == [
        None, "true", None, None]
    description = parent.data.tags[record.TAG_DESCRIPTION]
    assert description.startswith("**Sweep of study `scratch`** (scratch), command: `tinyopt sweep scratch")
    assert "**Best: trial 1**" in description and "| learning_rate | 0.01 |" in description
    artifacts = {item.path for item in tracker.client.list_artifacts(tracker.parent_run_id)}
    assert {record.HISTORY, record.IMPORTANCE} <= artifacts
