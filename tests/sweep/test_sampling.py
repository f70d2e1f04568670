"""The sampler and pruner a [study] table asks for: seeded per trial, judging from the epoch after the warmup."""

from __future__ import annotations

import dataclasses
import json

import optuna
import pytest

from tinyopt.core.config import load_config
from tinyopt.sweep import sampling
from tinyopt.sweep.sampling import make_pruner


def _pruned_at_epoch_one(settings: dict, values: list[float]) -> list[bool]:
    """Which of trials reporting ``values`` (in turn) after their first epoch the pruner ``settings`` choose stops."""
    study_cfg = dataclasses.replace(load_config("finetune").study, **settings)
    study = optuna.create_study(direction="maximize", pruner=make_pruner(study_cfg, epochs=3))
    pruned = []
    for value in values:
        trial = study.ask()
        trial.report(value, 1)  # step = epochs trained
        pruned.append(trial.should_prune())
        study.tell(trial, state=optuna.trial.TrialState.PRUNED) if pruned[-1] else study.tell(trial, value)
    return pruned


def test_pruners_judge_from_the_first_epoch_after_the_warmup_and_halving_keeps_one_in_reduction_factor():
    values = [0.30, 0.10, 0.50, 0.20, 0.40, 0.05, 0.60, 0.15, 0.35, 0.25, 0.45, 0.55]
    for pruner in ("median", "halving"):
        assert not any(_pruned_at_epoch_one({"pruner": pruner, "pruner_warmup_epochs": 1}, values))
    median = _pruned_at_epoch_one({"pruner": "median", "pruner_warmup_epochs": 0, "n_startup_trials": 3}, values)
    assert not any(median[:3])  # start-up trials
    assert median[5] and not median[6]  # 0.05 is below the median so far, 0.60 above it

    def kept(factor: int) -> list[float]:
        pruned = _pruned_at_epoch_one({"pruner": "halving", "pruner_warmup_epochs": 0,
                                       "pruner_reduction_factor": factor}, values)
        return [value for value, stopped in zip(values, pruned, strict=True) if not stopped]

    assert len(kept(4)) < len(kept(2)) < len(values)
    assert 0.60 in kept(4) and 0.05 not in kept(2)  # the best goes on, the worst does not


def test_each_trial_draws_from_its_own_seed():
    """Workers starting together draw different trials; the same seed draws the same trial again."""
    def draws(seed, count):
        study = optuna.create_study(sampler=sampling.make_sampler(load_config("scratch").study, seed))
        for _ in range(count):
            trial = study.ask()
            trial.suggest_float("x", 0, 1)
            trial.suggest_categorical("c", ["a", "b", "c"])
        return [t.params for t in study.trials]

    first = draws(seed=0, count=4)
    assert len({json.dumps(p, sort_keys=True) for p in first}) == 4  # four RUNNING trials, as four workers
    assert draws(seed=0, count=4) == first and draws(seed=1, count=4) != first


@pytest.mark.parametrize("name, inner", [("tpe", optuna.samplers.TPESampler),
                                         ("random", optuna.samplers.RandomSampler),
                                         ("bruteforce", optuna.samplers.BruteForceSampler)])
def test_make_sampler_wraps_the_named_sampler_seeded_per_trial(name, inner):
    study_cfg = dataclasses.replace(load_config("scratch").study, sampler=name)
    sampler = sampling.make_sampler(study_cfg, seed=3)
    assert isinstance(sampler, sampling.TrialSeededSampler)
    study = optuna.create_study(sampler=sampler)
    study.ask().suggest_int("x", 0, 3)
    assert isinstance(sampler._sampler, inner)


@pytest.mark.parametrize("pruner, kind", [("median", optuna.pruners.MedianPruner),
                                          ("halving", optuna.pruners.SuccessiveHalvingPruner),
                                          ("hyperband", optuna.pruners.HyperbandPruner),
                                          ("none", optuna.pruners.NopPruner)])
def test_make_pruner_builds_the_named_pruner(pruner, kind):
    study_cfg = dataclasses.replace(load_config("scratch").study, pruner=pruner)
    assert type(make_pruner(study_cfg, epochs=10)) is kind


def test_an_approach_without_epochs_is_never_pruned():
    study_cfg = dataclasses.replace(load_config("scratch").study, pruner="median", pruner_warmup_epochs=None)
    assert type(make_pruner(study_cfg, epochs=1)) is optuna.pruners.NopPruner


