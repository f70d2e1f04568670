"""A study as its trials add up: counts by state, compute time, its best trial and Pareto front, typed.

Read from an Optuna study's trials (their user attrs are named in ``tinyopt.core.record``) by the
sweep's MLflow summary, ``tinyopt best``, ``report``, ``export`` and ``refit``.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from tinyopt.core import record
from tinyopt.core.config.sections import Config
from tinyopt.core.errors import StudyError
from tinyopt.core.forecast import Actual, Forecast, stored
from tinyopt.core.objective import TOP1, Objective, objectives_of
from tinyopt.core.record import SCORES
from tinyopt.core.urls import ml_layout

STATES = ("COMPLETE", "PRUNED", "FAIL", "RUNNING")


_MEMBER_SCORES = (*SCORES, *record.LOG_LOSSES)


@dataclass(frozen=True)
class MemberRecord:
    """One member of an ensemble trial's vote, as its ``members`` user attr records it.

    Attributes:
        label: ``<study>-<trial number>``, as the member's weight param is named.
        study, trial_number, run_id: the approach trial and its MLflow run (its predictions, its kept model).
        model_kept: whether that run holds the model, which export needs.
        weight: the member's share of the vote (the weights of a trial sum to 1).
        temperature: its calibration temperature; None for trials recorded before calibration.
        scores: its calibrated scores, by the names of ``record.SCORES`` and ``record.LOG_LOSSES``.
    """

    label: str
    study: str
    trial_number: int
    run_id: str
    model_kept: bool
    weight: float
    temperature: float | None
    scores: dict[str, float]

    @classmethod
    def from_attr(cls, attr: dict[str, Any]) -> MemberRecord:
        return cls(label=attr["label"], study=attr["study"], trial_number=int(attr["trial_number"]),
                   run_id=attr["run_id"], model_kept=bool(attr["model_kept"]), weight=float(attr["weight"]),
                   temperature=attr.get("temperature"),  # absent from trials recorded before calibration
                   scores={key: attr[key] for key in _MEMBER_SCORES if key in attr})

    def as_attr(self) -> dict[str, Any]:
        """The stored form: one flat dict, the scores beside the rest."""
        return {"label": self.label, "study": self.study, "trial_number": self.trial_number, "run_id": self.run_id,
                "model_kept": self.model_kept, "weight": self.weight, "temperature": self.temperature,
                **self.scores}


@dataclass
class BestTrial:
    """The best complete trial of a study.

    Attributes:
        number: the trial number.
        value: the objective value (``tinyopt.core.objective.of_study`` names it).
        scores: ``record.SCORES`` where recorded.
        params: every param of the trial, fixed ones included.
        run_id: its MLflow run.
        run_url: its MLflow run's page, in the UI's model-training layout (None if it recorded none).
        model_kept: whether that run holds the trained model.
        members: ensemble only: its members (``record.MEMBERS``).
        uniform: ensemble only: scores of the uniform vote of the same members.
        best_member: ensemble only: the label and scores of the member with the best selection objective
            (None for trials recorded before it was).
        log_losses: ``record.LOG_LOSSES`` where recorded.
        costs: ``record.COSTS`` (latency, parameter count) where recorded.
    """

    number: int
    value: float
    scores: dict[str, float]
    params: dict[str, Any]
    run_id: str | None
    model_kept: bool
    run_url: str | None = None
    members: list[MemberRecord] = field(default_factory=list)
    uniform: dict[str, float] = field(default_factory=dict)
    best_member: tuple[str, dict[str, float]] | None = None
    log_losses: dict[str, float] = field(default_factory=dict)
    costs: dict[str, float] = field(default_factory=dict)

    def _best_member(self) -> tuple[str, dict[str, float]]:
        if self.best_member is not None:
            return self.best_member
        # Trials recorded before best_member was took the member of the best selection top-1.
        best = max(self.members, key=lambda m: m.scores[record.SELECTION_TOP1])
        return best.label, best.scores

    def gains(self) -> dict[str, float]:
        """Ensemble only: top-1 over the best single member (chosen on selection) and over the uniform vote."""
        if not self.members:
            return {}
        references = (("best_member", self._best_member()[1]), ("uniform", self.uniform))
        return {f"{split}_top1_over_{what}": self.scores[key] - reference[key]
                for split, key in (("selection", record.SELECTION_TOP1), ("test", record.TEST_TOP1))
                for what, reference in references}

    def versus(self) -> list[tuple[str, dict[str, float]]]:
        """Ensemble only: the weighted vote, the best member alone and the uniform vote, as (name, scores)."""
        if not self.members:
            return []
        label, scores = self._best_member()
        return [("weighted vote", {**self.scores, **self.log_losses}), (f"best member {label}", scores),
                ("uniform vote", self.uniform)]


@dataclass
class StudySummary:
    """One study: its trial counts, compute time, best trial (``None`` without a complete trial) and objective.

    A study of several objectives also has its Pareto front (``front``, by the first objective, best first);
    its ``best`` is the front's first. ``picked``: ``best`` is a trial chosen by number (``pick``).
    """

    name: str
    approach: str
    counts: dict[str, int]
    compute_seconds: float
    best: BestTrial | None
    objective: Objective = TOP1
    objectives: tuple[Objective, ...] = (TOP1,)
    front: list[BestTrial] = field(default_factory=list)
    picked: bool = False
    forecast: Forecast | None = None  # tinyopt plan's, kept by a sweep run with --forecast
    actual: Actual | None = None  # the same figures, measured on its finished trials (with a forecast)

    @property
    def chosen(self) -> str:
        """How ``best`` was chosen, as a bundle's MODEL.md says it."""
        c = self.counts
        among = f"{c['COMPLETE']} complete trials ({c['PRUNED']} pruned, {c['FAIL']} failed) of an Optuna study"
        if self.picked:
            return (f"Trial {self.best.number}, picked by number (`tinyopt best {self.name} --trial "
                    f"{self.best.number}`) among the {among}, each scored on the selection split")
        return f"The best of {among}, ranked on the selection split"


