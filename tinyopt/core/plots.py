"""Every plot tinyopt draws, and the parameter importances one of them shows.

Plots are matplotlib ``Figure`` objects, never pyplot's global state: the sweep draws some in its
MLflow logging thread while the next trial runs. matplotlib and optuna load in the functions.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from tinyopt.core.objective import TOP1, Objective, of_study
from tinyopt.core.record import SCORE_LABELS, SCORES

IMPORTANCE_METHOD = "PED-ANOVA"


def comparison_chart(rows: Sequence[Mapping[str, Any]], title: str) -> Any:
    """A grouped bar chart of selection/test top-1/top-5, one group per row (``name`` + scores)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(max(6.0, 1.4 * len(rows) + 2), 4))
    axis = figure.subplots()
    width = 0.8 / len(SCORES)
    for i, key in enumerate(SCORES):
        positions = [j + (i - (len(SCORES) - 1) / 2) * width for j in range(len(rows))]
        bars = axis.bar(positions, [row.get(key) or 0.0 for row in rows], width, label=SCORE_LABELS[key])
        axis.bar_label(bars, fmt="%.3f", fontsize=6, rotation=90, padding=2)
    axis.set_xticks(range(len(rows)), [row["name"] for row in rows], rotation=15, ha="right")
    axis.set_ylim(0, 1.25)  # headroom for the legend above the bars
    axis.set_ylabel("accuracy")
    axis.set_title(title)
    axis.legend(fontsize=7, ncols=4, loc="upper left")
    figure.tight_layout()
    return figure


def history_chart(study_name: str, complete: Sequence[Any], objective: Objective = TOP1) -> Any:
    """The objective of each complete trial (``FrozenTrial``), and the best so far, by trial number."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    trials = sorted(complete, key=lambda t: t.number)
    figure = Figure(figsize=(6, 3.5))
    axis = figure.subplots()
    numbers = [t.number for t in trials]
    values = [objective.of(t) for t in trials]
    axis.scatter(numbers, values, s=12, label="trial")
    axis.step(numbers, objective.best_so_far(values), where="post", color="C1", label="best so far")
    axis.set_xlabel("trial")
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))  # trial numbers, never 2.5
    axis.set_ylabel(objective.heading)
    axis.set_title(f"optimisation history: {study_name}")
    axis.legend()
    figure.tight_layout()
    return figure


def importances(study: Any) -> tuple[dict[str, float], str | None]:
    """Each searched param's importance to the objective, computed as optuna-dashboard computes it.

    PED-ANOVA (``optuna.importance.PedAnovaImportanceEvaluator``, which ranks low targets best) on the
    objective, negated where it is maximised, the dashboard's choice: ``tinyopt report``, the sweep's
    MLflow summary and the dashboard then agree.

    Returns:
        The importances, most important first (normalised to sum 1), and why there are none when
        the complete trials cannot rank the params (fewer than two, or no param that varies).
    """
    import optuna

    objective = of_study(study)
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    if len(complete) < 2:
        return {}, f"{len(complete)} complete trial(s), at least 2 are needed"
    try:
        with warnings.catch_warnings():
            # The dashboard silences it too: the target below is negated for a maximised study.
            warnings.filterwarnings("ignore", message="PedAnovaImportanceEvaluator computes")
            warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
            # Few trials per category ("may be inaccurate"): the plot is a guide, a sweep's output no place for it.
            warnings.filterwarnings("ignore", category=UserWarning, module="optuna")
            found = optuna.importance.get_param_importances(
                study, target=lambda t: objective.rank_key(objective.of(t)),
                evaluator=optuna.importance.PedAnovaImportanceEvaluator())
    except (ValueError, RuntimeError) as err:
        return {}, str(err)
    if not found:
        return {}, "no searched param varies across the complete trials"
    total = sum(found.values())
    return ({key: value / total for key, value in found.items()} if total > 0 else dict(found)), None


def pareto_chart(study_name: str, complete: Sequence[Any], front: Sequence[int],
                 objectives: Sequence[Objective]) -> Any:
    """A study of two objectives: each complete trial's first objective (up) against its second (across).

    Every trial is labelled with its number; those of the Pareto front (``front``: their numbers, e.g.
    of ``study.best_trials``) are highlighted and joined by the steps of what the study attains: the
    best first objective at each value of the second.
    """
    from matplotlib.figure import Figure

    y, x = objectives[0], objectives[1]
    figure = Figure(figsize=(6, 4))
    axis = figure.subplots()
    axis.scatter([x.of(t) for t in complete], [y.of(t) for t in complete], s=14, color="0.65", label="trial")
    best = sorted((t for t in complete if t.number in set(front)), key=lambda t: x.rank_key(x.of(t)))
    axis.step([x.of(t) for t in best], [y.of(t) for t in best], where="post", marker="o", color="C3",
              label="Pareto front")
    for t in complete:
        axis.annotate(str(t.number), (x.of(t), y.of(t)), textcoords="offset points", xytext=(3, 3), fontsize=7,
                      color="C3" if t.number in set(front) else "0.4")
    axis.set_xlabel(x.heading)
    axis.set_ylabel(y.heading)
    axis.set_title(f"{y.label} against {x.label}: {study_name}")
    axis.legend()
    figure.tight_layout()
    return figure


def importance_chart(study_name: str, found: Mapping[str, float]) -> Any:
    """The importances of ``importances`` as a horizontal bar chart."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 0.4 * len(found) + 1.5))
    axis = figure.subplots()
    names = list(found)[::-1]
    axis.barh(names, [found[n] for n in names])
    axis.set_xlabel(f"importance ({IMPORTANCE_METHOD}, normalised)")
    axis.set_title(f"parameter importance: {study_name}")
    figure.tight_layout()
    return figure


def learning_curve(history: Mapping[str, Sequence[float]]) -> Any:
    """Train vs selection top-1 and loss by epoch (a Keras ``History.history``)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(9, 3.5))
    epochs = np.arange(1, len(history["loss"]) + 1)
    for axis, metric, title in zip(figure.subplots(1, 2), ("accuracy", "loss"), ("top-1 accuracy", "loss"),
                                   strict=True):
        axis.plot(epochs, history[metric], marker="o", label="train")
        if f"val_{metric}" in history:
            axis.plot(epochs, history[f"val_{metric}"], marker="o", label="selection")
        axis.set_xlabel("epoch")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_title(title)
        axis.legend()
    figure.tight_layout()
    return figure
