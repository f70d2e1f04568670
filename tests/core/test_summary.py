"""A study as its trials add up: counts, compute time and the best trial, typed; ensemble members and gains."""

from __future__ import annotations

import datetime

import optuna
import pytest

from tinyopt.core import record
from tinyopt.core.config import load_config
from tinyopt.core.errors import StudyError
from tinyopt.core.summary import BestTrial, MemberRecord, members_of, pick, study_config, summarize_study

T0 = datetime.datetime(2025, 1, 1, 12, 0, 0)
MEMBER = {"label": "finetune-12", "study": "finetune", "trial_number": 12, "run_id": "run-a", "model_kept": True,
          "weight": 0.75, "temperature": 1.5, "selection_top1": 0.6, "selection_top5": 0.9, "test_top1": 0.5,
          "test_top5": 0.8, "selection_log_loss": 1.2, "test_log_loss": 1.4}


def _trial(state, value=None, params=None, attrs=None):
    distributions = {key: optuna.distributions.FloatDistribution(0, 1) for key in params or {}}
    return optuna.trial.create_trial(state=state, value=value, params=params, distributions=distributions,
                                     user_attrs=attrs)


def _timed(trial, seconds):
    trial.datetime_start, trial.datetime_complete = T0, T0 + datetime.timedelta(seconds=seconds)
    return trial


def _study() -> optuna.Study:
    study = optuna.create_study(study_name="mine", direction="maximize")
    study.set_user_attr(record.APPROACH, "scratch")
    study.set_user_attr(record.CONFIG, load_config("scratch").as_dict())
    complete = optuna.trial.TrialState.COMPLETE
    study.add_trial(_timed(_trial(complete, 0.4, params={"lr": 0.1}, attrs={record.SELECTION_TOP1: 0.4}), 10))
    best_attrs = {record.SELECTION_TOP1: 0.6, record.TEST_TOP1: 0.5, record.TEST_LOG_LOSS: 1.3,
                  record.RUN_ID: "run-1", record.MODEL_KEPT: True, record.PARAMS: {"lr": 0.2, "epochs": 3}}
    study.add_trial(_timed(_trial(complete, 0.6, params={"lr": 0.2}, attrs=best_attrs), 20))
    study.add_trial(_timed(_trial(optuna.trial.TrialState.PRUNED, params={"lr": 0.3}), 5))
    study.add_trial(_timed(_trial(optuna.trial.TrialState.FAIL), 1))
    return study


def test_summarize_study_counts_times_and_types_the_best_trial():
    summary = summarize_study(_study())
    assert (summary.name, summary.approach) == ("mine", "scratch")
    assert summary.counts == {"COMPLETE": 2, "PRUNED": 1, "FAIL": 1, "RUNNING": 0}
    assert summary.compute_seconds == pytest.approx(36.0)
    assert summary.best == BestTrial(number=1, value=0.6, scores={"selection_top1": 0.6, "test_top1": 0.5},
                                     params={"lr": 0.2, "epochs": 3}, run_id="run-1", model_kept=True,
                                     log_losses={"test_log_loss": 1.3})
    assert summary.best.gains() == {} and summary.best.versus() == []  # not an ensemble


def test_a_study_without_a_complete_trial_has_no_best():
    study = optuna.create_study(study_name="finetune")
    study.add_trial(_trial(optuna.trial.TrialState.FAIL))
    summary = summarize_study(study)
    assert summary.best is None and summary.approach == "finetune"  # named after its approach
    assert summary.counts["FAIL"] == 1 and summary.compute_seconds == 0


def _two_objective_study() -> optuna.Study:
    """Selection top-1 against latency: trials 1 and 3 tie on top-1, 3 is faster; 2 is the fastest; 0 is beaten."""
    study = optuna.create_study(study_name="fast", directions=["maximize", "minimize"])
    with pytest.warns(optuna.exceptions.ExperimentalWarning):
        study.set_metric_names([record.SELECTION_TOP1, record.LATENCY_MS])
    for top1, ms in ((0.5, 6.0), (0.7, 9.0), (0.4, 2.0), (0.7, 5.0)):
        attrs = {record.SELECTION_TOP1: top1, record.TEST_TOP1: top1 - 0.1, record.LATENCY_MS: ms,
                 record.MODEL_PARAMS: 1000.0 * ms}
        study.add_trial(optuna.trial.create_trial(values=[top1, ms], user_attrs=attrs))
    study.add_trial(_trial(optuna.trial.TrialState.PRUNED))
    return study


