"""`tinyopt plan` as a person runs it: a forecast that creates nothing, its JSON, and the sweep that keeps it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import optuna
import pytest
from mlflow import MlflowClient
from sweep_helpers import SMALL

from tinyopt.core import record
from tinyopt.core.forecast import Forecast

ENV = {**os.environ, "COLUMNS": "200"}


def _tinyopt(*args, cwd):
    return subprocess.run([sys.executable, "-m", "tinyopt", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, env=ENV, timeout=600)


def _overrides(items):
    return [part for item in items for part in ("--set", item)]


@pytest.fixture(scope="module")
def planned(tmp_path_factory, tiny_folder):
    """``tinyopt plan scratch --json`` of a small space, run in an empty folder, and what the folder holds after."""
    work = tmp_path_factory.mktemp("plan")
    cache = tmp_path_factory.mktemp("plan_cache")
    done = _tinyopt("plan", "scratch", "--trials", 3, "--data", tiny_folder, "--cache", cache, "--json",
                    *_overrides(SMALL["scratch"]), cwd=work)
    return work, cache, done


def test_plan_prints_its_forecast_as_json_and_creates_nothing(planned):
    work, _cache, done = planned
    assert done.returncode == 0, done.stderr
    forecast = Forecast.from_dict(json.loads(done.stdout))
    assert forecast.approach == "scratch" and forecast.trials == 3 and forecast.workers == 1
    labels = [c.label for c in forecast.configs]
    assert labels[0] == "defaults" and "sample 1" in labels
    for cost in forecast.configs:
        assert cost.setup_s > 0 and cost.epoch_s > 0 and cost.trial_s > cost.setup_s and cost.model_params > 0
    assert forecast.trial_s > 0 and forecast.wall_s > forecast.startup_s > 0
    assert 1 <= forecast.epochs_per_trial <= forecast.max_epochs
    assert forecast.disk["predictions"] > 0 and forecast.disk["activation_cache"] == 0  # scratch caches nothing
    assert list(work.iterdir()) == [], "plan must create no study, no run, no file"


def test_plan_renders_a_table_and_the_sweep_figures(tmp_path, tiny_folder, planned):
    _work, cache, _done = planned
    fixed = [*SMALL["scratch"], "space.dropout=0.1", "space.augment=flip", "space.label_smoothing=0",
             "space.residual=false", "space.initializer=he_normal", "space.weight_decay=0.0001",
             "space.decay=cosine", "space.stem_stride=1"]
    done = _tinyopt("plan", "scratch", "--trials", 4, "--timeout", 3600, "--workers", 2, "--cache", cache,
                    *_overrides(fixed), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for fragment in ("s/epoch", "s/trial", "peak memory", "defaults", "epochs per trial under the hyperband pruner",
                     "the sweep:", "--timeout 1h 00m: about 4 trials end within it", "kept models",
                     "nothing was created"):
        assert fragment in out, out
    assert "most expensive" not in out  # nothing costly is searched here: the defaults are the corner
    assert list(tmp_path.iterdir()) == []


def test_a_sweep_keeps_the_forecast_and_shows_it_beside_what_happened(tmp_path, tiny_folder, planned):
    _work, cache, done = planned
    (tmp_path / "plan.json").write_text(done.stdout)
    swept = _tinyopt("sweep", "scratch", "--trials", 2, "--cache", cache, "--forecast", "plan.json",
                     *_overrides(SMALL["scratch"]), cwd=tmp_path)
    assert swept.returncode == 0, swept.stdout + swept.stderr
    study = optuna.load_study(study_name="scratch", storage=f"sqlite:///{tmp_path}/studies/tinyopt.db")
    assert Forecast.from_dict(study.user_attrs[record.FORECAST]) == Forecast.from_dict(json.loads(done.stdout))
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    parent = client.get_run(study.user_attrs[record.PARENT_RUN_ID])
    expected = Forecast.from_dict(json.loads(done.stdout))
    # Metrics are logged at 4 significant digits.
    assert parent.data.metrics[record.FORECAST_TRIAL_SECONDS] == pytest.approx(expected.trial_s, rel=1e-3)
    assert parent.data.metrics[record.FORECAST_WALL_SECONDS] == pytest.approx(expected.trial_s * 2, rel=1e-3)
    assert parent.data.metrics[record.WALL_SECONDS] > 0 and parent.data.metrics[record.TRIAL_SECONDS_MEAN] > 0
    assert "**Forecast**" in parent.data.tags[record.TAG_DESCRIPTION]
    reported = _tinyopt("report", "--out", "report", cwd=tmp_path)
    assert reported.returncode == 0, reported.stderr
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "## Forecast of scratch against what happened" in markdown
    assert "| wall time of 2 trials (seconds) |" in markdown
    # A second forecast does not replace the one the study was made with (--max-trials 2: no trial starts).
    other = json.loads(done.stdout)
    (tmp_path / "other.json").write_text(json.dumps({**other, "trial_s": other["trial_s"] * 10}))
    again = _tinyopt("sweep", "scratch", "--max-trials", 2, "--cache", cache, "--forecast", "other.json",
                     *_overrides(SMALL["scratch"]), cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    kept = optuna.load_study(study_name="scratch", storage=f"sqlite:///{tmp_path}/studies/tinyopt.db"
                             ).user_attrs[record.FORECAST]
    assert Forecast.from_dict(kept) == Forecast.from_dict(json.loads(done.stdout))


def test_a_damaged_forecast_file_is_refused_before_anything_is_created(tmp_path):
    (tmp_path / "plan.json").write_text('{"approach": "scratch", "configs": [')
    done = _tinyopt("sweep", "scratch", "--trials", 1, "--forecast", "plan.json", cwd=tmp_path)
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert done.returncode != 0 and len(lines) == 1, lines
    assert "plan.json is not a forecast of `tinyopt plan --json`" in lines[0] and "tinyopt plan scratch" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]


def test_plan_refuses_an_ensemble_with_one_line(tmp_path):
    done = _tinyopt("plan", "ensemble", cwd=tmp_path)
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert done.returncode != 0 and len(lines) == 1 and "tinyopt plan forecasts the model approaches" in lines[0]
