"""The forecast record: read back from plan's JSON (refusing a damaged one), compared with the trials, the ETA."""

from __future__ import annotations

import datetime as dt
import json

import optuna
import pytest

from tinyopt.core import forecast, record
from tinyopt.core.errors import ConfigError
from tinyopt.core.forecast import Actual, ConfigCost, Forecast


def _forecast(**changes) -> Forecast:
    cost = ConfigCost(label="defaults", params={"epochs": 3}, setup_s=2.0, epoch_s=4.0, score_s=1.0, trial_s=16.0,
                      epochs=3, cache_build_s=0.0, cache_bytes=0, model_params=10, model_bytes=40, peak_memory=None)
    values = dict(approach="scratch", device="cpu", trials=4, workers=2, timeout=None, pruner="median",
                  configs=[cost], startup_s=5.0, epochs_per_trial=2.5, max_epochs=3, trial_s=12.0, cache_keys=0.0,
                  wall_s=29.0, fits=None, peak_memory=None, disk={"models": 1, "predictions": 2, "activation_cache": 0},
                  parallel=2)
    return Forecast(**{**values, **changes})


def _trial(start: float, seconds: float, epochs: int, state=optuna.trial.TrialState.COMPLETE):
    began = dt.datetime(2026, 1, 1) + dt.timedelta(seconds=start)
    finished = state.is_finished()
    return optuna.trial.FrozenTrial(
        number=0, trial_id=0, state=state, value=0.5 if state.name == "COMPLETE" else None, params={},
        distributions={}, user_attrs={}, system_attrs={}, intermediate_values={e: 0.1 for e in range(1, epochs + 1)},
        datetime_start=began, datetime_complete=began + dt.timedelta(seconds=seconds) if finished else None)


def test_the_json_of_plan_reads_back_as_the_same_forecast(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(_forecast().as_dict()))
    assert forecast.read(path, "scratch") == _forecast()
    assert forecast.stored(_forecast().as_dict()) == _forecast()


@pytest.mark.parametrize("content, fragment", [
    (None, "cannot read the forecast"),
    ("{not json", "is not a forecast of `tinyopt plan --json`"),
    ("[1, 2]", "is not a forecast"),
    (json.dumps({"approach": "scratch"}), "is not a forecast"),
    (json.dumps({**_forecast().as_dict(), "trial_s": "soon"}), "a figure is not a number"),
    (json.dumps({**_forecast().as_dict(), "wall_s": -1}), "a figure is not a number"),
    (json.dumps(_forecast(approach="finetune").as_dict()), "forecasts a finetune sweep, not scratch"),
])
def test_a_missing_damaged_or_foreign_forecast_is_one_line_naming_the_fix(tmp_path, content, fragment):
    path = tmp_path / "plan.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError) as err:
        forecast.read(path, "scratch")
    message = str(err.value)
    assert fragment in message and "tinyopt plan scratch" in message and "\n" not in message


def test_a_damaged_stored_forecast_is_no_forecast():
    assert forecast.stored(None) is None
    assert forecast.stored({"approach": "scratch"}) is None
    assert forecast.stored("text") is None


def test_actual_figures_come_from_the_finished_trials():
    trials = [_trial(0, 10, 3), _trial(10, 30, 1, optuna.trial.TrialState.PRUNED), _trial(40, 20, 2),
              _trial(60, 0, 0, optuna.trial.TrialState.RUNNING)]
    actual = Actual.of_study(trials)
    assert actual == Actual(trials=3, wall_s=60.0, trial_s=20.0, epochs_per_trial=2.0)
    assert Actual.of_study(trials[3:]) is None


def test_comparison_scales_the_wall_time_to_the_trials_that_ran_and_the_workers():
    actual = Actual(trials=3, wall_s=27.0, trial_s=20.0, epochs_per_trial=2.0)
    figures = forecast.metrics(_forecast(), actual)
    assert figures[record.FORECAST_WALL_SECONDS] == pytest.approx(12.0 * 3 / 2)
    assert figures[record.WALL_SECONDS] == 27.0
    rows = {row[0]: row[1:] for row in forecast.comparison(_forecast(), actual)}
    assert rows["seconds per trial"] == ("12.0", "20.0", "1.67x")
    assert rows["epochs per trial"] == ("2.5", "2.0", "0.80x")
    assert rows["wall time of 3 trials (seconds)"] == ("18.0", "27.0", "1.50x")


@pytest.mark.parametrize("durations, left, running, expected, deadline, eta", [
    ([], 3, 0.0, None, None, None),  # nothing tells yet
    ([], 3, 0.0, 10.0, None, 30.0),  # the forecast's trial before any ends
    ([4.0, 6.0], 3, 2.0, 10.0, None, 13.0),  # the trials so far, less what the running one did
    ([4.0, 6.0], 3, 20.0, None, None, 0.0),  # a slow running trial: never below 0
    ([4.0, 6.0], 3, 0.0, None, 7.0, 7.0),  # never past --timeout
    ([], 3, 0.0, None, 7.0, 7.0),
])
def test_eta_is_the_trials_left_at_the_mean_so_far(durations, left, running, expected, deadline, eta):
    assert forecast.eta(durations, left, running, expected, deadline) == eta