def test_a_study_of_two_objectives_has_its_pareto_front_and_the_front_s_most_accurate_as_best():
    study = _two_objective_study()
    summary = summarize_study(study)
    assert [t.number for t in summary.front] == [3, 2]  # Optuna's front, the most accurate first
    assert {t.number for t in study.best_trials} == {3, 2}
    assert summary.best == summary.front[0] and summary.best.value == 0.7  # of trials 1 and 3 (tied), the faster
    assert summary.front[1].costs == {record.LATENCY_MS: 2.0, record.MODEL_PARAMS: 2000.0}
    assert [o.name for o in summary.objectives] == [record.SELECTION_TOP1, record.LATENCY_MS]
    assert summarize_study(_study()).front == []  # one objective: no front


def test_pick_makes_any_complete_trial_the_one_exported_and_refuses_the_others():
    study = _two_objective_study()
    summary = summarize_study(study)
    picked = pick(summary, study, 0)
    assert picked.picked and picked.best.number == 0 and picked.best.costs[record.LATENCY_MS] == 6.0
    assert picked.chosen.startswith("Trial 0, picked by number (`tinyopt best fast --trial 0`) among the 4 complete")
    assert summary.chosen.startswith("The best of 4 complete trials (1 pruned, 0 failed)")
    for number, fragment in ((9, "study 'fast' has no trial 9 (its trials are 0 to 4)"),
                             (4, "trial 4 of study 'fast' is pruned, not complete")):
        with pytest.raises(StudyError) as err:
            pick(summary, study, number)
        message = str(err.value)
        assert fragment in message and "`tinyopt best fast` shows its best and its Pareto front" in message


def test_study_config_is_the_stored_config_typed():
    assert study_config(_study()) == load_config("scratch")


def test_member_record_round_trips_its_attr():
    member = MemberRecord.from_attr(MEMBER)
    assert (member.label, member.trial_number, member.weight, member.temperature) == ("finetune-12", 12, 0.75, 1.5)
    assert member.scores == {key: MEMBER[key] for key in (*record.SCORES, *record.LOG_LOSSES)}
    assert member.as_attr() == MEMBER
    before_calibration = MemberRecord.from_attr({k: v for k, v in MEMBER.items() if k != "temperature"})
    assert before_calibration.temperature is None


def _ensemble_best(best_member=None) -> BestTrial:
    other = {**MEMBER, "label": "scratch-3", "study": "scratch", "trial_number": 3, "selection_top1": 0.7,
             "test_top1": 0.45}
    return BestTrial(number=4, value=0.8, scores={"selection_top1": 0.8, "test_top1": 0.65}, params={},
                     run_id="run-e", model_kept=False, members=[MemberRecord.from_attr(m) for m in (MEMBER, other)],
                     uniform={"selection_top1": 0.75, "test_top1": 0.6}, best_member=best_member,
                     log_losses={"selection_log_loss": 0.9})


def test_gains_are_over_the_best_member_and_the_uniform_vote():
    gains = _ensemble_best(("finetune-12", {"selection_top1": 0.6, "test_top1": 0.5})).gains()
    assert gains == pytest.approx({"selection_top1_over_best_member": 0.2, "selection_top1_over_uniform": 0.05,
                                   "test_top1_over_best_member": 0.15, "test_top1_over_uniform": 0.05})
    # Recorded before best_member was: the member of the best selection top-1.
    assert _ensemble_best().gains()["test_top1_over_best_member"] == pytest.approx(0.2)


def test_versus_lists_the_weighted_vote_the_best_member_and_the_uniform_vote():
    best = _ensemble_best()
    assert best.versus() == [("weighted vote", {"selection_top1": 0.8, "test_top1": 0.65, "selection_log_loss": 0.9}),
                             ("best member scratch-3", best.members[1].scores),
                             ("uniform vote", {"selection_top1": 0.75, "test_top1": 0.6})]


def test_members_of_reads_the_members_attr():
    trial = _trial(optuna.trial.TrialState.COMPLETE, 0.8, attrs={record.MEMBERS: [MEMBER]})
    assert members_of(trial) == [MemberRecord.from_attr(MEMBER)]
    assert members_of(_trial(optuna.trial.TrialState.COMPLETE, 0.5)) == []
