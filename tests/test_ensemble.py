"""The soft vote, its metrics and the weight study, on synthetic member probabilities."""

from __future__ import annotations

import numpy as np
import optuna
import pytest
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.ensemble import VotingClassifier
from sklearn.frozen import FrozenEstimator

from tinyopt import ensemble, record
from tinyopt.errors import ConfigError, DataError, StudyError, TrialError

N_CLASSES = 10


def _member_probs(labels: np.ndarray, accuracy: float, sharpness: float, seed: int) -> np.ndarray:
    """Probabilities that put their peak on the true label for about ``accuracy`` of the samples."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(len(labels), N_CLASSES))
    right = rng.random(len(labels)) < accuracy
    peak = np.where(right, labels, rng.integers(0, N_CLASSES, len(labels)))
    logits[np.arange(len(labels)), peak] += 3.0
    exp = np.exp(sharpness * (logits - logits.max(axis=1, keepdims=True)))
    return (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)


def _predictions(accuracy: float, sharpness: float, seed: int, n: int = 300) -> dict[str, np.ndarray]:
    labels = {split: np.arange(n, dtype=np.int64) % N_CLASSES for split in ("selection", "test")}
    return {
        "selection_probs": _member_probs(labels["selection"], accuracy, sharpness, seed),
        "selection_labels": labels["selection"],
        "test_probs": _member_probs(labels["test"], accuracy, sharpness, seed + 100),
        "test_labels": labels["test"],
    }


@pytest.fixture(scope="module")
def members_and_predictions():
    """One good, calibrated member and two poor, overconfident ones that outvote it when equal."""
    members = [ensemble.Member("finetune", 12, "run-a", True), ensemble.Member("scratch", 3, "run-b"),
               ensemble.Member("pretrained", 0, "run-c", True)]
    predictions = [_predictions(0.8, 1.0, seed=1), _predictions(0.15, 4.0, seed=2),
                   _predictions(0.15, 4.0, seed=3)]
    return members, predictions


def test_soft_vote_normalises_weights():
    a = np.array([[0.9, 0.1], [0.2, 0.8]], dtype=np.float32)
    b = np.array([[0.5, 0.5], [0.6, 0.4]], dtype=np.float32)
    np.testing.assert_allclose(ensemble.soft_vote([a, b], [3, 1]), 0.75 * a + 0.25 * b, rtol=1e-6)
    np.testing.assert_allclose(ensemble.soft_vote([a, b], [0, 2]), b)


@pytest.mark.parametrize("weights, error", [([0, 0], TrialError), ([1, -1], ValueError),
                                            ([1, float("nan")], ValueError), ([1], ValueError)])
def test_soft_vote_rejects_bad_weights(weights, error):
    probs = np.full((2, 2), 0.5, dtype=np.float32)
    with pytest.raises(error):
        ensemble.soft_vote([probs, probs], weights)


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


def test_weighted_vote_equals_sklearn_voting_classifier(members_and_predictions):
    _, predictions = members_and_predictions
    probs = [p["selection_probs"] for p in predictions]
    labels = predictions[0]["selection_labels"]
    weights = [0.7, 0.2, 0.1]
    voter = VotingClassifier(
        [(f"m{i}", FrozenEstimator(_StoredProbabilities(p))) for i, p in enumerate(probs)],
        voting="soft", weights=weights,
    )
    index = np.arange(len(labels))[:, None]
    voter.fit(index, labels)  # frozen members: only the label encoder is fitted
    np.testing.assert_allclose(ensemble.soft_vote(probs, weights), voter.predict_proba(index), rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(ensemble.soft_vote(probs, weights).argmax(axis=1), voter.predict(index))


def test_weight_study_beats_uniform_vote(members_and_predictions):
    members, predictions = members_and_predictions
    search = ensemble.WeightSearch(members, predictions)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study.optimize(search, n_trials=40)
    best = study.best_trial
    assert set(best.params) == {"weight_finetune-12", "weight_scratch-3", "weight_pretrained-0"}
    uniform = search.uniform_scores["selection_top1"]
    good_alone = search.member_scores[0]["selection_top1"]
    assert uniform < good_alone - 0.05, "fixture: the poor members should drag the uniform vote down"
    assert best.value > uniform + 0.05
    assert best.user_attrs["selection_top1"] == best.value
    weights = {m["label"]: m["weight"] for m in best.user_attrs[record.MEMBERS]}
    assert sum(weights.values()) == pytest.approx(1.0)
    assert weights["finetune-12"] == max(weights.values())
    assert best.user_attrs[record.UNIFORM]["selection_top1"] == uniform


def test_log_loss_objective_is_maximised_as_minus_log_loss(members_and_predictions):
    members, predictions = members_and_predictions
    search = ensemble.WeightSearch(members, predictions, objective="log_loss")
    trial = optuna.trial.FixedTrial({m.param: w for m, w in zip(members, [1.0, 0.0, 0.0], strict=True)})
    assert search(trial) == pytest.approx(-search.member_scores[0]["selection_log_loss"], rel=1e-5)


def test_trial_attrs_round_trip_to_members_and_weights(members_and_predictions):
    members, predictions = members_and_predictions
    search = ensemble.WeightSearch(members, predictions)
    attr = search.members_attr([2.0, 1.0, 1.0])
    assert attr[0] == {"label": "finetune-12", "study": "finetune", "trial_number": 12, "run_id": "run-a",
                       "model_kept": True, "weight": 0.5, **ensemble._accuracies(search.member_scores[0])}
    assert ensemble.weights_of(attr) == (members, [0.5, 0.25, 0.25])


def test_comparison_rows(members_and_predictions):
    members, predictions = members_and_predictions
    rows = ensemble.WeightSearch(members, predictions).comparison([1.0, 0.0, 0.0])
    assert [r["name"] for r in rows] == ["finetune-12", "scratch-3", "pretrained-0", "uniform vote", "weighted vote"]
    assert rows[-1]["test_top1"] == rows[0]["test_top1"]
    assert set(rows[0]) == {"name", "weight", "selection_top1", "selection_top5", "test_top1", "test_top5"}


@pytest.mark.parametrize("key", ["selection_labels", "test_labels"])
def test_members_on_different_samples_are_rejected(members_and_predictions, key):
    members, predictions = members_and_predictions
    shifted = dict(predictions[1], **{key: np.roll(predictions[1][key], 1)})
    with pytest.raises(DataError, match="different (selection|test) samples"):
        ensemble.WeightSearch(members[:2], [predictions[0], shifted])


def test_unknown_objective_is_a_config_error(members_and_predictions):
    members, predictions = members_and_predictions
    with pytest.raises(ConfigError, match="ensemble.objective"):
        ensemble.WeightSearch(members, predictions, objective="top5")


def test_member_label_is_safe_for_mlflow():
    assert ensemble.Member("my study#2", 7, "r").param == "weight_my_study_2-7"


def _add_study(storage: str, name: str, values: list[float], state=optuna.trial.TrialState.COMPLETE):
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize")
    for i, value in enumerate(values):
        study.add_trial(optuna.trial.create_trial(
            state=state, value=value if state == optuna.trial.TrialState.COMPLETE else None,
            user_attrs={"mlflow_run_id": f"{name}-run-{i}", "model_kept": i == int(np.argmax(values))}))


def test_select_members_takes_best_k_of_each_study(tmp_path):
    storage = f"sqlite:///{tmp_path / 'studies.db'}"
    _add_study(storage, "finetune", [0.3, 0.5, 0.4])
    _add_study(storage, "scratch", [0.2, 0.1])
    _add_study(storage, "pretrained", [0.0], state=optuna.trial.TrialState.FAIL)
    members, skipped = ensemble.select_members(storage, ["finetune", "scratch", "pretrained", "other"], top_k=2)
    assert members == [ensemble.Member("finetune", 1, "finetune-run-1", True),
                       ensemble.Member("finetune", 2, "finetune-run-2", False),
                       ensemble.Member("scratch", 0, "scratch-run-0", True),
                       ensemble.Member("scratch", 1, "scratch-run-1", False)]
    assert skipped == ["study 'pretrained' has no complete trial",
                       "study 'other' does not exist; run `tinyopt sweep other` first"]
    with pytest.raises(StudyError, match="at least 2 members, found 1.*no complete trial"):
        ensemble.select_members(storage, ["finetune", "pretrained"])
