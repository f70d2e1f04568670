"""SIGINT, SIGTERM and SIGKILL sent to a real ``tinyopt sweep`` process in the middle of a trial."""

from __future__ import annotations

import re
import signal
import uuid

import pytest
from sweep_helpers import (
    LONG,
    POSTGRES,
    SMALL,
    drop_postgres_study,
    needs_postgres,
    runs_of,
    start_sweep,
    trials_of,
    wait_for_training,
)

from tinyopt.core import record, signals
from tinyopt.sweep import runner

# TensorFlow's C++ start-up lines (glog format, absl's notice): none may reach the terminal.
_CPP_LINE = re.compile(r"^[IWE]\d{4} \d\d:\d\d:\d\d|absl::InitializeLog")


@pytest.fixture
def stores(request, tmp_path):
    name = f"scratch-{uuid.uuid4().hex[:8]}"
    url = POSTGRES if request.param == "postgresql" else f"sqlite:///{tmp_path}/studies/tinyopt.db"
    yield {"storage": url, "tracking_uri": f"sqlite:///{tmp_path}/mlruns/mlflow.db", "study": name}
    drop_postgres_study(name)


def _sweep(stores, tiny_folder, cache, overrides=LONG):
    return start_sweep(["--trials", "2", "--data", tiny_folder, "--cache", cache, "--study", stores["study"],
                        "--storage", stores["storage"], "--tracking-uri", stores["tracking_uri"]], overrides)


def _next_run(stores, cache):
    return runner.run_sweep("scratch", trials=1, cache_dir=str(cache), overrides=SMALL["scratch"],
                            study_name=stores["study"], storage=stores["storage"],
                            tracking_uri=stores["tracking_uri"], progress=False)


@pytest.mark.parametrize("stores", ["sqlite", pytest.param("postgresql", marks=needs_postgres)], indirect=True)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_mid_trial_ends_the_sweep_cleanly(signum, stores, tiny_folder, tmp_path):
    name = signal.Signals(signum).name
    sweep = _sweep(stores, tiny_folder, tmp_path / "cache")
    number = wait_for_training(stores["storage"], stores["study"], sweep)
    sweep.send_signal(signum)
    output = sweep.communicate(timeout=120)[0]
    assert sweep.returncode == 128 + signum, output
    assert "Traceback" not in output and f"interrupted by {name}" in output
    assert "trials run on cpu" in output and not any(_CPP_LINE.search(line) for line in output.splitlines())
    # SIGTERM is how a cluster preempts a job (study.requeue = "sigterm"): the trial is queued again.
    preempted = signum == signal.SIGTERM
    reason = f"interrupted by {name}" + ("; queued again, to resume from its last checkpoint" if preempted else "")
    trials = trials_of(stores["storage"], stores["study"])
    assert [t.state.name for t in trials] == ["FAIL"] + ["WAITING"] * preempted and trials[0].number == number
    assert trials[0].user_attrs[record.FAIL_REASON] == reason
    assert (f"trial {number} was stopped by SIGTERM and queued again as trial {number + 1}" in output) is preempted
    _, parents, children = runs_of(stores, stores["study"])
    assert parents[0].info.status == "KILLED"
    assert children[number].info.status == "KILLED"
    assert children[number].data.tags["fail_reason"] == reason
    # Nothing is left RUNNING, so the next run has nothing to recover; a queued trial is the one it runs.
    result = _next_run(stores, tmp_path / "cache")
    assert result.recovered == [] and result.exit_code == 0
    trials = trials_of(stores["storage"], stores["study"])
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]
    assert (trials[1].params == trials[0].params) is preempted  # a preempted configuration is not lost
    _, parents, children = runs_of(stores, stores["study"])
    assert [parent.info.status for parent in parents] == ["FINISHED"]
    assert [children[n].info.status for n in sorted(children)] == ["KILLED", "FINISHED"]


@pytest.mark.parametrize("stores", ["sqlite"], indirect=True)
def test_a_killed_sweep_is_recovered_by_the_next_run(stores, tiny_folder, tmp_path):
    sweep = _sweep(stores, tiny_folder, tmp_path / "cache")
    number = wait_for_training(stores["storage"], stores["study"], sweep)
    sweep.kill()
    sweep.wait()
    killed = trials_of(stores["storage"], stores["study"])[number]
    assert killed.state.name == "RUNNING"
    _, _, children = runs_of(stores, stores["study"])
    assert children[number].info.status == "RUNNING"

    result = _next_run(stores, tmp_path / "cache")
    assert len(result.recovered) == 1 and f"recovered trial {number}" in result.recovered[0]
    trials = trials_of(stores["storage"], stores["study"])
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]
    retry = trials[1]
    assert retry.system_attrs["failed_trial"] == number and retry.params == killed.params
    assert f"queued again as trial {retry.number}" in result.recovered[0]
    _, parents, children = runs_of(stores, stores["study"])
    assert children[number].info.status == "FAILED" and "is gone" in children[number].data.tags["fail_reason"]
    assert children[retry.number].info.status == "FINISHED" and parents[0].info.status == "FINISHED"
    assert _next_run(stores, tmp_path / "cache").recovered == []  # recovered once, not again


@pytest.mark.parametrize(("setting", "queued"), [
    ("sigterm", {"SIGTERM"}), ("sigterm+sigint", {"SIGTERM", "SIGINT"}), ("never", set()),
    (None, set()),  # a study stored before the setting
])
def test_study_requeue_says_which_signal_is_a_preemption(setting, queued):
    stops = {"SIGTERM": signals.Interrupted(signal.SIGTERM), "SIGINT": signals.Interrupted(signal.SIGINT)}
    assert {name for name, stop in stops.items() if signals.requeues(setting, stop)} == queued
    assert not signals.requeues(setting, KeyboardInterrupt())  # no signal named: a plain interrupt