def test_a_study_of_two_objectives_is_never_pruned_and_says_so_once():
    both = ('study.objectives=["selection_top1", "latency_ms"]',)
    study_cfg = load_config("scratch", overrides=both).study  # hyperband by default
    assert type(make_pruner(study_cfg, epochs=10)) is optuna.pruners.NopPruner
    note = sampling.pruning_note(study_cfg)
    assert note.startswith("pruning is off: Optuna cannot prune a study of 2 objectives (selection_top1, latency_ms)")
    assert "study.pruner = hyperband stops no trial" in note and "\n" not in note
    assert sampling.pruning_note(load_config("scratch").study) is None  # one objective: pruned as configured
    assert sampling.pruning_note(load_config("pretrained", overrides=both).study) is None  # nothing to prune anyway


def test_max_epochs_is_the_most_a_trial_of_the_space_can_train():
    assert sampling.max_epochs({"epochs": 30}) == 30
    assert sampling.max_epochs({"epochs": {"type": "int", "low": 2, "high": 12}}) == 12
    assert sampling.max_epochs({"epochs": {"type": "categorical", "choices": [8, 32, 16]}}) == 32
    assert sampling.max_epochs({"input_size": 64}) == 1


SHARES = ["weight_a", "weight_b", "weight_c"]
_TARGET = {"weight_a": 0.7, "weight_b": 0.1, "weight_c": 0.2}


def _share_study(sampler: str = "tpe", trials: int = 15) -> optuna.Study:
    """A study of three shares (TPE: 4 start-up trials), its first trial enqueued as the ensemble's is."""
    study_cfg = dataclasses.replace(load_config("ensemble").study, sampler=sampler, n_startup_trials=4)
    study = optuna.create_study(direction="minimize", sampler=sampling.make_sampler(study_cfg, 0, shares=SHARES))
    study.enqueue_trial({"weight_a": 0.5, "weight_b": 0.5, "weight_c": 0.0})
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study.optimize(lambda trial: sum((trial.suggest_float(name, 0.0, 1.0) - _TARGET[name]) ** 2 for name in SHARES),
                   n_trials=trials)
    return study


@pytest.mark.parametrize("sampler", ["tpe", "random"])
def test_shares_are_sampled_on_the_simplex_and_the_enqueued_trial_kept(sampler):
    study = _share_study(sampler)
    assert isinstance(study.sampler, sampling.SimplexSampler)
    assert study.trials[0].params == {"weight_a": 0.5, "weight_b": 0.5, "weight_c": 0.0}
    for trial in study.trials:
        assert trial.state == optuna.trial.TrialState.COMPLETE
        assert sum(trial.params.values()) == pytest.approx(1.0, abs=1e-9)
        assert all(0.0 <= value <= 1.0 for value in trial.params.values())
    assert len({json.dumps(t.params, sort_keys=True) for t in study.trials}) == len(study.trials)


def test_tpe_models_the_shares_and_importance_is_computed_on_them():
    from tinyopt.core import plots

    study = _share_study(trials=30)
    startup = [t.value for t in study.trials[1:5]]
    assert study.best_value < min(startup)  # past its start-up, TPE draws near the good shares
    found = optuna.importance.get_param_importances(
        study, evaluator=optuna.importance.PedAnovaImportanceEvaluator())
    assert set(found) == set(SHARES)
    importances, why = plots.importances(study)
    assert set(importances) == set(SHARES) and why is None


def test_shares_are_reproducible_per_trial():
    assert [t.params for t in _share_study(trials=8).trials] == [t.params for t in _share_study(trials=8).trials]


def test_without_shares_the_sampler_is_the_plain_one():
    study_cfg = load_config("ensemble").study
    plain = sampling.make_sampler(study_cfg, 0)
    assert type(plain) is sampling.TrialSeededSampler
    assert type(sampling.make_sampler(study_cfg, 0, shares=())) is sampling.TrialSeededSampler

    def draws(sampler):
        study = optuna.create_study(sampler=sampler)
        for _ in range(3):
            trial = study.ask()
            for name in SHARES:
                trial.suggest_float(name, 0.0, 1.0)
        return [t.params for t in study.trials]

    free = draws(sampling.make_sampler(study_cfg, 0, shares=()))
    assert free == draws(plain)
    assert any(abs(sum(p.values()) - 1.0) > 1e-3 for p in free)  # free weights, not shares
