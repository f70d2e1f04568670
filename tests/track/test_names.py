"""What MLflow shows of a sweep, named: run names, short values, identifying params, experiments, links."""

from __future__ import annotations

import dataclasses

import pytest

from tinyopt.core import record
from tinyopt.core.config import load_config
from tinyopt.track import names as run_names


@pytest.mark.parametrize(("headline", "name"), [
    ({"stages": 2, "optimizer": "adamw", "learning_rate": 3e-4, "resize": "bicubic", "input_size": 160},
     "t12 stages=2 adamw lr=3e-4 bicubic px=160"),
    ({"dropout": 0.25, "batch_norm": True, "weight_decay": 1.5e-5}, "t12 dropout=0.25 batch_norm=True wd=1.5e-5"),
    ({"learning_rate": 0.0123456, "momentum": 0.9}, "t12 lr=0.0123 momentum=0.9"),
    ({"optimizer": "sgd", "augment": "none"}, "t12 sgd augment=none"),
    ({}, "t12"),
])
def test_a_trial_run_is_named_after_its_telling_params(headline, name):
    assert run_names.run_name(12, headline) == name


@pytest.mark.parametrize("value, shown", [(3e-4, "3e-4"), (1.5e-5, "1.5e-5"), (0.25, "0.25"), (0.0123456, "0.0123"),
                                          (12345.0, "1.2e4"), (0.0, "0"), (-0.001, "-1e-3"), (160, "160"),
                                          (True, "True"), ("adamw", "adamw")])
def test_short_value(value, shown):
    assert run_names.short_value(value) == shown


def test_safe_name_keeps_only_what_mlflow_accepts():
    assert run_names.safe_name("my study#2 (v1)/x") == "my_study_2__v1__x"
    assert run_names.safe_name("weight_finetune-12.a") == "weight_finetune-12.a"


def test_identity_names_approach_backbone_weights_data_and_config_hash():
    finetune = load_config("finetune", overrides=["model.backbone=mobilenet", "model.alpha=0.25",
                                                  "data.train_per_class=50"])
    found = run_names.identity(finetune)
    assert found == {"approach": "finetune", "backbone": "mobilenet alpha=0.25", "weights": "imagenet",
                     "data": "per class train=50 selection=all test=all",
                     record.CONFIG_HASH: run_names.config_hash(finetune.as_dict())}
    model = dataclasses.replace(finetune.model, weights="/data/deep/mobilenet.h5")
    assert run_names.identity(dataclasses.replace(finetune, model=model))["weights"] == "mobilenet.h5"
    assert run_names.identity(load_config("finetune"))["backbone"] == "resnet50"  # no alpha to tell
    scratch = run_names.identity(load_config("scratch"))
    assert list(scratch) == ["approach", "weights", "data", record.CONFIG_HASH]
    ensemble = run_names.identity(load_config("ensemble"))
    assert list(ensemble) == ["approach", "members_of", record.CONFIG_HASH]
    assert ensemble["members_of"] == "pretrained,finetune,scratch"


def test_config_hash_is_stable_and_tells_configs_apart():
    config = load_config("scratch").as_dict()
    digest = run_names.config_hash(config)
    assert len(digest) == 12 and digest == run_names.config_hash(load_config("scratch").as_dict())
    assert run_names.config_hash(dict(reversed(list(config.items())))) == digest  # key order does not matter
    assert run_names.config_hash(load_config("scratch", overrides=["space.epochs=3"]).as_dict()) != digest


def test_markdown_table_lists_every_param():
    assert run_names.markdown_table({"learning_rate": 3e-4, "optimizer": "sgd"}) == [
        "| param | value |", "| --- | --- |", "| learning_rate | 3e-4 |", "| optimizer | sgd |"]


def test_experiment_names_and_run_links_open_the_model_training_layout():
    assert run_names.experiment_name("scratch") == "tinyopt/scratch"
    assert run_names.run_path("3", "abc") == "#/experiments/3/runs/abc?workflowType=machine_learning"


def test_params_read_at_four_significant_digits():
    assert run_names.param_text(0.00020074099001954847) == "0.0002007"
    assert run_names.param_text(0.5) == "0.5" and run_names.param_text(160) == "160"
    assert run_names.param_text(True) == "True" and run_names.param_text("adamw") == "adamw"


def test_kept_models_are_named_after_their_trial_in_names_mlflow_accepts():
    assert run_names.model_name("finetune", 12) == "finetune-trial-12"
    assert run_names.model_name("ft.v2/a", 3, refit=True) == "ft_v2_a-refit-of-3"


def test_no_trial_run_wears_the_best_trials_colour():
    colours = [run_names.run_colour(number) for number in range(100)]
    assert run_names.BEST_COLOUR not in colours
    assert len(set(colours[:16])) == 16  # neighbours never share one


def test_ui_command_opens_an_embedded_store_and_names_a_server_without_its_secret():
    assert run_names.ui_command("sqlite:///mlruns/mlflow.db") == "tinyopt ui --tracking-uri sqlite:///mlruns/mlflow.db"
    assert run_names.ui_command("https://bob:hunter2@mlflow.example.com") == \
        "open https://bob:***@mlflow.example.com in a browser"
