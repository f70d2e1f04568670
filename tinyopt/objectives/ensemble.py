"""Soft-voting ensemble over the approach studies' best trials, and the study of its weights.

Every complete trial of an approach study saved its selection and test class probabilities, so the
ensemble never reruns a model: it weights those arrays. Everything is fitted on the selection split
only; test scores are reported, never optimised on.

Three steps, each on the selection split:

1. Calibration: each member's probabilities ``p`` become ``softmax(log(p) / T)`` with one temperature
   ``T > 0`` per member, fitted to minimise that member's selection log loss (``fit_temperature``).
   Calibrating before the vote puts every member on one honest scale: without it, weights also act
   as temperatures, and a chance-level member (a near-uniform distribution) could win a large weight
   by smoothing the vote, a gain that is noise on a selection set of a thousand images. One scalar per
   member (Guo et al., 2017) cannot overfit the selection split as a per-class calibration could, and
   it leaves each member's ranking of the classes, hence its top-1 and top-5, as they were.
2. Greedy ensemble selection with replacement (Caruana et al., 2004, as auto-sklearn and AutoGluon
   do; ``greedy_weights``): the ensemble study's first trial, a strong baseline the study can only
   improve on.
3. The study: one share of the vote per member, the shares summing to 1, sampled as such
   (``tinyopt.sweep.sampling.SimplexSampler``), minimising the selection log loss
   (``ensemble.objective = "log_loss"``, a proper score, the default) or maximising the selection top-1.
   Studies made before the direction was stored maximise minus the selection log loss; each study
   keeps its objective (``tinyopt.core.objective.of_study``).

An ensemble trial records what ``best --export`` and ``report`` need in its user attrs
(see ``WeightSearch.record``)::

    "members":     [{"label", "study", "trial_number", "run_id", "model_kept", "weight", "temperature",
                     "selection_top1", "selection_top5", "selection_log_loss",
                     "test_top1", "test_top5", "test_log_loss"}, ...]
    "uniform":     {"selection_top1", ..., "test_log_loss"}: the uniform vote of the calibrated members
    "best_member": {"label", "selection_top1", ..., "test_log_loss"}: the calibrated member with the best
                   selection objective, alone
    "selection_top1", "selection_top5", "test_top1", "test_top5",
    "selection_log_loss", "test_log_loss"

plus, from ``EnsembleObjective``, the user attrs every approach trial has: ``params`` (the shares),
``mlflow_run_id``, ``seconds`` and ``model_kept`` (always False: the members keep the models). A
trial's Optuna params are the shares of the vote themselves, so the study, its importance, the
trial's MLflow params and run name, ``best`` and ``report`` all show the same numbers. Trials of
studies swept before that stored raw weights in [0, 1], which the vote normalises: ``members``
holds the shares for every trial. A member's scores are those of its calibrated probabilities
(top-1 and top-5 are its own; the log loss is after temperature scaling). Trials recorded before
calibration have no ``temperature``: their members voted with their probabilities as saved. Only
numpy loads with this module; scipy, sklearn (through ``tinyopt.train.metrics``), optuna,
matplotlib and mlflow load in the functions that use them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tinyopt.core import record
from tinyopt.core.config.sections import Config
from tinyopt.core.errors import ConfigError, DataError, StudyError, TrialError
from tinyopt.core.objective import Objective, of_setting, of_study
from tinyopt.core.plots import comparison_chart
from tinyopt.core.schema import ENSEMBLE_OBJECTIVES as OBJECTIVES
from tinyopt.core.summary import MemberRecord
from tinyopt.objectives.model import TrackedObjective
from tinyopt.objectives.voting import calibrate, fit_temperature, greedy_weights, normalise_weights, stacked_vote
from tinyopt.stores import storage as storages
from tinyopt.track.names import safe_name  # the weight params end up in MLflow, whose rules it knows
from tinyopt.train.metrics import scores

_SPLITS = ("selection", "test")


def _split_scores(probs: Mapping[str, np.ndarray], labels: Mapping[str, np.ndarray]) -> dict[str, float]:
    """``{"selection_top1": ..., "test_log_loss": ...}`` from per-split probabilities and labels."""
    return {f"{split}_{name}": value for split in _SPLITS
            for name, value in scores(probs[split], labels[split]).items()}


@dataclass(frozen=True)
class Member:
    """One complete trial of an approach study taking part in the vote.

    Attributes:
        study: the approach study's name.
        trial_number: the trial's number in that study.
        run_id: the trial's MLflow run, holding ``predictions.npz`` (and the model if kept).
        model_kept: whether that run holds ``model/model.keras``, which export needs.
    """

    study: str
    trial_number: int
    run_id: str
    model_kept: bool = False

    @property
    def label(self) -> str:
        """``<study>-<trial number>``, safe as an Optuna and an MLflow param name."""
        return safe_name(f"{self.study}-{self.trial_number}")

    @property
    def param(self) -> str:
        """The name of this member's weight in the ensemble study."""
        return f"{record.WEIGHT_PREFIX}{self.label}"


