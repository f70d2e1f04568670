"""The soft vote in numpy: weighted averages, temperature calibration and greedy selection of members."""

from __future__ import annotations

import numpy as np
import pytest
from fixtures import drawn_logits, flat_member, member_predictions
from scipy.special import softmax
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.ensemble import VotingClassifier
from sklearn.frozen import FrozenEstimator

from tinyopt.core.errors import TrialError
from tinyopt.objectives import voting
from tinyopt.train.metrics import scores


@pytest.fixture(scope="module")
def predictions():
    """One good, calibrated member and two poor, overconfident ones (test_ensemble.py's members)."""
    return [member_predictions(0.8, 1.0, seed=1), member_predictions(0.15, 4.0, seed=2),
            member_predictions(0.15, 4.0, seed=3)]


def test_soft_vote_normalises_weights():
    a = np.array([[0.9, 0.1], [0.2, 0.8]], dtype=np.float32)
    b = np.array([[0.5, 0.5], [0.6, 0.4]], dtype=np.float32)
    np.testing.assert_allclose(voting.soft_vote([a, b], [3, 1]), 0.75 * a + 0.25 * b, rtol=1e-6)
    np.testing.assert_allclose(voting.soft_vote([a, b], [0, 2]), b)


@pytest.mark.parametrize("weights, error", [([0, 0], TrialError), ([1, -1], ValueError),
                                            ([1, float("nan")], ValueError), ([1], ValueError)])
def test_soft_vote_rejects_bad_weights(weights, error):
    probs = np.full((2, 2), 0.5, dtype=np.float32)
    with pytest.raises(error):
        voting.soft_vote([probs, probs], weights)


class _StoredProbabilities(ClassifierMixin, BaseEstimator):
    """A 'fitted' classifier whose input is a sample index and whose output is saved probabilities."""

    def __init__(self, probs: np.ndarray):
        self.probs = probs
        self.classes_ = np.arange(probs.shape[1])

    def fit(self, x: np.ndarray, y: np.ndarray) -> _StoredProbabilities:
        return self  # sklearn checks that a fitted estimator has fit(); FrozenEstimator never calls it

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return self.probs[x[:, 0].astype(int)]

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.predict_proba(x).argmax(axis=1)


def test_weighted_vote_equals_sklearn_voting_classifier(predictions):
    probs = [p["selection_probs"] for p in predictions]
    labels = predictions[0]["selection_labels"]
    weights = [0.7, 0.2, 0.1]
    voter = VotingClassifier(
        [(f"m{i}", FrozenEstimator(_StoredProbabilities(p))) for i, p in enumerate(probs)],
        voting="soft", weights=weights,
    )
    index = np.arange(len(labels))[:, None]
    voter.fit(index, labels)  # frozen members: only the label encoder is fitted
    np.testing.assert_allclose(voting.soft_vote(probs, weights), voter.predict_proba(index), rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(voting.soft_vote(probs, weights).argmax(axis=1), voter.predict(index))


@pytest.mark.parametrize("overconfidence", [0.4, 1.0, 2.5])
def test_fit_temperature_recovers_how_miscalibrated_a_member_is(overconfidence):
    logits, labels = drawn_logits(3000, seed=7)
    member = softmax(overconfidence * logits, axis=1)  # < 1: under-confident, > 1: over-confident
    temperature = voting.fit_temperature(member, labels)
    assert temperature == pytest.approx(overconfidence, rel=0.1)
    calibrated = voting.calibrate(member, temperature)
    assert calibrated.dtype == np.float32
    np.testing.assert_allclose(calibrated.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(calibrated.argmax(axis=1), member.argmax(axis=1))
    np.testing.assert_allclose(calibrated, softmax(logits, axis=1), atol=0.05)


def test_calibrate_is_softmax_of_log_probabilities_over_t():
    probs = np.array([[0.5, 0.3, 0.2, 0.0]], dtype=np.float32)  # a 0 is floored before its log
    expected = np.array([[0.25, 0.09, 0.04, 1e-24]]) / (0.38 + 1e-24)
    np.testing.assert_allclose(voting.calibrate(probs, 0.5), expected, rtol=1e-6)
    with pytest.raises(ValueError, match="positive"):
        voting.calibrate(probs, 0.0)


def test_greedy_gives_the_good_member_most_weight():
    logits, labels = drawn_logits(1000, seed=0)
    rng = np.random.default_rng(9)
    noise = [softmax(rng.normal(scale=2.0, size=logits.shape), axis=1) for _ in range(3)]
    for objective, least in (("log_loss", 0.95), ("top1", 0.7)):
        weights = voting.greedy_weights(np.stack([softmax(logits, axis=1), *noise]), labels, objective)
        assert weights.sum() == pytest.approx(1.0)
        assert weights[0] >= least, (objective, weights)


def test_greedy_picks_both_complementary_members():
    """Each member knows the labels of half the samples and is uniform on the other half."""
    logits, labels = drawn_logits(1000, seed=1)
    half = (np.arange(len(labels)) % 2 == 0)[:, None]
    members = np.stack([softmax(np.where(half, logits, 0), axis=1), softmax(np.where(half, 0, logits), axis=1)])
    weights = voting.greedy_weights(members, labels, rounds=50)
    assert weights.min() >= 0.4, weights
    vote = scores(voting.soft_vote(list(members), weights), labels)["log_loss"]
    assert vote < min(scores(member, labels)["log_loss"] for member in members)


def test_greedy_keeps_a_chance_level_member_out_of_a_calibrated_vote():
    logits, labels = drawn_logits(1000, seed=2)
    weights = voting.greedy_weights(np.stack([softmax(logits, axis=1), flat_member(1000, seed=3)]), labels)
    assert weights.tolist() == [1.0, 0.0]


@pytest.mark.parametrize("objective, rounds, error", [("top5", 50, "objective"), ("log_loss", 0, "rounds")])
def test_greedy_rejects_bad_settings(objective, rounds, error):
    with pytest.raises(ValueError, match=error):
        voting.greedy_weights(np.full((2, 3, 4), 0.25), np.zeros(3, dtype=int), objective, rounds)


def test_normalise_weights_scales_them_to_sum_one():
    np.testing.assert_array_equal(voting.normalise_weights([2, 1, 1]), [0.5, 0.25, 0.25])
    np.testing.assert_array_equal(voting.normalise_weights([0, 3]), [0.0, 1.0])
    with pytest.raises(TrialError, match="every ensemble member has weight 0"):
        voting.normalise_weights([0.0, 0.0])
    with pytest.raises(ValueError, match=r"finite and non-negative, got \[1.0, inf\]"):
        voting.normalise_weights([1, float("inf")])


def test_stacked_vote_is_the_soft_vote_of_the_stack():
    members = np.array([[[1.0, 0.0]], [[0.0, 1.0]], [[0.5, 0.5]]], dtype=np.float32)
    np.testing.assert_allclose(voting.stacked_vote(members, [1, 1, 2]), [[0.5, 0.5]])
    np.testing.assert_array_equal(voting.stacked_vote(members, [1, 0, 0]), voting.soft_vote(list(members), [1, 0, 0]))
    with pytest.raises(ValueError, match="3 probability arrays but 2 weights"):
        voting.stacked_vote(members, [1, 1])
