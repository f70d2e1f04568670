"""Config loading: the defaults, presets, config files and --set overrides, all checked before any training."""

from __future__ import annotations

import pytest

from tinyopt.core.config import APPROACHES, load_config, sweeps_dir
from tinyopt.core.errors import ConfigError
from tinyopt.core.space import validate_space


@pytest.mark.parametrize("approach", APPROACHES)
def test_default_and_cpu_configs_load(approach):
    config = load_config(approach)
    assert config.approach == approach
    validate_space(config.space)
    cpu = sweeps_dir() / "cpu" / f"{approach}.toml"
    if cpu.exists():
        assert load_config(approach, cpu).space.keys() == config.space.keys()


def test_set_parses_toml_values_and_keeps_strings(tmp_path, monkeypatch):
    config = load_config("finetune", overrides=["model.weights=none", "space.epochs=3", "train.eval_batch_size=64",
                                                "model.alpha=0.25"])
    assert config.model.weights == "none"
    assert config.space["epochs"] == 3
    assert config.model.alpha == 0.25
    assert load_config("ensemble", overrides=['ensemble.studies=["a", "b"]']).ensemble.studies == ("a", "b")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "m.h5").touch()
    (tmp_path / "run").mkdir()
    monkeypatch.chdir(tmp_path / "run")  # a weights path is relative to the working directory
    path = load_config("finetune", overrides=["model.weights=../data/m.h5"]).model.weights
    assert path == "../data/m.h5"


def test_valid_overrides_of_every_kind(tmp_path):
    weights = tmp_path / "mobilenet.weights.h5"
    weights.touch()
    config = load_config("finetune", overrides=[
        'space.learning_rate={ type = "categorical", choices = [0.1, 0.01] }',
        'space.epochs={ type = "int", low = 2, high = 5 }',
        "space.dropout=0",  # an integer where a float is expected
        "space.head_width=256",
        'space.optimizer={ type = "categorical", choices = ["sgd", "adamw"], default = "adamw" }',
        f"model.weights={weights}", "model.backbone=mobilenet", "model.alpha=0.3", "model.weights_resolution=100",
    ])
    assert config.space["learning_rate"]["choices"] == [0.1, 0.01]
    assert config.space["epochs"] == {"type": "int", "low": 2, "high": 5}
    assert config.model.weights == str(weights)
    imagenet = ["model.backbone=mobilenet", "model.alpha=0.5", "model.weights_resolution=160"]
    assert load_config("pretrained", overrides=[*imagenet, "space.flip_tta=true"]).model.alpha == 0.5
    # ResNet50 has one set of ImageNet weights and ignores alpha and weights_resolution.
    assert load_config("pretrained", overrides=["model.alpha=0.3", "model.weights_resolution=100"])
    assert load_config("scratch", overrides=["space.stages=6", "model.weights=none"]).space["stages"] == 6
    both = load_config("scratch", overrides=['study.objectives=["selection_top1", "latency_ms"]'])
    assert both.study.objectives == ("selection_top1", "latency_ms")
    assert load_config("pretrained").study.objectives == ("selection_top1",)


_MOBILENET = ("model.backbone=mobilenet",)


