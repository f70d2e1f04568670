"""What a study optimises: its values' names, their directions, and how every view shows and ranks them.

Read from the study itself (``objectives_of``: Optuna's ``metric_names`` and ``directions``), so that
MLflow, optuna-dashboard, ``best``, ``report`` and the plots name the same number the same way. The
approaches maximise the selection top-1; ``study.objectives = ["selection_top1", "latency_ms"]`` also
minimises the latency of the trial's model, and the study's result is then its Pareto front. The first
objective ranks the trials wherever one order is needed (``of_study``: the best trial, the kept models,
the run ranks, the ensemble's members), so a study of one objective reads as it always did. An ensemble
of ``ensemble.objective = "log_loss"`` minimises the selection log loss, and every view shows its
selection top-1 beside it, the score a person reads. Ensemble studies made before the direction was
stored maximised ``minus_selection_log_loss``: they are read (and swept on) as they are.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tinyopt.core import record

if TYPE_CHECKING:
    from tinyopt.core.config.sections import Config

_MINUS = "minus_"


@dataclass(frozen=True)
class Objective:
    """One of a study's values: its metric name (``selection_top1``, ``latency_ms``), direction and place."""

    name: str
    maximize: bool
    index: int = 0  # its place among a trial's values (``FrozenTrial.values``)

    @property
    def direction(self) -> str:
        """``maximize`` or ``minimize``, as Optuna names it."""
        return "maximize" if self.maximize else "minimize"

    @property
    def label(self) -> str:
        """How a table, a plot or a sentence names it: ``selection top-1``, ``selection log loss``."""
        base = self.name.removeprefix(_MINUS)
        label = record.SCORE_LABELS.get(base, base.replace("_", " "))
        return f"minus {label}" if self.name.startswith(_MINUS) else label

    @property
    def heading(self) -> str:
        """Its label and which way is better: ``selection log loss (lower is better)``."""
        return f"{self.label} ({'higher' if self.maximize else 'lower'} is better)"

    @property
    def is_loss(self) -> bool:
        """Whether it is a loss (a person also wants the top-1 beside it)."""
        return self.name.removeprefix(_MINUS) in record.LOG_LOSSES

    def value_of(self, scores: Mapping[str, float]) -> float:
        """The study's value from a trial's scores (keyed like ``selection_top1``)."""
        if self.name.startswith(_MINUS):
            return -scores[self.name.removeprefix(_MINUS)]
        return scores[self.name]

    def of(self, trial: Any) -> float:
        """A complete trial's (``FrozenTrial``) value of this objective."""
        return trial.values[self.index]

    def rank_key(self, value: float) -> float:
        """Sorting by this puts the best value first."""
        return -value if self.maximize else value

    def ranked(self, trials: Iterable[Any]) -> list[Any]:
        """Complete trials (``FrozenTrial``), the best first (the earlier trial first on a tie)."""
        return sorted(trials, key=lambda t: (self.rank_key(self.of(t)), t.number))

    def best_so_far(self, values: Iterable[float]) -> list[float]:
        """The running best of ``values``, in their order."""
        best: list[float] = []
        for value in values:
            best.append(value if not best else (max if self.maximize else min)(best[-1], value))
        return best

    @property
    def best_metric(self) -> str:
        """The parent run's metric of the best value so far: ``best_selection_top1``."""
        return f"best_{self.name}"


TOP1 = Objective(record.SELECTION_TOP1, maximize=True)
LOG_LOSS = Objective(record.SELECTION_LOG_LOSS, maximize=False)
LATENCY = Objective(record.LATENCY_MS, maximize=False)


def of_setting(ensemble_objective: str | None) -> Objective:
    """The objective of a new study: ``LOG_LOSS`` for an ensemble of ``objective = "log_loss"``, else ``TOP1``."""
    return LOG_LOSS if ensemble_objective == "log_loss" else TOP1


def of_config(config: Config) -> tuple[Objective, ...]:
    """The objectives of a new study of ``config``: its ensemble's objective, else those of ``study.objectives``."""
    if config.ensemble is not None:
        return (of_setting(config.ensemble.objective),)
    return named(config.study.objectives or (record.OBJECTIVE_NAME,))


def named(names: Sequence[str]) -> tuple[Objective, ...]:
    """The objectives of a new approach study, in ``study.objectives`` order (names of ``schema.OBJECTIVES``)."""
    known = {objective.name: objective for objective in (TOP1, LATENCY)}
    return tuple(dataclasses.replace(known[name], index=i) for i, name in enumerate(names))


def of_study(study: Any) -> Objective:
    """The objective that ranks a study's trials: the first it was made with (``TOP1`` for one that names none)."""
    return objectives_of(study)[0]


def objectives_of(study: Any) -> tuple[Objective, ...]:
    """Every objective a study was made with, in order (one, unless ``study.objectives`` named several)."""
    directions = study.directions
    names = study.metric_names or [record.OBJECTIVE_NAME, *(f"value_{i}" for i in range(1, len(directions)))]
    return tuple(Objective(name, maximize=direction.name == "MAXIMIZE", index=i)
                 for i, (name, direction) in enumerate(zip(names, directions, strict=True)))


def dominates(values: Sequence[float], others: Sequence[float], objectives: Sequence[Objective]) -> bool:
    """Whether ``values`` are as good as ``others`` on every objective and better on one (Pareto dominance)."""
    keys = [(o.rank_key(mine), o.rank_key(theirs)) for o, mine, theirs in zip(objectives, values, others, strict=True)]
    return all(mine <= theirs for mine, theirs in keys) and any(mine < theirs for mine, theirs in keys)


def keeps_model(values: Sequence[float], complete: Iterable[Any], keep: int, objectives: Sequence[Objective]) -> bool:
    """Whether a trial that ends with ``values`` keeps its model, judged against the ``complete`` trials.

    It does when it is among the best ``keep`` by the first objective (ties go to the trials that ended
    first, as in the ensemble's choice of members) or, with several objectives, when no complete trial
    dominates it: a trial of the Pareto front may be the one a person exports.
    """
    complete = list(complete)
    first = objectives[0]
    ranked = sorted(first.rank_key(first.of(t)) for t in complete)
    if len(ranked) < keep or first.rank_key(values[0]) < ranked[keep - 1]:
        return True
    return len(objectives) > 1 and not any(dominates([o.of(t) for o in objectives], values, objectives)
                                           for t in complete)