class WeightSearch:
    """The objective of the ensemble study: member weights that maximise the selection objective.

    Each member is calibrated first (``fit_temperature`` on its selection probabilities, then
    ``calibrate`` on both splits): every vote here, the uniform one included, averages calibrated
    probabilities.

    Args:
        members: the members, in a fixed order.
        predictions: per member, the arrays of its ``predictions.npz`` (``selection_probs``,
            ``selection_labels``, ``test_probs``, ``test_labels``).
        objective: ``"log_loss"`` (the selection log loss) or ``"top1"`` (the selection top-1): what
            the best member and the greedy weights are chosen by.
        greedy_rounds: rounds of the greedy selection of the first trial's weights (``greedy_weights``).

    Attributes:
        temperatures: each member's fitted temperature.
        member_scores: each calibrated member's scores, keyed like ``selection_top1``.
        uniform_scores: the scores of the uniform vote.
        best_index: the index of the member with the best selection objective (the first on ties).
        greedy: the greedy weights, one per member, summing to 1.

    Raises:
        DataError: the members were not scored on the same selection and test samples.
        ConfigError: an unknown objective.
    """

    def __init__(self, members: Sequence[Member], predictions: Sequence[Mapping[str, np.ndarray]],
                 objective: str = "log_loss", greedy_rounds: int = 50):
        if objective not in OBJECTIVES:
            raise ConfigError(f"ensemble.objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
        if len(members) != len(predictions) or not members:
            raise ValueError(f"{len(members)} members but {len(predictions)} prediction sets")
        _check_same_samples(members, predictions)
        self.members = list(members)
        self.objective = objective
        self._labels = {split: np.asarray(predictions[0][f"{split}_labels"]) for split in _SPLITS}
        self.temperatures = [fit_temperature(p["selection_probs"], self._labels["selection"]) for p in predictions]
        self._probs = {split: np.stack([calibrate(p[f"{split}_probs"], t)
                                        for p, t in zip(predictions, self.temperatures, strict=True)])
                       for split in _SPLITS}
        self.member_scores = [_split_scores({s: self._probs[s][i] for s in _SPLITS}, self._labels)
                              for i in range(len(members))]
        self.uniform_scores = self.evaluate([1.0] * len(members))
        self.best_index = max(range(len(members)), key=lambda i: self.value(self.member_scores[i]))
        self.greedy = greedy_weights(self._probs["selection"], self._labels["selection"], objective, greedy_rounds)

    def vote(self, weights: Sequence[float]) -> dict[str, np.ndarray]:
        """The weighted soft vote of the calibrated members on the selection and test splits."""
        return {split: stacked_vote(self._probs[split], weights) for split in _SPLITS}

    def evaluate(self, weights: Sequence[float]) -> dict[str, float]:
        """Scores of the weighted vote, keyed like ``selection_top1`` and ``test_log_loss``."""
        return _split_scores(self.vote(weights), self._labels)

    def value(self, flat_scores: Mapping[str, float]) -> float:
        """The selection objective, higher is better (minus the log loss): what ranks members and votes here.

        A tracked study's value is its own objective's (``EnsembleObjective``), which may be the plain log loss.
        """
        if self.objective == "log_loss":
            return -flat_scores[record.SELECTION_LOG_LOSS]
        return flat_scores[record.SELECTION_TOP1]

    def suggest(self, trial: Any) -> list[float]:
        """Sample one weight in [0, 1] per member, named ``weight_<member label>``.

        Under ``tinyopt.sweep.sampling.make_sampler(..., shares=...)`` they are the shares of the vote
        (summing to 1); any other sampler draws free weights, which the vote normalises.
        """
        return [trial.suggest_float(member.param, 0.0, 1.0) for member in self.members]

    def greedy_params(self) -> dict[str, float]:
        """The greedy weights as the study's params, for ``study.enqueue_trial``: its first trial."""
        return {m.param: float(w) for m, w in zip(self.members, self.greedy, strict=True)}

    def members_attr(self, weights: Sequence[float]) -> list[dict[str, Any]]:
        """The ``members`` user attr: each member, its normalised weight, its temperature and its scores."""
        normalised = normalise_weights(weights)
        return [MemberRecord(label=m.label, study=m.study, trial_number=m.trial_number, run_id=m.run_id,
                             model_kept=m.model_kept, weight=float(w), temperature=t, scores=s).as_attr()
                for m, w, t, s in zip(self.members, normalised, self.temperatures, self.member_scores, strict=True)]

    def best_member_attr(self) -> dict[str, Any]:
        """The ``best_member`` user attr: the label and scores of the member with the best selection objective."""
        return {"label": self.members[self.best_index].label, **self.member_scores[self.best_index]}

    def record(self, trial: Any, weights: Sequence[float]) -> dict[str, float]:
        """Score the vote of ``weights`` and store the ensemble user attrs on ``trial``; returns the scores."""
        flat = self.evaluate(weights)
        trial.set_user_attr(record.MEMBERS, self.members_attr(weights))
        trial.set_user_attr(record.UNIFORM, self.uniform_scores)
        trial.set_user_attr(record.BEST_MEMBER, self.best_member_attr())
        for key, value in flat.items():
            trial.set_user_attr(key, value)
        return flat

    def __call__(self, trial: Any) -> float:
        """The objective without tracking, for a study that maximises ``value``: suggest, score and record a vote."""
        return self.value(self.record(trial, self.suggest(trial)))

    def comparison(self, weights: Sequence[float]) -> list[dict[str, Any]]:
        """Rows for the member table and bar chart: the members, then the best member, uniform and weighted vote."""
        rows = [{"name": m["label"], "weight": m["weight"], "temperature": m["temperature"], **s}
                for m, s in zip(self.members_attr(weights), self.member_scores, strict=True)]
        best = self.best_member_attr()
        rows.append({"name": f"best member ({best.pop('label')})", "weight": None, "temperature": None, **best})
        rows.append({"name": "uniform vote", "weight": None, "temperature": None, **self.uniform_scores})
        rows.append({"name": "weighted vote", "weight": None, "temperature": None, **self.evaluate(weights)})
        return rows


def _check_same_samples(members: Sequence[Member], predictions: Sequence[Mapping[str, np.ndarray]]) -> None:
    first = predictions[0]
    for member, saved in zip(members, predictions, strict=True):
        missing = {f"{s}_{a}" for s in _SPLITS for a in ("probs", "labels")} - set(saved)
        if missing:
            raise DataError(f"predictions of {member.label} (MLflow run {member.run_id}) lack "
                            f"{', '.join(sorted(missing))}; rerun that trial")
        for split in _SPLITS:
            if saved[f"{split}_probs"].shape != first[f"{split}_probs"].shape or not np.array_equal(
                    saved[f"{split}_labels"], first[f"{split}_labels"]):
                raise DataError(
                    f"ensemble members {members[0].label} and {member.label} were evaluated on different "
                    f"{split} samples (probabilities {first[f'{split}_probs'].shape} vs "
                    f"{saved[f'{split}_probs'].shape}, or different labels); sweep them on the same "
                    "data cache and data options")


def weights_of(members: Sequence[MemberRecord]) -> tuple[list[Member], list[float], list[float | None]]:
    """Members, weights and temperatures of an ensemble trial's members (``tinyopt.core.summary.members_of``).

    A member recorded before calibration has no temperature (None): it voted with its probabilities
    as saved, which ``tinyopt.results.export.ensemble_model`` then reproduces.
    """
    return ([Member(m.study, m.trial_number, m.run_id, m.model_kept) for m in members], [m.weight for m in members],
            [m.temperature for m in members])


def select_members(storage: str, studies: Sequence[str], top_k: int = 1, min_members: int = 2
                   ) -> tuple[list[Member], list[str]]:
    """The best ``top_k`` complete trials of each study, in study order.

    Args:
        storage: an Optuna storage URL.
        studies: names of the approach studies.
        top_k: how many trials of each study become members.
        min_members: fewer members than this is an error.

    Returns:
        The members, and one message per study that was skipped (missing or without a complete
        trial), for the caller to show as warnings.

    Raises:
        StudyError: fewer than ``min_members`` members remain (names the skipped studies), or no storage.
    """
    import optuna


    members: list[Member] = []
    skipped: list[str] = []
    for name in studies:
        try:
            study = storages.load_study(name, storage)
        except KeyError:
            skipped.append(f"study {name!r} does not exist; run `tinyopt sweep {name}` first")
            continue
        complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if not complete:
            skipped.append(f"study {name!r} has no complete trial")
            continue
        for trial in of_study(study).ranked(complete)[:top_k]:  # by its first objective, of several
            run_id = trial.user_attrs.get(record.RUN_ID)
            if not run_id:
                raise StudyError(f"trial {trial.number} of study {name!r} has no MLflow run id; "
                                 "it was not run by `tinyopt sweep`")
            members.append(Member(name, trial.number, run_id, bool(trial.user_attrs.get(record.MODEL_KEPT))))
    if len(members) < min_members:
        reasons = "; ".join(skipped) or f"studies {', '.join(studies)} hold {len(members)} complete trial(s)"
        raise StudyError(f"the ensemble needs at least {min_members} members, found {len(members)} "
                         f"({reasons}); sweep more approaches or lower ensemble.min_members")
    return members, skipped


def load_weight_search(members: Sequence[Member], tracking_uri: str, objective: str = "log_loss",
                       greedy_rounds: int = 50) -> WeightSearch:
    """Read the members' saved probabilities from MLflow and build the ensemble objective."""
    from tinyopt.track import store

    predictions = [store.load_predictions(m.run_id, tracking_uri) for m in members]
    return WeightSearch(members, predictions, objective, greedy_rounds)


class EnsembleObjective(TrackedObjective):
    """The ensemble study's objective with tracking: one MLflow run per trial, like the approaches.

    Each run is named after the shares of the vote (``t29 w=0.12/0.40/0.48``, in member order) and
    gets the shares and the members' temperatures as params; the vote's scores as metrics
    (``final_...``); and ``ensemble_members.json`` plus ``ensemble_comparison.png``: every member,
    the best member, the uniform and the weighted vote on selection and test. The scores of the
    uniform vote (``final_uniform_...``) and of the best member (``final_best_member_...``) are the
    same for every trial of a sweep: they are logged once, on the sweep's parent run.

    Args:
        search: the members and their probabilities.
        config: the resolved ensemble config (logged with each run).
        tracker: a ``tinyopt.track.tracking.Tracker`` with its sweep started (its parent run exists).
        events: progress listener (``tinyopt.objectives.model.Events``).
        notes: messages about skipped studies, for the sweep summary.
        objective: the study's value (``tinyopt.core.objective.of_study``); default: that of a new
            study of ``config.ensemble.objective``.
    """

    def __init__(self, search: WeightSearch, config: Config, tracker: Any, events: Any,
                 notes: Sequence[str] = (), objective: Objective | None = None):
        super().__init__(config, tracker, events, device="cpu (numpy)")
        self.search = search
        self.notes = list(notes)
        self.objective = objective or of_setting(config.ensemble.objective)
        references = {f"{name}_{key}": value
                      for name, found in ((record.UNIFORM, search.uniform_scores),
                                          (record.BEST_MEMBER, search.member_scores[search.best_index]))
                      for key, value in found.items()}
        tracker.parent_run().log_metrics({record.final(key): value for key, value in references.items()})

    def choose(self, trial: Any) -> dict[str, Any]:
        weights = self.search.suggest(trial)
        return {m.param: w for m, w in zip(self.search.members, weights, strict=True)}

    def _shares(self, params: dict[str, Any]) -> list[float]:
        # The sampler's params are the shares already; normalised here all the same, so that weights
        # given otherwise (an enqueued trial, another sampler) are shown as the shares the vote uses.
        try:
            return normalise_weights([params[m.param] for m in self.search.members]).tolist()
        except TrialError:  # every weight 0: the trial fails in evaluate, with the reason
            return [0.0] * len(self.search.members)

    def logged_params(self, trial: Any, params: dict[str, Any]) -> dict[str, Any]:
        shares = {m.param: round(s, 3) for m, s in zip(self.search.members, self._shares(params), strict=True)}
        # The temperatures are fixed for the sweep, but a run's params are where a person compares runs.
        temperatures = {f"{record.TEMPERATURE_PREFIX}{m.label}": float(f"{t:.4g}")
                        for m, t in zip(self.search.members, self.search.temperatures, strict=True)}
        return {**shares, **temperatures}

    def headline(self, params: dict[str, Any]) -> dict[str, Any]:
        # One value for every member: a "label=share" each would be cut in the MLflow runs table. The
        # value carries its "w=" because run_name shows a str value without its key.
        return {"w": "w=" + "/".join(f"{share:.2f}" for share in self._shares(params))}

    def evaluate(self, trial: Any, params: dict[str, Any], run: Any) -> float:
        trial.set_user_attr(record.MODEL_KEPT, False)
        weights = [params[m.param] for m in self.search.members]
        flat = self.search.record(trial, weights)
        run.log_metrics({record.final(key): value for key, value in flat.items()})
        rows = self.search.comparison(weights)
        run.log_text(json.dumps(rows, indent=2), record.ENSEMBLE_MEMBERS_FILE)
        run.log_figure(comparison_chart(rows, f"ensemble trial {trial.number}"), record.ENSEMBLE_COMPARISON)
        return self.objective.value_of(flat)


def prepare_search(study_name: str, config: Config, storage: str, tracking_uri: str
                   ) -> tuple[WeightSearch, list[str]]:
    """The members of ``tinyopt sweep ensemble`` and their probabilities, read before the ensemble study exists.

    Members are chosen once, when the sweep starts, from ``config.ensemble``: the best
    ``top_k`` complete trials of each of ``studies``. Studies that are missing or have no complete
    trial are skipped (one note each) as long as ``min_members`` remain. The members are calibrated
    and their greedy weights found here too (see ``WeightSearch``).

    Returns:
        The weight search, and the notes about skipped studies.

    Raises:
        StudyError: too few members, or the ensemble study itself listed as a member.
        DataError: the members were scored on different samples.
    """
    settings = config.ensemble
    studies = list(settings.studies)
    if study_name in studies:
        raise StudyError(f"ensemble.studies lists the ensemble study {study_name!r} itself; name only approach studies")
    members, skipped = select_members(storage, studies, settings.top_k, settings.min_members)
    search = load_weight_search(members, tracking_uri, settings.objective, settings.greedy_rounds)
    return search, skipped
