"""The soft vote in numpy: member calibration (temperature scaling), greedy selection, weighted averages.

What ``tinyopt.objectives.ensemble`` runs on the members' saved probabilities; ``tinyopt.results.export`` builds the
same vote into a Keras model. scipy loads in the functions that use it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tinyopt.core.errors import TrialError
from tinyopt.core.schema import ENSEMBLE_OBJECTIVES as OBJECTIVES

# The floor of a probability before its log: a float32 softmax can round a probability to 0, whose log
# is -inf. The exported model applies the same floor (tinyopt.results.export.ensemble_model).
PROBABILITY_FLOOR = 1e-12
# Temperatures are searched in [1/100, 100]: a member sharpened or flattened 100-fold is already all
# or nothing, and a bounded search cannot run off to 0 or infinity on a member with no information.
_LOG_TEMPERATURE_BOUNDS = (float(np.log(1e-2)), float(np.log(1e2)))


def calibrate(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Temperature scaling: ``softmax(log(p) / T)`` row by row, ``p`` floored at ``PROBABILITY_FLOOR``.

    ``T > 1`` flattens an over-confident member, ``T < 1`` sharpens an under-confident one; the order
    of the classes in each row, hence top-1 and top-5, is unchanged.

    Args:
        probs: ``(N, C)`` class probabilities (rows need not sum to 1: they do afterwards).
        temperature: ``T > 0``.

    Returns:
        ``(N, C)`` float32 probabilities.
    """
    from scipy.special import softmax

    if not temperature > 0:
        raise ValueError(f"a temperature must be positive, got {temperature}")
    logits = np.log(np.maximum(np.asarray(probs, dtype=np.float64), PROBABILITY_FLOOR)) / temperature
    return softmax(logits, axis=1).astype(np.float32)


def fit_temperature(probs: np.ndarray, labels: np.ndarray) -> float:
    """The temperature ``T`` that minimises the log loss of ``calibrate(probs, T)`` against ``labels``.

    Fitted on ``log T`` (bounded Brent search, ``scipy.optimize.minimize_scalar``), where the loss is
    smooth and a factor of 2 weighs the same either way; ``T`` lies in [0.01, 100].

    Args:
        probs: ``(N, C)`` class probabilities of one member on the selection split.
        labels: ``(N,)`` integer labels of the same samples.
    """
    from scipy.optimize import minimize_scalar
    from scipy.special import logsumexp

    log_probs = np.log(np.maximum(np.asarray(probs, dtype=np.float64), PROBABILITY_FLOOR))
    at_label = log_probs[np.arange(len(labels)), np.asarray(labels)]

    def log_loss(log_temperature: float) -> float:
        scale = np.exp(-log_temperature)
        return float(np.mean(logsumexp(log_probs * scale, axis=1) - at_label * scale))

    found = minimize_scalar(log_loss, bounds=_LOG_TEMPERATURE_BOUNDS, method="bounded", options={"xatol": 1e-4})
    return float(np.exp(found.x))


def greedy_weights(probs: np.ndarray, labels: np.ndarray, objective: str = "log_loss", rounds: int = 50
                   ) -> np.ndarray:
    """Greedy ensemble selection with replacement (Caruana et al., 2004): vote counts as weights.

    Starting from the empty ensemble, each round adds one member, again if need be, whose addition
    gives the best vote (the mean of the members added so far): the lowest log loss, or with
    ``objective="top1"`` the highest top-1, ties going to the lower log loss, then to the first
    member. Repeats let a member count twice as much as another; members never added get weight 0.

    Args:
        probs: ``(M, N, C)`` class probabilities of ``M`` members on the same ``N`` samples.
        labels: ``(N,)`` integer labels.
        objective: ``"log_loss"`` or ``"top1"``.
        rounds: how many members are added; weights are multiples of ``1 / rounds``.

    Returns:
        ``(M,)`` weights, each member's count divided by ``rounds`` (they sum to 1).
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    probs = np.asarray(probs, dtype=np.float32)
    labels = np.asarray(labels)
    samples = np.arange(len(labels))
    # The log loss needs each vote only at the label and its row sum (rows need not sum to 1): (M, N) each.
    at_label = probs[:, samples, labels].astype(np.float64)
    row_sums = probs.sum(axis=2, dtype=np.float64)
    total = np.zeros(probs.shape[1:], dtype=np.float32)
    total_at_label, total_row_sums = np.zeros(len(labels)), np.zeros(len(labels))
    counts = np.zeros(len(probs), dtype=np.int64)
    for _ in range(rounds):
        # The mean over the added members and the candidate divides both sums alike: no division needed.
        candidate = np.maximum((total_at_label + at_label) / (total_row_sums + row_sums), PROBABILITY_FLOOR)
        losses = -np.log(candidate).mean(axis=1)
        if objective == "log_loss":
            pick = int(np.argmin(losses))
        else:
            top1 = np.array([np.mean((total + member).argmax(axis=1) == labels) for member in probs])
            pick = int(np.lexsort((losses, -top1))[0])  # lexsort sorts by its last key first
        counts[pick] += 1
        total += probs[pick]
        total_at_label += at_label[pick]
        total_row_sums += row_sums[pick]
    return counts / rounds


def normalise_weights(weights: Sequence[float]) -> np.ndarray:
    """Weights scaled to sum 1.

    Raises:
        ValueError: a weight is negative or not finite.
        TrialError: every weight is zero, so there is no vote to take.
    """
    weights = np.asarray(weights, dtype=np.float64)
    if not np.all(np.isfinite(weights)) or np.any(weights < 0):
        raise ValueError(f"ensemble weights must be finite and non-negative, got {weights.tolist()}")
    total = weights.sum()
    if total == 0:
        raise TrialError("every ensemble member has weight 0; at least one weight must be positive")
    return weights / total


def soft_vote(probs_list: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """The weighted average of the members' class probabilities.

    Args:
        probs_list: one ``(N, C)`` probability array per member, rows in the same sample order.
        weights: one non-negative weight per member; normalised to sum 1 here.

    Returns:
        ``(N, C)`` float32 probabilities, equal to sklearn's ``VotingClassifier(voting="soft")``.
    """
    return stacked_vote(np.stack([np.asarray(p, dtype=np.float32) for p in probs_list]), weights)


def stacked_vote(stacked: np.ndarray, weights: Sequence[float]) -> np.ndarray:
    """``soft_vote`` of members stacked in one ``(M, N, C)`` array."""
    if len(stacked) != len(weights):
        raise ValueError(f"{len(stacked)} probability arrays but {len(weights)} weights")
    return np.tensordot(normalise_weights(weights).astype(np.float32), stacked, axes=1)
