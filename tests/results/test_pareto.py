"""Accuracy against latency: a two-objective sweep, its Pareto front in `best`, and any trial exported by number.

One real `tinyopt sweep` process sweeps the generated fixture with ``study.objectives`` of two names (a
few seconds a trial); `best` then reads its study in this process. The refusals run on studies made
directly, stopping before any model is read.
"""

from __future__ import annotations

import json

import keras
import numpy as np
import optuna
import pytest
from click.testing import CliRunner
from fault_helpers import tinyopt
from sweep_helpers import SMALL, artifacts, runs_of

from tinyopt.cli import cli
from tinyopt.core import record
from tinyopt.core.summary import BestTrial, StudySummary
from tinyopt.data import build
from tinyopt.data import cache as data
from tinyopt.results import pareto
from tinyopt.track import store as mlflow_store

BOTH = 'study.objectives=["selection_top1", "latency_ms"]'
# Widths far apart, so that the front trades accuracy for latency rather than for noise.
WIDTHS = 'space.width={ type = "categorical", choices = [4, 32] }'


@pytest.fixture(scope="module")
def swept(tiny_folder, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("pareto")
    stores = {"storage": f"sqlite:///{root / 'studies.db'}", "tracking_uri": f"sqlite:///{root / 'mlflow.db'}"}
    overrides = [item for setting in (*SMALL["scratch"], WIDTHS, BOTH) for item in ("--set", setting)]
    done = tinyopt("sweep", "scratch", "--trials", 2, "--data", tiny_folder, "--cache", root / "cache",
                   "--storage", stores["storage"], "--tracking-uri", stores["tracking_uri"], *overrides, cwd=root)
    assert done.returncode == 0, done.stdout + done.stderr
    study = optuna.load_study(study_name="scratch", storage=stores["storage"])
    return {**stores, "root": root, "output": done.stdout, "study": study, "data": tiny_folder}


def _options(stores) -> list[str]:
    return ["--storage", stores["storage"], "--tracking-uri", stores["tracking_uri"]]


def _invoke(args):
    return CliRunner().invoke(cli, [str(arg) for arg in args], env={"COLUMNS": "200"})


def _front_rows(output: str) -> dict[int, list[str]]:
    """The rows of the Pareto front table `best` printed, by trial number."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if "Pareto front of selection top-1 against latency ms" in line)
    cells = [[cell.strip() for cell in line.split("│")[1:-1]] for line in lines[start:] if line.strip().startswith("│")]
    return {int(row[0]): row[1:] for row in cells}


def test_best_shows_the_front_optuna_found_and_the_sweep_said_pruning_is_off(swept):
    study = swept["study"]
    assert study.metric_names == [record.SELECTION_TOP1, record.LATENCY_MS]  # named in optuna-dashboard
    assert swept["output"].count("note: pruning is off: Optuna cannot prune a study of 2 objectives") == 1
    result = _invoke(["best", *_options(swept)])
    assert result.exit_code == 0, result.output
    rows = _front_rows(result.output)
    front = {t.number: t for t in study.best_trials}
    assert set(rows) == set(front) and front
    for number, trial in front.items():
        assert rows[number][:2] == [f"{trial.values[0]:.4f}", f"{trial.values[1]:.3g}"]
        assert rows[number][2] == f"{int(trial.user_attrs[record.MODEL_PARAMS]):,}" != "0"
        assert trial.user_attrs[record.MODEL_KEPT]  # a trial of the front keeps its model
    client, [parent], children = runs_of(swept, "scratch")
    assert record.PARETO in artifacts(client, parent.info.run_id)
    assert "**Pareto front**" in parent.data.tags[record.TAG_DESCRIPTION]
    for trial in study.trials:
        assert children[trial.number].data.metrics[record.LATENCY_MS] > 0


def test_best_exports_a_trial_that_is_not_the_best_by_number_as_a_bundle_that_predicts(swept, tmp_path):
    study = swept["study"]
    best = max(study.best_trials, key=lambda t: (t.values[0], -t.values[1]))
    trial = next(t for t in study.trials if t.number != best.number)
    result = _invoke(["best", "scratch", "--trial", trial.number, "--export", tmp_path / "bundle", *_options(swept)])
    assert result.exit_code == 0, result.output
    assert f"exported scratch trial {trial.number} to" in result.output
    model = keras.models.load_model(tmp_path / "bundle" / "model.keras")
    x_selection, _ = data.load_split("selection", build.prepare(swept["data"], swept["root"] / "cache", progress=False))
    recorded = mlflow_store.load_predictions(trial.user_attrs[record.RUN_ID], swept["tracking_uri"])["selection_probs"]
    np.testing.assert_allclose(model.predict(np.asarray(x_selection), verbose=0), recorded, atol=1e-5)
    assert json.loads((tmp_path / "bundle" / "params.json").read_text()) == trial.user_attrs[record.PARAMS]
    readme = (tmp_path / "bundle" / "MODEL.md").read_text()
    assert f"Trial {trial.number}, picked by number (`tinyopt best scratch --trial {trial.number}`)" in readme


@pytest.fixture
def made(tmp_path) -> str:
    """A two-objective study made directly: trial 0 complete without its model, trial 1 failed."""
    storage = f"sqlite:///{tmp_path / 'made.db'}"
    study = optuna.create_study(study_name="fast", storage=storage, directions=["maximize", "minimize"])
    study.add_trial(optuna.trial.create_trial(values=[0.5, 3.0], user_attrs={record.RUN_ID: "r0",
                                                                            record.MODEL_KEPT: False}))
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL))
    return storage


@pytest.mark.parametrize("number, fragment", [
    (7, "study 'fast' has no trial 7 (its trials are 0 to 1); `tinyopt best fast` shows its best"),
    (1, "trial 1 of study 'fast' is failed, not complete: it has no scores or model; pick a complete trial"),
    (0, "trial 0 of study 'fast' did not keep its model (MLflow run r0): only a trial among its study's best "
        "study.keep_models (or on its Pareto front) when it finished keeps one; retrain it with "
        "`tinyopt best fast --trial 0 --refit --export DIR` (finetune, scratch)"),
])
def test_a_trial_that_cannot_be_exported_is_one_line_and_writes_nothing(made, tmp_path, number, fragment):
    result = _invoke(["best", "fast", "--trial", number, "--export", tmp_path / "out", "--storage", made,
                      "--tracking-uri", f"sqlite:///{tmp_path / 'none.db'}"])
    assert result.exit_code == 1
    assert fragment in result.output.splitlines()[-1]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args", [["--trial", 0, "--export", "out"], ["fast", "--trial", 0],
                                  ["fast", "other", "--trial", 0, "--export", "out"]])
def test_trial_needs_one_study_and_export_or_refit(made, tmp_path, args):
    result = _invoke(["best", *args, "--storage", made])
    assert result.exit_code == 2
    assert "--trial N needs one STUDY and --export DIR (or --refit)" in result.output


def test_rows_show_each_point_of_the_front_as_a_person_reads_it():
    point = BestTrial(number=4, value=0.61234, scores={record.SELECTION_TOP1: 0.61234, record.TEST_TOP1: 0.5},
                      params={}, run_id=None, model_kept=True,
                      costs={record.LATENCY_MS: 3.14159, record.MODEL_PARAMS: 1234567.0})
    summary = StudySummary(name="s", approach="scratch", counts={}, compute_seconds=0, best=point, front=[point])
    assert pareto.HEADER == ("trial", "selection top-1", "latency ms", "model params", "test top-1")
    assert pareto.rows(summary) == [["4", "0.6123", "3.14", "1,234,567", "0.5000"]]
