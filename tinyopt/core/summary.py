"""A study as its trials add up: counts by state, compute time, and its best trial, typed.

Read from an Optuna study's trials (their user attrs are named in ``tinyopt.core.record``) by the
sweep's MLflow summary, ``tinyopt best``, ``report``, ``export`` and ``refit``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from tinyopt.core import record
from tinyopt.core.record import SCORES

STATES = ("COMPLETE", "PRUNED", "FAIL", "RUNNING")


@dataclass
class BestTrial:
    """The best complete trial of a study.

    Attributes:
        number: the trial number.
        value: the objective value (selection top-1, or minus the log loss for such an ensemble).
        scores: ``selection_top1``, ``selection_top5``, ``test_top1``, ``test_top5`` where recorded.
        params: every param of the trial, fixed ones included.
        run_id: its MLflow run.
        model_kept: whether that run holds the trained model.
        members: ensemble only: the ``members`` user attr (see ``tinyopt.objectives.ensemble``).
        uniform: ensemble only: scores of the uniform vote of the same members.
        best_member: ensemble only: label and scores of the member with the best selection objective
            (empty for trials recorded before it was).
        log_losses: ``selection_log_loss`` and ``test_log_loss`` where recorded.
    """

    number: int
    value: float
    scores: dict[str, float]
    params: dict[str, Any]
    run_id: str | None
    model_kept: bool
    members: list[dict[str, Any]] = field(default_factory=list)
    uniform: dict[str, float] = field(default_factory=dict)
    best_member: dict[str, Any] = field(default_factory=dict)
    log_losses: dict[str, float] = field(default_factory=dict)

    def _best_member(self) -> dict[str, Any]:
        # Trials recorded before best_member was took the member of the best selection top-1.
        return self.best_member or max(self.members, key=lambda m: m["selection_top1"])

    def gains(self) -> dict[str, float]:
        """Ensemble only: top-1 over the best single member (chosen on selection) and over the uniform vote."""
        if not self.members:
            return {}
        return {f"{split}_top1_over_{what}": self.scores[f"{split}_top1"] - reference[f"{split}_top1"]
                for split in ("selection", "test")
                for what, reference in (("best_member", self._best_member()), ("uniform", self.uniform))}

    def versus(self) -> list[tuple[str, dict[str, float]]]:
        """Ensemble only: the weighted vote, the best member alone and the uniform vote, as (name, scores)."""
        if not self.members:
            return []
        return [("weighted vote", {**self.scores, **self.log_losses}),
                (f"best member {self._best_member()['label']}", self._best_member()),
                ("uniform vote", self.uniform)]


@dataclass
class StudySummary:
    """One study: its trial counts, compute time and best trial (``None`` without a complete trial)."""

    name: str
    approach: str
    counts: dict[str, int]
    compute_seconds: float
    best: BestTrial | None


def summarize_study(study: Any) -> StudySummary:
    """One study's counts by state, compute time and best trial (a sweep's MLflow summary shows them too)."""
    trials = study.get_trials(deepcopy=False)
    counts = Counter(t.state.name for t in trials)
    seconds = sum(t.duration.total_seconds() for t in trials if t.duration is not None)
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    best = None
    if complete:
        trial = study.best_trial
        attrs = trial.user_attrs
        best = BestTrial(
            number=trial.number, value=trial.value, scores={k: attrs[k] for k in SCORES if k in attrs},
            params=attrs.get(record.PARAMS, trial.params), run_id=attrs.get(record.RUN_ID),
            model_kept=bool(attrs.get(record.MODEL_KEPT)), members=attrs.get(record.MEMBERS, []),
            uniform=attrs.get(record.UNIFORM, {}), best_member=attrs.get(record.BEST_MEMBER, {}),
            log_losses={k: attrs[k] for k in record.LOG_LOSSES if k in attrs})
    return StudySummary(name=study.study_name, approach=study.user_attrs.get(record.APPROACH, study.study_name),
                        counts={state: counts.get(state, 0) for state in STATES}, compute_seconds=seconds,
                        best=best)
