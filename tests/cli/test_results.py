"""`tinyopt best | predict | report | ui` through click: tables, usage errors and missing stores as one line."""

from __future__ import annotations

import optuna
import pytest
from click.testing import CliRunner

from tinyopt.cli import cli
from tinyopt.core import record


def _invoke(args):
    return CliRunner().invoke(cli, args, env={"COLUMNS": "250"})


def _one_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    return lines[0]


@pytest.mark.parametrize("args, fragment", [
    (["best", "--storage", "sqlite:///missing/studies.db"], "no Optuna storage at missing/studies.db"),
    (["report", "--storage", "journal:missing/journal.log"], "no Optuna storage at missing/journal.log"),
    (["ui", "--tracking-uri", "sqlite:///missing/mlflow.db"], "no MLflow store at missing/mlflow.db"),
    (["ui", "--tracking-uri", "https://user:secret@mlflow.example.com"], "is an MLflow server"),
])
def test_missing_stores_are_one_line_errors(args, fragment, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = _invoke(args)
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and fragment in lines[0], result.output
    assert "secret" not in result.output
    assert not (tmp_path / "missing").exists()


@pytest.mark.parametrize("args, fragment", [
    (["best", "--register", "tiny"], "--register needs --export DIR"),
    (["best", "--data", "tiny.zip"], "--data and --cache are for --refit"),
    (["best", "--cache", "cache"], "--data and --cache are for --refit"),
    (["ui", "--tracking-uri", "sqlite:///mlflow.db", "--dashboard", "--port", "5005", "--dashboard-port", "5005"],
     "--dashboard-port and --port are both 5005"),
    (["predict", "bundle"], "Missing argument 'IMAGE...'"),
])
def test_usage_errors_are_one_line_with_exit_code_2(args, fragment, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mlflow.db").touch()  # ui's store exists: the ports are checked next
    result = _invoke(args)
    assert result.exit_code == 2, result.output
    line = _one_line(result)
    assert line.startswith("error: ") and fragment in line and "--help" in line, line


@pytest.fixture
def storage(tmp_path):
    """A storage with a ``scratch`` study of a complete and a failed trial, and a ``finetune`` study of a failed one."""
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    scratch = optuna.create_study(study_name="scratch", storage=url, direction="maximize")
    attrs = {record.SELECTION_TOP1: 0.5, record.TEST_TOP1: 0.375, record.TEST_TOP5: 0.8125, record.RUN_ID: "run-7",
             record.PARAMS: {"learning_rate": 0.0123456, "optimizer": "adam"}}
    scratch.add_trial(optuna.trial.create_trial(value=0.5, user_attrs=attrs))
    scratch.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL))
    finetune = optuna.create_study(study_name="finetune", storage=url, direction="maximize")
    finetune.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL))
    return url


def test_best_shows_the_best_trial_of_each_study(storage, tmp_path):
    result = _invoke(["best", "--storage", storage, "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])
    assert result.exit_code == 0, result.output
    [scratch] = [line for line in result.output.splitlines() if line.startswith("│ scratch ")]
    assert [cell.strip() for cell in scratch.split("│")[1:-1]] == ["scratch", "0", "selection top-1", "0.5000",
                                                                   "0.5000", "0.3750", "0.8125"], scratch
    [finetune] = [line for line in result.output.splitlines() if line.startswith("│ finetune ")]
    assert [cell.strip() for cell in finetune.split("│")[1:-1]] == ["finetune", "-", "selection top-1", "-", "-", "-",
                                                                    "-"], finetune
    assert "best trial by selection top-1 (higher is better)" in result.output
    lines = [line.rstrip() for line in result.output.splitlines()]
    # A trial recorded without its run's link shows the run id.
    assert "scratch trial 0: MLflow run run-7" in lines and "finetune: no complete trial" in lines
    assert "  params: learning_rate=0.01235, optimizer=adam" in lines


def test_best_export_without_a_complete_trial_is_one_line(storage, tmp_path):
    result = _invoke(["best", "finetune", "--export", str(tmp_path / "out"), "--storage", storage,
                      "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])
    assert result.exit_code == 1
    assert "error: no study has a complete trial to export; run `tinyopt sweep APPROACH` first" in result.output
    assert not (tmp_path / "out").exists()
