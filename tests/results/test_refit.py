"""`tinyopt best --refit`: the best trial retrained on train + selection, logged under its study, exported."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import optuna
import pytest
from click.testing import CliRunner
from mlflow import MlflowClient
from sweep_helpers import SMALL

from tinyopt.cli import cli
from tinyopt.core import record
from tinyopt.core.config import load_config
from tinyopt.data import cache as data
from tinyopt.results import refit
from tinyopt.sweep import runner
from tinyopt.track import names as run_names


def _stores(root):
    return {"storage": f"sqlite:///{root}/studies/tinyopt.db", "tracking_uri": f"sqlite:///{root}/mlruns/mlflow.db"}


def _best(*args, stores, cwd):
    """A real ``tinyopt best`` process, as a person runs it."""
    return subprocess.run([sys.executable, "-m", "tinyopt", "best", *map(str, args), "--storage", stores["storage"],
                           "--tracking-uri", stores["tracking_uri"]],
                          cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def refitted(tiny_folder, tmp_path_factory):
    """A 2-trial scratch sweep of 2 epochs, then `tinyopt best --refit --export out` on the prepared cache."""
    root = tmp_path_factory.mktemp("refit")
    stores, cache = _stores(root), root / "cache"
    runner.run_sweep("scratch", trials=2, source=str(tiny_folder), cache_dir=str(cache), overrides=SMALL["scratch"],
                     progress=False, **stores)
    # Without --data, as after a sweep: the prepared cache is used as it is.
    done = _best("scratch", "--refit", "--export", "out", "--cache", cache, stores=stores, cwd=root)
    assert done.returncode == 0, done.stdout + done.stderr
    study = optuna.load_study(study_name="scratch", storage=stores["storage"])
    return {"done": done, "stores": stores, "cache": cache, "bundle": root / "out", "study": study,
            "trial": study.best_trial}


def _refit_runs(stores, study):
    client = MlflowClient(stores["tracking_uri"])
    experiment = client.get_experiment_by_name(run_names.experiment_name(study))
    return client, client.search_runs([experiment.experiment_id], f"tags.`{record.TAG_REFIT_OF}` != ''")


@pytest.mark.backend
def test_refit_is_a_run_of_the_study_trained_on_train_and_selection(refitted):
    stores, trial, study = refitted["stores"], refitted["trial"], refitted["study"]
    client, runs = _refit_runs(stores, "scratch")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags[record.TAG_REFIT_OF] == str(trial.number)
    assert run.data.tags[record.TAG_REFIT_OF_RUN] == trial.user_attrs[record.RUN_ID]
    assert run.data.tags["mlflow.parentRunId"] == study.user_attrs[record.PARENT_RUN_ID]
    assert run.info.run_name.startswith(f"refit of t{trial.number}")
    # The epochs early stopping kept for the trial, one point each, counted from 1; no selection to score.
    epochs = trial.user_attrs[record.BEST_EPOCH]
    for key in (record.TRAIN_LOSS, record.TRAIN_TOP1, record.LR, record.IMAGES_PER_SECOND):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == list(range(1, epochs + 1)), key
    assert not {record.SELECTION_TOP1, record.final("selection_top1")} & set(run.data.metrics)
    sizes = [len(data.load_split(split, refitted["cache"])[1]) for split in ("train", "selection")]
    assert run.data.params[record.TRAIN_IMAGES] == str(sum(sizes))
    assert run.data.params[record.REFIT_EPOCHS] == str(epochs)
    for name, value in trial.params.items():
        assert run.data.params[name] == run_names.param_text(value)  # 4 significant digits, as the trials
    assert run.data.params[record.CONFIG_HASH] == run_names.config_hash(study.user_attrs[record.CONFIG])
    # Its model is kept as the trials keep theirs.
    assert run.data.tags[record.TAG_MODEL_KEPT] == "true" and len(run.outputs.model_outputs) == 1
    # The terminal shows its test scores beside the trial's, and its run.
    output = refitted["done"].stdout
    for key in ("test_top1", "test_top5"):
        assert f"{run.data.metrics[record.final(key)]:.4f}" in output
        assert f"{trial.user_attrs[key]:.4f}" in output
    assert "train + selection" in output and run.info.run_id in output


@pytest.mark.backend
def test_refit_bundle_loads_and_predicts(refitted):
    import keras

    bundle, trial = refitted["bundle"], refitted["trial"]
    metrics = json.loads((bundle / "metrics.json").read_text())
    _, runs = _refit_runs(refitted["stores"], "scratch")
    assert metrics["test_top1"] == pytest.approx(runs[0].data.metrics[record.final("test_top1")], abs=5e-5)
    x, y = data.load_split("test", refitted["cache"])
    probs = keras.models.load_model(bundle / "model.keras").predict(np.asarray(x), verbose=0)
    assert probs.shape == (len(y), 5)
    assert np.mean(probs.argmax(1) == y) == pytest.approx(metrics["test_top1"], abs=1e-6)
    params = json.loads((bundle / "params.json").read_text())
    assert params == {**trial.user_attrs[record.PARAMS], record.REFIT_EPOCHS: trial.user_attrs[record.BEST_EPOCH],
                      record.TRAIN_IMAGES: int(runs[0].data.params[record.TRAIN_IMAGES])}
    readme = (bundle / "MODEL.md").read_text()
    assert "train and selection splits together" in readme and f"trial {trial.number}" in readme
    assert f"for {trial.user_attrs[record.BEST_EPOCH]} epoch" in readme


def _fake_study(stores, approach):
    """A study of one complete trial, as a sweep of ``approach`` records it (nothing to train on needed)."""
    study = optuna.create_study(study_name=approach, storage=stores["storage"], direction="maximize")
    study.set_user_attr(record.APPROACH, approach)
    study.set_user_attr(record.CONFIG, load_config(approach).as_dict())
    scores = {key: 0.5 for key in record.SCORES}
    attrs = {record.PARAMS: {"resize": "bilinear"}, record.RUN_ID: "0" * 32, **scores}
    if approach == "ensemble":
        member = {"label": "scratch-0", "study": "scratch", "trial_number": 0, "run_id": "1" * 32, "model_kept": True,
                  "weight": 1.0, "temperature": 1.0, **scores}
        attrs |= {record.MEMBERS: [member], record.UNIFORM: scores}
    study.add_trial(optuna.trial.create_trial(
        params={"resize": "bilinear"}, distributions={"resize": optuna.distributions.CategoricalDistribution(
            ["bilinear", "area"])}, value=0.5, user_attrs=attrs))


@pytest.mark.parametrize("approach, problem", [("pretrained", "pretrained trains nothing"),
                                               ("ensemble", "is an ensemble")])
def test_refit_of_a_study_that_trains_nothing_fails_and_writes_nothing(approach, problem, tmp_path):
    stores = _stores(tmp_path)
    (tmp_path / "studies").mkdir()
    _fake_study(stores, approach)
    done = _best(approach, "--refit", "--export", "out", stores=stores, cwd=tmp_path)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and problem in lines[0], done.stderr
    assert "--refit applies to finetune and scratch studies" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["studies"]  # no bundle, no MLflow store


def test_best_epoch_falls_back_for_older_trials():
    def trial(attrs, reported):
        return optuna.trial.create_trial(value=0.5, user_attrs=attrs, intermediate_values=reported)

    assert refit.best_epoch(trial({record.BEST_EPOCH: 3}, {1: 0.2, 2: 0.9})) == 3
    # Early stopping keeps the first epoch of the best selection top-1.
    assert refit.best_epoch(trial({}, {1: 0.2, 2: 0.6, 3: 0.6, 4: 0.5})) == 2
    assert refit.best_epoch(trial({record.PARAMS: {"epochs": 7}}, {})) == 7


def test_data_options_belong_to_refit(tmp_path):
    result = CliRunner().invoke(cli, ["best", "--cache", str(tmp_path)])
    assert result.exit_code == 2 and "are for --refit" in result.output
