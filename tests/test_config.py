"""Config loading, --set overrides, search spaces: all checked before any training."""

from __future__ import annotations

import optuna
import pytest

from tinyopt.config import APPROACHES, load_config, sweeps_dir
from tinyopt.errors import ConfigError
from tinyopt.space import defaults, searched, suggest, validate_space
from tinyopt.urls import redact


@pytest.mark.parametrize("approach", APPROACHES)
def test_default_and_cpu_configs_load(approach):
    config = load_config(approach)
    assert config["approach"] == approach
    validate_space(config["space"])
    cpu = sweeps_dir() / "cpu" / f"{approach}.toml"
    if cpu.exists():
        assert load_config(approach, cpu)["space"].keys() == config["space"].keys()


def test_set_parses_toml_values_and_keeps_strings():
    config = load_config("finetune", overrides=["model.weights=none", "space.epochs=3", "train.eval_batch_size=64",
                                                "model.alpha=0.25", "space.batch_size=[16, 32]"])
    assert config["model"]["weights"] == "none"
    assert config["space"]["epochs"] == 3
    assert config["model"]["alpha"] == 0.25
    assert config["space"]["batch_size"] == [16, 32]
    path = load_config("finetune", overrides=["model.weights=../shared/data/m.h5"])["model"]["weights"]
    assert path == "../shared/data/m.h5"


@pytest.mark.parametrize("override, fragment", [
    ("model.wieghts=none", "model.wieghts"),
    ("nosuch.key=1", "nosuch"),
    ("model.weights", "key=value"),
])
def test_bad_override_is_a_one_line_error(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config("finetune", overrides=[override])
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_config_file_is_merged_onto_defaults_and_checked(tmp_path):
    good = tmp_path / "good.toml"
    good.write_text('[model]\nbackbone = "mobilenet"\n[space]\nepochs = 2\n')
    config = load_config("finetune", good)
    assert config["model"]["backbone"] == "mobilenet" and config["model"]["weights"] == "imagenet"
    assert config["space"]["epochs"] == 2 and "learning_rate" in config["space"]
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nepohcs = 2\n")
    with pytest.raises(ConfigError, match="train.epohcs"):
        load_config("finetune", bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("finetune", tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[train\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config("finetune", broken)


@pytest.mark.parametrize("entry, fragment", [
    ({"type": "float", "low": 1.0, "high": 0.1}, "greater than high"),
    ({"type": "float", "low": 0.0, "high": 1.0, "log": True}, "log scale needs low > 0"),
    ({"type": "gaussian", "low": 0, "high": 1}, "unknown type"),
    ({"type": "categorical"}, "non-empty list"),
    ({"type": "int", "low": "a", "high": 3}, "numeric"),
    ({"type": "float", "low": 0.1, "high": 1.0, "lgo": True}, "unknown field"),
    ({"type": "categorical", "choices": [1], "when": {"later": 1}}, "earlier entries"),
    ({"low": 1, "high": 2}, "needs a 'type'"),
])
def test_malformed_space_entry_is_named(entry, fragment):
    with pytest.raises(ConfigError) as err:
        validate_space({"x": entry})
    assert "'x'" in str(err.value) and fragment in str(err.value)


SPACE = {
    "optimizer": {"type": "categorical", "choices": ["adam", "sgd"]},
    "momentum": {"type": "float", "low": 0.8, "high": 0.99, "when": {"optimizer": "sgd"}},
    "learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
    "width": {"type": "int", "low": 16, "high": 64, "step": 16},
    "epochs": 3,
}


def test_suggest_follows_types_conditions_and_fixed_values():
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    seen_optimizers = set()
    for _ in range(20):
        trial = study.ask()
        params = suggest(trial, SPACE)
        seen_optimizers.add(params["optimizer"])
        assert ("momentum" in params) == (params["optimizer"] == "sgd")
        assert 1e-4 <= params["learning_rate"] <= 1e-2
        assert params["width"] in (16, 32, 48, 64)
        assert params["epochs"] == 3 and "epochs" not in trial.params
        study.tell(trial, 0.0)
    assert seen_optimizers == {"adam", "sgd"}


def test_defaults_are_valid_and_enqueueable():
    values = defaults(SPACE)
    assert values == {"optimizer": "adam", "learning_rate": pytest.approx(1e-3), "width": 48, "epochs": 3}
    study = optuna.create_study()
    study.enqueue_trial(searched(SPACE, values))
    assert suggest(study.ask(), SPACE) == values


def test_redact_hides_secrets():
    text = redact("postgresql+psycopg://bob:s3cr@t@db:5432/x and http://u:pw@h:5000/?token=abc&x=1")
    assert "s3cr" not in text and "pw@" not in text and "abc" not in text
    assert "bob:***@db:5432/x" in text and "token=***&x=1" in text
