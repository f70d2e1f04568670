"""The ensemble's weight study: members, their calibrated vote, its metrics and sweep, on synthetic probabilities."""

from __future__ import annotations

import numpy as np
import optuna
import pytest
from fixtures import drawn_logits, flat_member, member_predictions
from scipy.special import softmax

from tinyopt.core import objective as objectives
from tinyopt.core import record
from tinyopt.core.config import load_config
from tinyopt.core.errors import ConfigError, DataError, StudyError
from tinyopt.core.summary import MemberRecord
from tinyopt.objectives import ensemble, voting

SCRATCH = load_config("scratch")  # the config the stand-in trial runs are logged with


@pytest.fixture(scope="module")
def members_and_predictions():
    """One good, calibrated member and two poor, overconfident ones that outvote it when equal."""
    members = [ensemble.Member("finetune", 12, "run-a", True), ensemble.Member("scratch", 3, "run-b"),
               ensemble.Member("pretrained", 0, "run-c", True)]
    predictions = [member_predictions(0.8, 1.0, seed=1), member_predictions(0.15, 4.0, seed=2),
                   member_predictions(0.15, 4.0, seed=3)]
    return members, predictions


def test_calibration_keeps_a_chance_level_member_out_of_the_vote():
    """What calibration fixes: raw, a near-uniform member wins weight by flattening an over-confident one."""
    drawn = {split: drawn_logits(1000, seed) for split, seed in (("selection", 11), ("test", 12))}
    labels = {f"{split}_labels": y for split, (_, y) in drawn.items()}
    sharp = {**labels, **{f"{split}_probs": softmax(3 * logits, axis=1) for split, (logits, _) in drawn.items()}}
    flat = {**labels, "selection_probs": flat_member(1000, 13), "test_probs": flat_member(1000, 14)}
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
    assert objectives.of_study(study) == objectives.LOG_LOSS  # a new study minimises the plain log loss
    first = study.trials[0]
    assert first.params == pytest.approx(search.greedy_params())
    assert first.value == pytest.approx(search.evaluate(search.greedy)["selection_log_loss"])
    assert study.best_value <= first.value
    assert first.user_attrs[record.BEST_MEMBER]["label"] == "good-0"
    for trial in study.trials:  # the Optuna params are the shares the run and the members attr show
        assert sum(trial.params.values()) == pytest.approx(1.0, abs=1e-9)
        shares = [m["weight"] for m in trial.user_attrs[record.MEMBERS]]
        assert [trial.params[m.param] for m in members] == pytest.approx(shares, abs=1e-12)
    run = mlflow_store.get_run(first.user_attrs[record.RUN_ID], stores["tracking_uri"])
    assert run.info.run_name == "t0 w=" + "/".join(f"{w:.2f}" for w in search.greedy)
    assert float(run.data.params["temperature_good-0"]) == pytest.approx(search.temperatures[0], rel=1e-3)
    assert float(run.data.params["weight_good-0"]) == round(search.greedy[0], 3)
    # A trial logs what varies between trials; the references, the same for all, are the parent's.
    assert run.data.metrics[record.final("selection_log_loss")] == pytest.approx(first.value, rel=5e-4)
    assert not [key for key in run.data.metrics if key.startswith(("final_uniform_", "final_best_member_"))]
    parent = mlflow_store.get_run(study.user_attrs[record.PARENT_RUN_ID], stores["tracking_uri"])
    assert parent.data.metrics[record.final("best_member_test_top1")] == pytest.approx(
        search.member_scores[0]["test_top1"], abs=5e-5)
    assert parent.data.metrics[record.final("uniform_selection_log_loss")] == pytest.approx(
        search.uniform_scores["selection_log_loss"], rel=5e-4)  # MLflow metrics keep 4 significant digits


class _Run:
    """Stands in for a ``TrialRun``: keeps what is logged to it."""

    def __init__(self):
        self.metrics: dict[str, float] = {}

    def log_metrics(self, metrics, step=0):
        self.metrics.update(metrics)

    def log_text(self, text, name):
        pass

    def log_figure(self, figure, name):
        pass


class _Tracker:
    def __init__(self):
        self.parent = _Run()

    def parent_run(self):
        return self.parent


@pytest.mark.parametrize("objective, value_of", [
    (None, lambda scores: scores["selection_log_loss"]),  # a new study of objective "log_loss": minimised
    (objectives.Objective("minus_selection_log_loss", maximize=True), lambda scores: -scores["selection_log_loss"]),
    (objectives.TOP1, lambda scores: scores["selection_top1"]),
])
def test_ensemble_objective_returns_the_value_of_the_studys_objective(members_and_predictions, objective, value_of):
    members, predictions = members_and_predictions
    search = ensemble.WeightSearch(members, predictions)
    tracker = _Tracker()
    tracked = ensemble.EnsembleObjective(search, load_config("ensemble"), tracker, None, objective=objective)
    assert tracked.objective == (objective or objectives.LOG_LOSS)
    params = search.greedy_params()
    run = _Run()
    value = tracked.evaluate(optuna.trial.FixedTrial(params), params, run)
    assert value == pytest.approx(value_of(search.evaluate(search.greedy)))
    assert set(run.metrics) == {record.final(key) for key in search.evaluate(search.greedy)}
    assert set(tracker.parent.metrics) == {record.final(f"{name}_{key}") for name in ("uniform", "best_member")
                                           for key in search.uniform_scores}


def test_ensemble_run_name_and_params_show_the_shares(members_and_predictions):
    from tinyopt.track.names import run_name

    members, predictions = members_and_predictions
    search = ensemble.WeightSearch(members, predictions)
    tracked = ensemble.EnsembleObjective(search, load_config("ensemble"), _Tracker(), None)
    params = {m.param: w for m, w in zip(members, [0.1234, 0.4, 0.4766], strict=True)}
    assert run_name(29, tracked.headline(params)) == "t29 w=0.12/0.40/0.48"
    logged = tracked.logged_params(optuna.trial.FixedTrial(params), params)
    assert logged == {"weight_finetune-12": 0.123, "weight_scratch-3": 0.4, "weight_pretrained-0": 0.477,
                      **{f"temperature_{m.label}": float(f"{t:.4g}")
                         for m, t in zip(members, search.temperatures, strict=True)}}
    raw = {m.param: w for m, w in zip(members, [2.0, 1.0, 1.0], strict=True)}  # weights given otherwise
    assert run_name(3, tracked.headline(raw)) == "t3 w=0.50/0.25/0.25"
    assert run_name(4, tracked.headline(dict.fromkeys(raw, 0.0))) == "t4 w=0.00/0.00/0.00"
