"""The sampler and pruner a ``[study]`` table asks for."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import optuna
from optuna.samplers import BaseSampler

from tinyopt.core import space as search_space
from tinyopt.core.config.sections import StudyConfig


class TrialSeededSampler(BaseSampler):
    """A sampler reseeded for every trial from (seed, trial number).

    A seed per process would either repeat itself (workers that start together on a fresh study
    draw the same start-up trials) or make a sweep irreproducible. Trial numbers are unique across
    every worker of a study, so seeding each trial by its number gives both: no two workers draw
    alike, and a study run again with the same seed proposes the same trials.

    Args:
        make: builds the underlying sampler (e.g. ``TPESampler``) from a seed. Samplers keep no
            state between trials except their random generator; the study holds the history.
        seed: the sweep's ``--seed``.
    """

    def __init__(self, make: Callable[[int], BaseSampler], seed: int):
        self._make = make
        self._seed = seed
        self._number: int | None = None
        self._sampler: BaseSampler | None = None

    def _for(self, trial: Any) -> BaseSampler:
        if self._number != trial.number:
            entropy = np.random.SeedSequence([self._seed, trial.number]).generate_state(1)[0]
            self._number, self._sampler = trial.number, self._make(int(entropy))
        return self._sampler

    def infer_relative_search_space(self, study, trial):
        return self._for(trial).infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._for(trial).sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._for(trial).sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study, trial):
        self._for(trial).before_trial(study, trial)

    def after_trial(self, study, trial, state, values):
        self._for(trial).after_trial(study, trial, state, values)


def make_sampler(study: StudyConfig, seed: int) -> BaseSampler:
    """The configured sampler (``tpe``, ``random`` or ``bruteforce``), seeded per trial.

    TPE runs with ``constant_liar``: a trial still running elsewhere counts as a poor result, so
    parallel workers spread out instead of crowding the same promising region. ``bruteforce`` draws
    combinations in random order and never one the study already has, and stops the study when
    none is left: for small discrete spaces such as pretrained's, where TPE would repeat trials.
    """
    name = study.sampler
    if name == "random":
        return TrialSeededSampler(lambda s: optuna.samplers.RandomSampler(seed=s), seed)
    if name == "bruteforce":
        return TrialSeededSampler(_bruteforce, seed)
    startup = study.n_startup_trials
    return TrialSeededSampler(
        lambda s: optuna.samplers.TPESampler(seed=s, n_startup_trials=startup, constant_liar=True), seed)


def _bruteforce(seed: int) -> BaseSampler:
    with warnings.catch_warnings():  # "experimental" since Optuna 3.1; a line on every trial otherwise
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.BruteForceSampler(seed=seed)


def max_epochs(space: Mapping[str, Any]) -> int:
    """The most epochs a trial of this space can train (the pruner's budget; 1 for a space without epochs)."""
    if "epochs" not in space:
        return 1
    epochs = space["epochs"]
    if not search_space.is_distribution(epochs):
        return int(epochs)
    return int(max(epochs["choices"]) if epochs["type"] == "categorical" else epochs["high"])


def make_pruner(study: StudyConfig, epochs: int) -> optuna.pruners.BasePruner:
    """The configured pruner, fed the selection top-1 after each epoch (step = epochs trained).

    ``median`` stops a trial below the median of earlier trials at the same epoch; ``halving``
    (successive halving) lets only the best 1/η of the trials that reached an epoch go on to η
    times as many epochs, η being ``pruner_reduction_factor``; ``hyperband`` runs several halving
    brackets; ``none`` never prunes. The first ``pruner_warmup_epochs`` epochs of a trial are never
    judged, nor, by ``median``, the first ``n_startup_trials`` trials.
    """
    name = study.pruner
    if name == "none" or study.pruner_warmup_epochs is None:  # an approach without epochs has nothing to judge
        return optuna.pruners.NopPruner()
    first = study.pruner_warmup_epochs + 1  # the first epoch judged
    reduction = study.pruner_reduction_factor
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=study.n_startup_trials,
                                           n_warmup_steps=first)
    if name == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=first, reduction_factor=reduction)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=first, max_resource=max(epochs, first),
                                              reduction_factor=reduction)
    return optuna.pruners.NopPruner()