@pytest.mark.parametrize("approach, overrides, key, received", [
    # types
    ("finetune", ["space.epochs=abc"], "space.epochs", "'abc'"),
    ("finetune", ["data.train_per_class=abc"], "data.train_per_class", "'abc'"),
    ("finetune", ["space.learning_rate=abc"], "space.learning_rate", "'abc'"),
    ("finetune", ["train.eval_batch_size=true"], "train.eval_batch_size", "True"),
    ("finetune", ["model.alpha='big'"], "model.alpha", "'big'"),
    ("pretrained", ["space.flip_tta=1"], "space.flip_tta", "1"),
    ("finetune", ["space.batch_size=[16, 32]"], "space.batch_size", "[16, 32]"),
    ("ensemble", ["ensemble.studies=[]"], "ensemble.studies", "[]"),
    ("ensemble", ['ensemble.studies=["a", 2]'], "ensemble.studies", "['a', 2]"),
    ("finetune", ["model=3"], "model", "3"),
    ("finetune", ['space.epochs={ type = "float", low = 1, high = 3 }'], "space.epochs.type", "'float'"),
    ("finetune", ['space.head_width={ type = "categorical", choices = [0, 0.5] }'], "space.head_width.choices", "0.5"),
    # known names, fixed and inside a distribution
    ("finetune", ["space.optimizer=adamm"], "space.optimizer", "'adamm'"),
    ("finetune", ["space.decay=cosin"], "space.decay", "'cosin'"),
    ("scratch", ["space.initializer=foo"], "space.initializer", "'foo'"),
    ("scratch", ["space.augment=mixup"], "space.augment", "'mixup'"),
    ("finetune", ["space.resize=nearest"], "space.resize", "'nearest'"),
    ("finetune", ["space.head_init=zeros"], "space.head_init", "'zeros'"),
    ("finetune", ["model.backbone=vgg16"], "model.backbone", "'vgg16'"),
    ("finetune", ["study.sampler=grid"], "study.sampler", "'grid'"),
    ("scratch", ["study.pruner=asha"], "study.pruner", "'asha'"),
    ("finetune", ["train.mixed_precision=yes"], "train.mixed_precision", "'yes'"),
    ("scratch", ["train.checkpoint=always"], "train.checkpoint", "'always'"),
    ("scratch", ["train.checkpoint_dir=3"], "train.checkpoint_dir", "3"),
    ("pretrained", ["study.requeue=sigint"], "study.requeue", "'sigint'"),
    ("ensemble", ["ensemble.objective=accuracy"], "ensemble.objective", "'accuracy'"),
    ("finetune", ['study.objectives=["selection_top1", "latency"]'], "study.objectives",
     "['selection_top1', 'latency']"),
    ("scratch", ["study.objectives=[]"], "study.objectives", "[]"),
    # what ranks the trials comes first, each objective once
    ("pretrained", ['study.objectives=["latency_ms"]'], "study.objectives", "['latency_ms']"),
    ("finetune", ['study.objectives=["selection_top1", "selection_top1"]'], "study.objectives",
     "['selection_top1', 'selection_top1']"),
    ("finetune", ['space.optimizer={ type = "categorical", choices = ["sgd", "adamm"] }'], "space.optimizer.choices",
     "'adamm'"),
    ("scratch", ['space.momentum={ type = "float", low = 0.5, high = 0.9, when = { optimizer = "sdg" } }'],
     "space.momentum.when.optimizer", "'sdg'"),
    # ranges, of fixed values and of distributions
    ("finetune", ["space.epochs=0"], "space.epochs", "0"),
    ("finetune", ["space.learning_rate=0"], "space.learning_rate", "0"),
    ("finetune", ["space.momentum=1.0"], "space.momentum", "1.0"),
    ("scratch", ["space.dropout=-0.1"], "space.dropout", "-0.1"),
    ("finetune", ["space.label_smoothing=1"], "space.label_smoothing", "1"),
    ("finetune", ["space.trainable_stages=6"], "space.trainable_stages", "6"),
    ("scratch", ["space.stages=7"], "space.stages", "7"),
    ("pretrained", ["space.input_size=16"], "space.input_size", "16"),
    ("finetune", ['space.epochs={ type = "int", low = 0, high = 3 }'], "space.epochs.low", "0"),
    ("finetune", ['space.learning_rate={ type = "float", low = -1.0, high = 0.1 }'], "space.learning_rate.low",
     "-1.0"),
    ("scratch", ['space.batch_size={ type = "categorical", choices = [32, 0] }'], "space.batch_size.choices", "0"),
    ("finetune", ["data.test_per_class=-1"], "data.test_per_class", "-1"),
    ("finetune", ["train.early_stopping_patience=-1"], "train.early_stopping_patience", "-1"),
    ("finetune", [*_MOBILENET, "model.weights=none", "model.alpha=0"], "model.alpha", "0"),
    ("finetune", ["study.heartbeat_interval=0"], "study.heartbeat_interval", "0"),
    ("scratch", ["study.pruner_reduction_factor=1"], "study.pruner_reduction_factor", "1"),
    ("ensemble", ["ensemble.top_k=0"], "ensemble.top_k", "0"),
    # files and rules across settings
    ("finetune", ["model.weights=missing/weights.h5"], "model.weights", "'missing/weights.h5'"),
    ("finetune", ["model.weights=tests"], "model.weights", "'tests'"),  # a folder is not a weights file
    ("scratch", ["model.weights=imagenet"], "model.weights", "'imagenet'"),
    ("finetune", [*_MOBILENET, "model.alpha=0.3"], "model.alpha", "0.3"),
    ("pretrained", [*_MOBILENET, "model.weights_resolution=100"], "model.weights_resolution", "100"),
])
def test_bad_value_is_a_one_line_error_naming_key_and_value(approach, overrides, key, received):
    with pytest.raises(ConfigError) as err:
        load_config(approach, overrides=overrides)
    message = str(err.value)
    assert f"{key}: got {received}" in message and "expected" in message and "\n" not in message, message