def summarize_study(study: Any) -> StudySummary:
    """One study's counts by state, compute time, best trial and front (a sweep's MLflow summary shows them too)."""
    trials = study.get_trials(deepcopy=False)
    counts = Counter(t.state.name for t in trials)
    seconds = sum(t.duration.total_seconds() for t in trials if t.duration is not None)
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    objectives = objectives_of(study)
    first = objectives[0]
    front = [_trial_record(t, first) for t in first.ranked(study.best_trials)] if len(objectives) > 1 else []
    # Of several objectives, the best is the front's most accurate: of trials tied on the first, the one on the front.
    best = front[0] if front else _trial_record(first.ranked(complete)[0], first) if complete else None
    forecast = stored(study.user_attrs.get(record.FORECAST))
    return StudySummary(name=study.study_name, approach=study.user_attrs.get(record.APPROACH, study.study_name),
                        counts={state: counts.get(state, 0) for state in STATES}, compute_seconds=seconds,
                        best=best, objective=first,
                        objectives=objectives, front=front, forecast=forecast,
                        actual=Actual.of_study(trials) if forecast is not None else None)


def pick(summary: StudySummary, study: Any, number: int) -> StudySummary:
    """``summary`` of ``study`` with its trial ``number`` as its ``best``: what ``tinyopt best --trial`` exports.

    Raises:
        StudyError: the study has no such trial, or the trial is not complete.
    """
    trials = study.get_trials(deepcopy=False)
    shows = f"`tinyopt best {summary.name}` shows its best" + (" and its Pareto front" if summary.front else "")
    if not 0 <= number < len(trials):
        held = f"its trials are 0 to {len(trials) - 1}" if trials else "it has no trial yet"
        raise StudyError(f"study {summary.name!r} has no trial {number} ({held}); {shows}")
    trial = trials[number]
    if trial.state.name != "COMPLETE":
        state = {"FAIL": "failed"}.get(trial.state.name, trial.state.name.lower())
        raise StudyError(f"trial {number} of study {summary.name!r} is {state}, not complete: it has no scores or "
                         f"model; pick a complete trial ({shows})")
    return dataclasses.replace(summary, best=_trial_record(trial, summary.objective), picked=True)


def _trial_record(trial: Any, objective: Objective) -> BestTrial:
    attrs = trial.user_attrs
    return BestTrial(
        number=trial.number, value=objective.of(trial), scores={k: attrs[k] for k in SCORES if k in attrs},
        params=attrs.get(record.PARAMS, trial.params), run_id=attrs.get(record.RUN_ID),
        run_url=ml_layout(attrs.get(record.RUN_URL)) or None,
        model_kept=bool(attrs.get(record.MODEL_KEPT)), members=members_of(trial),
        uniform=attrs.get(record.UNIFORM, {}), best_member=_best_member_of(attrs.get(record.BEST_MEMBER)),
        log_losses={k: attrs[k] for k in record.LOG_LOSSES if k in attrs},
        costs={k: attrs[k] for k in record.COSTS if k in attrs})


def study_config(study: Any) -> Config:
    """The resolved config a study's sweep stored (``record.CONFIG``), typed.

    Raises:
        StudyError: the study holds no config, or a damaged one.
    """
    stored = study.user_attrs.get(record.CONFIG)
    if stored is None:
        raise StudyError(f"study {study.study_name!r} holds no config: it was not made by `tinyopt sweep`")
    try:
        return Config.from_dict(stored)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise StudyError(f"the config stored with study {study.study_name!r} is damaged ({type(err).__name__}: "
                         f"{err}); restore the storage from a copy, or sweep into a new study") from err


def members_of(trial: Any) -> list[MemberRecord]:
    """An ensemble trial's members (none for a trial of another approach).

    Raises:
        StudyError: the trial's members record is damaged.
    """
    try:
        return [MemberRecord.from_attr(attr) for attr in trial.user_attrs.get(record.MEMBERS, [])]
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise StudyError(f"the {record.MEMBERS} record of ensemble trial {trial.number} is damaged "
                         f"({type(err).__name__}: {err}); restore the storage from a copy, or sweep the "
                         "ensemble into a new study") from err


def _best_member_of(attr: dict[str, Any] | None) -> tuple[str, dict[str, float]] | None:
    if not attr:
        return None
    return attr["label"], {key: value for key, value in attr.items() if key != "label"}
