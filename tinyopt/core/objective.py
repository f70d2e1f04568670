"""What a study optimises: its value's name, its direction, and how every view shows and ranks it.

One objective per study, read from the study itself (``of_study``: Optuna's ``metric_names`` and
``direction``), so that MLflow, optuna-dashboard, ``best``, ``report`` and the plots name the same
number the same way. The approaches maximise the selection top-1; an ensemble of
``ensemble.objective = "log_loss"`` minimises the selection log loss, and every view shows its
selection top-1 beside it, the score a person reads. Ensemble studies made before the direction
was stored maximised ``minus_selection_log_loss``: they are read (and swept on) as they are.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from tinyopt.core import record

_MINUS = "minus_"


@dataclass(frozen=True)
class Objective:
    """A study's value: its metric name (``selection_top1``, ``selection_log_loss``) and direction."""

    name: str
    maximize: bool

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

    def rank_key(self, value: float) -> float:
        """Sorting by this puts the best value first."""
        return -value if self.maximize else value

    def ranked(self, trials: Iterable[Any]) -> list[Any]:
        """Complete trials (``FrozenTrial``), the best first (the earlier trial first on a tie)."""
        return sorted(trials, key=lambda t: (self.rank_key(t.value), t.number))

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


def of_setting(ensemble_objective: str | None) -> Objective:
    """The objective of a new study: ``LOG_LOSS`` for an ensemble of ``objective = "log_loss"``, else ``TOP1``."""
    return LOG_LOSS if ensemble_objective == "log_loss" else TOP1


def of_study(study: Any) -> Objective:
    """The objective a study was made with (``TOP1`` for a study that names none)."""
    names = study.metric_names or [record.OBJECTIVE_NAME]
    return Objective(names[0], maximize=study.direction.name == "MAXIMIZE")