def test_config_file_values_are_checked_like_overrides(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[space]\noptimizer = { type = "categorical", choices = ["sgd", "adamm"] }\n')
    with pytest.raises(ConfigError, match="space.optimizer.choices: got 'adamm'"):
        load_config("finetune", bad)


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
    assert config.model.backbone == "mobilenet" and config.model.weights == "imagenet"
    assert config.space["epochs"] == 2 and "learning_rate" in config.space
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


def test_preset_is_merged_onto_the_defaults_before_the_config_file_and_the_overrides(tmp_path):
    default, cpu = load_config("scratch"), load_config("scratch", preset="cpu")
    assert default.train.early_stopping_patience == 5 and cpu.train.early_stopping_patience == 3
    assert cpu == load_config("scratch", sweeps_dir() / "cpu" / "scratch.toml")
    mine = tmp_path / "mine.toml"
    mine.write_text('[train]\nmixed_precision = "off"\n[space]\nstages = 3\n')
    config = load_config("scratch", mine, ["space.stages=2"], preset="cpu")
    assert config.train.mixed_precision == "off"  # the file over the preset
    assert config.space["stages"] == 2  # --set over the file
    assert config.space["epochs"] == cpu.space["epochs"] != default.space["epochs"]  # the preset's


def test_unknown_preset_is_a_one_line_error_naming_the_presets():
    from tinyopt.core.config import presets

    assert "cpu" in presets() and "cpu" in presets("scratch") and "cpu" not in presets("ensemble")
    for approach, preset, fragment in (("scratch", "nosuch", "unknown preset 'nosuch'; presets: "),
                                       ("ensemble", "cpu", "preset 'cpu' has no ensemble config")):
        with pytest.raises(ConfigError) as err:
            load_config(approach, preset=preset)
        assert fragment in str(err.value) and "cpu" in str(err.value) and "\n" not in str(err.value)


def test_defaults_and_presets_come_from_the_package_not_the_working_directory(tmp_path, monkeypatch):
    expected = load_config("scratch"), load_config("scratch", preset="cpu")
    for name in ("scratch.toml", "cpu/scratch.toml", "mine/scratch.toml"):
        (tmp_path / "sweeps" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "sweeps" / name).write_text("[space]\nstages = 6\n")
    monkeypatch.chdir(tmp_path)
    assert sweeps_dir() != tmp_path / "sweeps"
    assert (load_config("scratch"), load_config("scratch", preset="cpu")) == expected
    with pytest.raises(ConfigError, match="unknown preset 'mine'"):
        load_config("scratch", preset="mine")
