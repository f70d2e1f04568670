"""The soft vote, calibration, greedy selection, its metrics and the weight study, on synthetic member probabilities."""

from __future__ import annotations

import numpy as np
import optuna
import pytest
from scipy.special import softmax
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.ensemble import VotingClassifier
from sklearn.frozen import FrozenEstimator

from tinyopt.core import record
from tinyopt.core.config import load_config
from tinyopt.core.errors import ConfigError, DataError, StudyError, TrialError
from tinyopt.core.summary import MemberRecord
from tinyopt.objectives import ensemble, voting
from tinyopt.train.metrics import scores

SCRATCH = load_config("scratch")  # the config the stand-in trial runs are logged with
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


def _drawn(n: int, seed: int, scale: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """True logits ``(n, N_CLASSES)`` and labels drawn from their softmax: ``softmax(logits)`` is calibrated."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=scale, size=(n, N_CLASSES))
    labels = (rng.random(n)[:, None] < softmax(logits, axis=1).cumsum(axis=1)).argmax(axis=1)
    return logits, labels


def _flat(n: int, seed: int) -> np.ndarray:
    """A chance-level member: near-uniform probabilities whose top class is noise."""
    probs = 1 / N_CLASSES + np.random.default_rng(seed).normal(scale=1e-4, size=(n, N_CLASSES))
    return probs / probs.sum(axis=1, keepdims=True)


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
    np.testing.assert_allclose(voting.soft_vote(probs, weights), voter.predict_proba(index), rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(voting.soft_vote(probs, weights).argmax(axis=1), voter.predict(index))


@pytest.mark.parametrize("overconfidence", [0.4, 1.0, 2.5])
def test_fit_temperature_recovers_how_miscalibrated_a_member_is(overconfidence):
    logits, labels = _drawn(3000, seed=7)
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
    logits, labels = _drawn(1000, seed=0)
    rng = np.random.default_rng(9)
    noise = [softmax(rng.normal(scale=2.0, size=logits.shape), axis=1) for _ in range(3)]
    for objective, least in (("log_loss", 0.95), ("top1", 0.7)):
        weights = voting.greedy_weights(np.stack([softmax(logits, axis=1), *noise]), labels, objective)
        assert weights.sum() == pytest.approx(1.0)
        assert weights[0] >= least, (objective, weights)


def test_greedy_picks_both_complementary_members():
    """Each member knows the labels of half the samples and is uniform on the other half."""
    logits, labels = _drawn(1000, seed=1)
    half = (np.arange(len(labels)) % 2 == 0)[:, None]
    members = np.stack([softmax(np.where(half, logits, 0), axis=1), softmax(np.where(half, 0, logits), axis=1)])
    weights = voting.greedy_weights(members, labels, rounds=50)
    assert weights.min() >= 0.4, weights
    vote = scores(voting.soft_vote(list(members), weights), labels)["log_loss"]
    assert vote < min(scores(member, labels)["log_loss"] for member in members)


def test_greedy_keeps_a_chance_level_member_out_of_a_calibrated_vote():
    logits, labels = _drawn(1000, seed=2)
    weights = voting.greedy_weights(np.stack([softmax(logits, axis=1), _flat(1000, seed=3)]), labels)
    assert weights.tolist() == [1.0, 0.0]


@pytest.mark.parametrize("objective, rounds, error", [("top5", 50, "objective"), ("log_loss", 0, "rounds")])
def test_greedy_rejects_bad_settings(objective, rounds, error):
    with pytest.raises(ValueError, match=error):
        voting.greedy_weights(np.full((2, 3, 4), 0.25), np.zeros(3, dtype=int), objective, rounds)


def test_calibration_keeps_a_chance_level_member_out_of_the_vote():
    """What calibration fixes: raw, a near-uniform member wins weight by flattening an over-confident one."""
    drawn = {split: _drawn(1000, seed) for split, seed in (("selection", 11), ("test", 12))}
    labels = {f"{split}_labels": y for split, (_, y) in drawn.items()}
    sharp = {**labels, **{f"{split}_probs": softmax(3 * logits, axis=1) for split, (logits, _) in drawn.items()}}
    flat = {**labels, "selection_probs": _flat(1000, 13), "test_probs": _flat(1000, 14)}
    raw = voting.greedy_weights(np.stack([sharp["selection_probs"], flat["selection_probs"]]),
                                  labels["selection_labels"])
    assert raw[1] > 0.2, "fixture: uncalibrated, the flat member smooths the over-confident one"
    search = ensemble.WeightSearch([ensemble.Member("finetune", 0, "a"), ensemble.Member("scratch", 0, "b")],
                                   [sharp, flat])
    assert search.temperatures[0] == pytest.approx(3.0, rel=0.15)
    assert search.greedy.tolist() == [1.0, 0.0]
    assert search.best_index == 0


def test_weight_study_starts_from_greedy_and_beats_the_uniform_vote(members_and_predictions):
    members, predictions = members_and_predictions
    search = ensemble.WeightSearch(members, predictions)
    assert search.objective == "log_loss"
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study.enqueue_trial(search.greedy_params())
    study.optimize(search, n_trials=30)
    first, best = study.trials[0], study.best_trial
    greedy = search.value(search.evaluate(search.greedy))
    assert first.params == search.greedy_params() and first.value == pytest.approx(greedy)
    assert best.value >= greedy > search.value(search.uniform_scores)
    assert best.value == -best.user_attrs["selection_log_loss"]
    weights = {m["label"]: m["weight"] for m in best.user_attrs[record.MEMBERS]}
    assert sum(weights.values()) == pytest.approx(1.0)
    assert weights["finetune-12"] == max(weights.values())
    assert best.user_attrs[record.UNIFORM] == search.uniform_scores
    assert best.user_attrs[record.BEST_MEMBER] == {"label": "finetune-12", **search.member_scores[0]}


def test_top1_objective_is_selection_top1(members_and_predictions):
    members, predictions = members_and_predictions
    search = ensemble.WeightSearch(members, predictions, objective="top1")
    trial = optuna.trial.FixedTrial(search.greedy_params())
    assert search(trial) == trial.user_attrs["selection_top1"]


def test_log_loss_objective_is_maximised_as_minus_log_loss(members_and_predictions):
    members, predictions = members_and_predictions
    search = ensemble.WeightSearch(members, predictions, objective="log_loss")
    trial = optuna.trial.FixedTrial({m.param: w for m, w in zip(members, [1.0, 0.0, 0.0], strict=True)})
    assert search(trial) == pytest.approx(-search.member_scores[0]["selection_log_loss"], rel=1e-5)


def test_trial_attrs_round_trip_to_members_weights_and_temperatures(members_and_predictions):
    members, predictions = members_and_predictions
    search = ensemble.WeightSearch(members, predictions)
    attr = search.members_attr([2.0, 1.0, 1.0])
    assert attr[0] == {"label": "finetune-12", "study": "finetune", "trial_number": 12, "run_id": "run-a",
                       "model_kept": True, "weight": 0.5, "temperature": search.temperatures[0],
                       **search.member_scores[0]}
    recorded = [MemberRecord.from_attr(m) for m in attr]
    assert [m.as_attr() for m in recorded] == attr  # read back, the record is what was stored
    assert ensemble.weights_of(recorded) == (members, [0.5, 0.25, 0.25], search.temperatures)
    recorded_before_calibration = [MemberRecord.from_attr({k: v for k, v in m.items() if k != "temperature"})
                                   for m in attr]
    assert ensemble.weights_of(recorded_before_calibration)[2] == [None, None, None]


def test_comparison_rows(members_and_predictions):
    members, predictions = members_and_predictions
    rows = ensemble.WeightSearch(members, predictions).comparison([1.0, 0.0, 0.0])
    assert [r["name"] for r in rows] == ["finetune-12", "scratch-3", "pretrained-0", "best member (finetune-12)",
                                         "uniform vote", "weighted vote"]
    assert rows[-1]["test_top1"] == rows[3]["test_top1"] == rows[0]["test_top1"]
    assert set(rows[0]) == {"name", "weight", "temperature", "selection_top1", "selection_top5",
                            "selection_log_loss", "test_top1", "test_top5", "test_log_loss"}


def test_ensemble_defaults_and_greedy_rounds_are_checked_when_the_config_loads():
    settings = load_config("ensemble").ensemble
    assert (settings.top_k, settings.objective, settings.greedy_rounds) == (5, "log_loss", 50)
    # Whatever ensemble the defaults find can be exported: every approach keeps its top_k members' models.
    assert all(load_config(approach).study.keep_models >= settings.top_k for approach in settings.studies)
    with pytest.raises(ConfigError, match="ensemble.greedy_rounds: got 0; expected an integer >= 1"):
        load_config("ensemble", overrides=["ensemble.greedy_rounds=0"])


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


def test_ensemble_sweep_enqueues_the_greedy_weights_first(tmp_path, members_and_predictions):
    """The runner's first ensemble trial is the greedy one, so the study's best is at least the greedy vote."""
    from tinyopt.sweep.runner import run_sweep
    from tinyopt.track import store as mlflow_store
    from tinyopt.track import tracking

    _, predictions = members_and_predictions
    stores = {"storage": f"sqlite:///{tmp_path / 'studies.db'}", "tracking_uri": f"sqlite:///{tmp_path / 'mlruns.db'}"}
    members = []
    for name, saved in zip(("good", "poor", "worse"), predictions, strict=True):
        tracker = tracking.Tracker(stores["tracking_uri"], name, name)
        tracker.start_sweep({"approach": name}, {}, tags={})
        run = tracker.start_trial(0, {}, SCRATCH, tags={})
        run.log_predictions(saved)
        run.end("COMPLETE")
        tracker.end_sweep()
        study = optuna.create_study(study_name=name, storage=stores["storage"], direction="maximize")
        study.add_trial(optuna.trial.create_trial(value=0.5, user_attrs={record.RUN_ID: run.run_id}))
        members.append(ensemble.Member(name, 0, run.run_id))
    run_sweep("ensemble", trials=4, progress=False, overrides=('ensemble.studies=["good", "poor", "worse"]',),
              **stores)
    search = ensemble.WeightSearch(members, predictions)
    study = optuna.load_study(study_name="ensemble", storage=stores["storage"])
    first = study.trials[0]
    assert first.params == pytest.approx(search.greedy_params())
    assert first.value == pytest.approx(search.value(search.evaluate(search.greedy)))
    assert study.best_value >= first.value
    assert first.user_attrs[record.BEST_MEMBER]["label"] == "good-0"
    run = mlflow_store.get_run(first.user_attrs[record.RUN_ID], stores["tracking_uri"])
    assert run.data.metrics[record.final("best_member_test_top1")] == pytest.approx(
        search.member_scores[0]["test_top1"], abs=5e-5)
    assert run.data.metrics[record.final("uniform_selection_log_loss")] == pytest.approx(
        search.uniform_scores["selection_log_loss"], rel=5e-4)  # MLflow metrics keep 4 significant digits
    assert float(run.data.params["temperature_good-0"]) == pytest.approx(search.temperatures[0], rel=1e-3)
