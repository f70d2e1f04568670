"""The typed config: one frozen section per TOML table, None where an approach has no such setting."""

from __future__ import annotations

import dataclasses
import json

import pytest

from tinyopt.core.config import APPROACHES, Config, DataConfig, ModelConfig, load_config


@pytest.mark.parametrize("approach", APPROACHES)
def test_from_dict_of_as_dict_is_the_same_config(approach):
    config = load_config(approach)
    resolved = config.as_dict()
    again = Config.from_dict(resolved)
    assert again == config and again.as_dict() == resolved
    assert json.loads(json.dumps(resolved)) == resolved  # what a study stores and MLflow logs as config.json


def test_as_dict_is_a_copy():
    config = load_config("scratch")
    config.as_dict()["space"]["epochs"] = 1
    config.as_dict()["data"]["seed"] = 7
    assert config.space["epochs"] == 30 and config.as_dict()["data"]["seed"] == 0


def test_sections_and_the_space_are_read_only():
    config = load_config("finetune")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.model.weights = "none"
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.study = None
    with pytest.raises(TypeError):
        config.space["epochs"] = 1


def test_an_approach_lacks_the_settings_its_toml_lacks():
    scratch, ensemble, finetune = load_config("scratch"), load_config("ensemble"), load_config("finetune")
    assert scratch.model == ModelConfig(weights="none", backbone=None, alpha=None, weights_resolution=None)
    assert scratch.ensemble is None and scratch.train.activation_cache is None
    assert (ensemble.data, ensemble.model, ensemble.train) == (None, None, None)
    assert ensemble.study.keep_models is None and ensemble.study.run_name is None
    assert ensemble.ensemble.studies == ("pretrained", "finetune", "scratch")  # a TOML list becomes a tuple
    assert finetune.model.backbone == "resnet50" and finetune.train.activation_cache is True


def test_a_stored_dict_without_a_section_reads_as_none():
    resolved = load_config("scratch").as_dict()
    del resolved["train"], resolved["space"]
    config = Config.from_dict(resolved)
    assert config.train is None and dict(config.space) == {} and config.data == load_config("scratch").data


def test_per_class_is_the_cap_of_each_split():
    data = DataConfig(train_per_class=50, selection_per_class=10, test_per_class=0, seed=0)
    assert [data.per_class(split) for split in ("train", "selection", "test")] == [50, 10, 0]
    with pytest.raises(KeyError):
        data.per_class("val")


@pytest.mark.parametrize("weights, pretrained", [("imagenet", True), ("none", False), ("None", False),
                                                 ("NONE", False), ("weights/mobilenet.h5", True)])
def test_pretrained_unless_the_weights_are_none(weights, pretrained):
    model = ModelConfig(weights=weights, backbone="mobilenet", alpha=0.25, weights_resolution=128)
    assert model.pretrained is pretrained
