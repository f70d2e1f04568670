"""Search spaces as data: malformed entries named, suggestions that follow types and conditions, defaults."""

from __future__ import annotations

import optuna
import pytest

from tinyopt.core.errors import ConfigError
from tinyopt.core.space import defaults, distribution, fitting, in_every_trial, searched, suggest, validate_space


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


def test_in_every_trial_names_the_searched_entries_no_condition_can_leave_out():
    assert in_every_trial(SPACE) == ["optimizer", "learning_rate", "width"]
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    for _ in range(10):
        assert set(in_every_trial(SPACE)) <= set(suggest(study.ask(), SPACE))


def test_defaults_are_valid_and_enqueueable():
    values = defaults(SPACE)
    assert values == {"optimizer": "adam", "learning_rate": pytest.approx(1e-3), "width": 48, "epochs": 3}
    study = optuna.create_study()
    study.enqueue_trial(searched(SPACE, values))
    assert suggest(study.ask(), SPACE) == values


def test_fitting_keeps_what_the_space_could_draw_and_says_why_it_drops_the_rest():
    earlier = {"optimizer": "sgd", "momentum": 0.9, "learning_rate": 0.05, "width": 40, "epochs": 3, "depth": 4}
    kept, dropped = fitting(SPACE, earlier)
    assert kept == {"optimizer": "sgd", "momentum": 0.9}  # epochs: fixed here at the value it had, neither
    assert dropped == {"learning_rate": "outside 0.0001..0.01", "width": "outside 16..64 step 16",
                       "depth": "not in this space"}
    study = optuna.create_study()
    study.enqueue_trial(kept)
    drawn = suggest(study.ask(), SPACE)  # what Optuna runs: the kept values, the rest sampled in the space
    assert drawn["optimizer"] == "sgd" and drawn["momentum"] == 0.9 and 1e-4 <= drawn["learning_rate"] <= 1e-2


def test_fitting_drops_a_choice_gone_a_value_fixed_otherwise_and_a_condition_that_fails():
    kept, dropped = fitting({**SPACE, "optimizer": "adam", "width": {"type": "categorical", "choices": [16, 32]}},
                            {"optimizer": "sgd", "momentum": 0.9, "width": 64, "epochs": 5})
    assert kept == {}
    assert dropped == {"optimizer": "fixed at adam here", "momentum": "not used here with optimizer=adam",
                       "width": "not among 16, 32", "epochs": "fixed at 3 here"}


def test_fitting_leaves_to_the_sampler_what_the_earlier_trial_lacks():
    kept, dropped = fitting(SPACE, {"momentum": 0.95, "width": 32.0})
    # optimizer is the sampler's choice, so momentum may apply: kept (Optuna ignores it if adam is drawn).
    assert kept == {"momentum": 0.95, "width": 32} and isinstance(kept["width"], int) and dropped == {}


@pytest.mark.parametrize("name", ["optimizer", "learning_rate", "width"])
def test_distribution_is_the_one_suggest_draws_from(name):
    study = optuna.create_study()
    trial = study.ask()
    suggest(trial, {key: value for key, value in SPACE.items() if key != "momentum"})
    assert trial.distributions[name] == distribution(SPACE[name])
