"""What each setting may hold: types of the defaults, names, ranges, "auto", each refusal one line."""

from __future__ import annotations

import pytest

from tinyopt.core import schema
from tinyopt.core.errors import ConfigError


@pytest.mark.parametrize("key, value, like", [
    ("space.epochs", 1, 30),
    ("space.learning_rate", 3, 0.01),  # an integer where a number is expected
    ("space.optimizer", "adamw", "sgd"),
    ("space.momentum", 0.0, 0.9),
    ("space.trainable_stages", 5, 2),
    ("train.eval_batch_size", "auto", "auto"),
    ("train.eval_batch_size", 64, "auto"),
    ("train.activation_cache_gb", 4, "auto"),
    ("train.jit_compile", False, "auto"),
    ("ensemble.studies", ["a", "b"], ["pretrained"]),
    ("model.alpha", 0.25, 1.0),
    ("data.seed", -3, 0),  # a setting of no rule takes any value of its type
])
def test_check_accepts(key, value, like):
    schema.check(key, value, like)


@pytest.mark.parametrize("key, value, like, message", [
    ("space.epochs", 0, 30, "space.epochs: got 0; expected an integer >= 1"),
    ("space.epochs", "3", 30, "space.epochs: got '3' (a string); expected an integer >= 1"),
    ("space.epochs", 2.5, 30, "space.epochs: got 2.5 (a number); expected an integer >= 1"),
    ("space.learning_rate", True, 0.01, "space.learning_rate: got True (a boolean); expected a number > 0"),
    ("space.learning_rate", 0, 0.01, "space.learning_rate: got 0; expected a number > 0"),
    ("space.momentum", 1.0, 0.9, "space.momentum: got 1.0; expected a number in [0, 1)"),
    ("space.optimizer", "adamm", "sgd", "space.optimizer: got 'adamm'; expected one of sgd, adam, adamw, rmsprop"),
    ("train.eval_batch_size", 0, "auto", 'train.eval_batch_size: got 0; expected "auto" or an integer >= 1'),
    ("train.jit_compile", "yes", "auto", 'train.jit_compile: got \'yes\'; expected "auto" or a boolean'),
    ("train.activation_cache_gb", True, "auto",
     'train.activation_cache_gb: got True; expected "auto" or a number >= 0'),
    ("ensemble.studies", [], ["pretrained"],
     "ensemble.studies: got []; expected a non-empty list, each a string"),
])
def test_check_refuses_with_one_line(key, value, like, message):
    with pytest.raises(ConfigError) as err:
        schema.check(key, value, like)
    assert str(err.value) == message


def test_where_names_the_part_and_searchable_says_a_distribution_may_do():
    with pytest.raises(ConfigError) as err:
        schema.check("space.epochs", 0, 30, where="space.epochs.low", searchable=True)
    assert str(err.value) == ("space.epochs.low: got 0; expected an integer >= 1, or a search distribution of them")


@pytest.mark.parametrize("rule, inside, outside", [
    (schema.Range(0, 1, open_high=True), [0, 0.5, 0.999], [-0.1, 1, 1.5]),
    (schema.Range(0, open_low=True), [1e-9, 1e9], [0, -1]),
    (schema.Range(1, 6), [1, 6], [0, 7]),
])
def test_range_bounds(rule, inside, outside):
    assert all(value in rule for value in inside)
    assert not any(value in rule for value in outside)


def test_range_and_auto_read_as_the_message_says():
    assert str(schema.Range(0, 1, open_high=True)) == "in [0, 1)"
    assert str(schema.Range(0, open_low=True)) == "> 0"
    assert str(schema.AutoOr(int, schema.Range(1))) == '"auto" or an integer >= 1'


def test_same_type():
    assert schema.same_type(3, 0.5) and schema.same_type(0.5, 0.5)
    assert not schema.same_type(True, 1) and not schema.same_type(1, True) and schema.same_type(False, True)
    assert schema.same_type(["a"], ["b"]) and not schema.same_type([], ["b"]) and not schema.same_type(["a", 1], ["b"])


def test_every_ruled_key_names_a_known_section():
    assert {key.split(".")[0] for key in schema.RULES} == {"data", "model", "train", "study", "ensemble", "space"}
    assert schema.BACKBONES == ("resnet50", "mobilenet")
