"""The notes optuna-dashboard shows: markdown with links that work outside the MLflow UI."""

from __future__ import annotations

import optuna
from optuna_dashboard._note import get_note_from_system_attrs

from tinyopt.stores import notes


def test_relative_mlflow_links_become_absolute():
    text = "Best: trial 3 ([run 1234abcd](#/experiments/2/runs/1234abcd?workflowType=machine_learning)), [x](http://a/b)"
    assert notes.absolute_links(text, "http://127.0.0.1:5000/") == (
        "Best: trial 3 ([run 1234abcd](http://127.0.0.1:5000/#/experiments/2/runs/1234abcd"
        "?workflowType=machine_learning)), [x](http://a/b)")


def test_a_study_and_a_trial_get_the_notes_the_dashboard_reads(tmp_path):
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'studies.db'}", study_name="s")

    def objective(trial):
        notes.save(trial, f"[MLflow run of trial {trial.number}](http://127.0.0.1:5000/#/x)")
        return 1.0

    study.optimize(objective, n_trials=1)
    notes.save(study, "**Sweep of study `s`**")
    notes.save(study, "**Sweep of study `s`**, updated")  # rewritten after every trial
    attrs = study._storage.get_study_system_attrs(study._study_id)
    assert get_note_from_system_attrs(attrs, None)["body"] == "**Sweep of study `s`**, updated"
    trial_id = study.trials[0]._trial_id
    assert get_note_from_system_attrs(attrs, trial_id)["body"] == "[MLflow run of trial 0](http://127.0.0.1:5000/#/x)"
