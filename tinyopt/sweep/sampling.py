"""The sampler and pruner a ``[study]`` table asks for; an ensemble's weights sampled as shares of the vote."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
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


class SimplexSampler(BaseSampler):
    """Samples the params ``shares`` as shares of one whole: in [0, 1], summing to 1.

    An ensemble's weights matter only as shares of the vote. Sampled as free weights in [0, 1] and
    normalised afterwards, the study would store coordinates no one reads (a weight of 0.797 that is
    a share of 0.404), and importance computed on them would rank a member the best vote leaves out
    as important. Here the study stores the shares themselves, so the sampler's model, the params
    every view shows and the importance are all about the same numbers.

    Each share is drawn as a value in [0, 1] by ``base``, then the draws are normalised to sum 1
    (uniform if all are 0). ``base`` draws them jointly where its relative search space holds them
    (multivariate TPE, once past its start-up trials), else one by one through its
    ``sample_independent`` (start-up trials: uniform draws). Either way it models the shares the
    study stored, so it draws near the shares of good trials and normalising moves them little.
    Params given as fixed (``study.enqueue_trial``, such as the ensemble's greedy weights, which
    already sum to 1) are taken as they are: Optuna reads fixed params before relative ones.

    Args:
        base: the sampler of every other param, and of the raw draws.
        shares: the names of the params sampled as shares; each must be suggested as
            ``trial.suggest_float(name, 0.0, 1.0)``.
    """

    def __init__(self, base: BaseSampler, shares: Sequence[str]):
        self._base = base
        self._shares = {name: optuna.distributions.FloatDistribution(0.0, 1.0) for name in shares}

    def infer_relative_search_space(self, study, trial):
        return {**self._base.infer_relative_search_space(study, trial), **self._shares}

    def sample_relative(self, study, trial, search_space):
        # Only what ``base`` itself samples jointly: handed shares it left out, TPE would model them
        # jointly all the same, even with ``multivariate=False``.
        own = self._base.infer_relative_search_space(study, trial)
        drawn = self._base.sample_relative(study, trial, {name: dist for name, dist in search_space.items()
                                                          if name in own})
        raw = np.array([drawn[name] if name in drawn
                        else self._base.sample_independent(study, trial, name, distribution)
                        for name, distribution in self._shares.items()], dtype=np.float64)
        total = raw.sum()
        shares = raw / total if total > 0 else np.full(len(raw), 1.0 / len(raw))
        return {**drawn, **{name: float(share) for name, share in zip(self._shares, shares, strict=True)}}

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._base.sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study, trial):
        self._base.before_trial(study, trial)

    def after_trial(self, study, trial, state, values):
        self._base.after_trial(study, trial, state, values)


def make_sampler(study: StudyConfig, seed: int, shares: Sequence[str] = ()) -> BaseSampler:
    """The configured sampler (``tpe``, ``random`` or ``bruteforce``), seeded per trial.

    TPE runs with ``constant_liar``: a trial still running elsewhere counts as a poor result, so
    parallel workers spread out instead of crowding the same promising region. ``bruteforce`` draws
    combinations in random order and never one the study already has, and stops the study when
    none is left: for small discrete spaces such as pretrained's, where TPE would repeat trials.

    Args:
        study: the ``[study]`` table.
        seed: the sweep's ``--seed``.
        shares: params sampled as shares of one whole, summing to 1 (``SimplexSampler``): an
            ensemble's weights. None by default.
    """
    name = study.sampler
    if name == "random":
        sampler = TrialSeededSampler(lambda s: optuna.samplers.RandomSampler(seed=s), seed)
    elif name == "bruteforce":
        sampler = TrialSeededSampler(_bruteforce, seed)
    else:
        startup = study.n_startup_trials
        sampler = TrialSeededSampler(
            lambda s: optuna.samplers.TPESampler(seed=s, n_startup_trials=startup, constant_liar=True), seed)
    return SimplexSampler(sampler, shares) if shares else sampler


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


def pruning_note(study: StudyConfig) -> str | None:
    """Why the configured pruner is off, in one line: Optuna cannot prune a study of several objectives.

    (``Trial.report`` and ``should_prune`` raise there: a pruner compares one value per epoch.) None
    where it is on, or prunes nothing anyway (``none``, or an approach without epochs).
    """
    objectives = study.objectives or ()
    if len(objectives) < 2 or study.pruner == "none" or study.pruner_warmup_epochs is None:
        return None
    return (f"pruning is off: Optuna cannot prune a study of {len(objectives)} objectives ({', '.join(objectives)}), "
            f"so study.pruner = {study.pruner} stops no trial (early stopping still ends those that stop improving)")


def make_pruner(study: StudyConfig, epochs: int) -> optuna.pruners.BasePruner:
    """The configured pruner, fed the selection top-1 after each epoch (step = epochs trained).

    ``median`` stops a trial below the median of earlier trials at the same epoch; ``halving``
    (successive halving) lets only the best 1/η of the trials that reached an epoch go on to η
    times as many epochs, η being ``pruner_reduction_factor``; ``hyperband`` runs several halving
    brackets; ``none`` never prunes. The first ``pruner_warmup_epochs`` epochs of a trial are never
    judged, nor, by ``median``, the first ``n_startup_trials`` trials. A study of several objectives is
    never pruned (``pruning_note``).
    """
    name = study.pruner
    if pruning_note(study) or name == "none" or study.pruner_warmup_epochs is None:  # nothing it can judge
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
