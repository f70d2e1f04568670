"""A trial killed or preempted part-way resumes from its last epoch's checkpoint: real processes, real signals."""

from __future__ import annotations

import signal
import uuid

import pytest
from sweep_helpers import (
    POSTGRES,
    SMALL,
    drop_postgres_study,
    needs_postgres,
    runs_of,
    start_sweep,
    trials_of,
    wait_for_training,
)

from tinyopt.core import record
from tinyopt.sweep import runner

# Six epochs, a checkpoint after each; early stopping cannot end the trial first.
SIX = (*SMALL["scratch"], "space.epochs=6", "train.early_stopping_patience=50", "train.checkpoint=epoch")


@pytest.fixture
def stores(request, tmp_path):
    name = f"resume-{uuid.uuid4().hex[:8]}"
    url = POSTGRES if request.param == "postgresql" else f"sqlite:///{tmp_path}/studies/tinyopt.db"
    yield {"storage": url, "tracking_uri": f"sqlite:///{tmp_path}/mlruns/mlflow.db", "study": name,
           "checkpoints": tmp_path / "checkpoints"}
    drop_postgres_study(name)


def _sweep(stores, data, cache, *extra):
    return start_sweep(["--trials", "1", "--data", data, "--cache", cache, "--study", stores["study"],
                        "--storage", stores["storage"], "--tracking-uri", stores["tracking_uri"], *extra],
                       (*SIX, f"train.checkpoint_dir={stores['checkpoints']}"))


def _run(stores, cache, study=None, trials=1, max_trials=None):
    return runner.run_sweep("scratch", trials=trials, max_trials=max_trials, cache_dir=str(cache),
                            overrides=(*SIX, f"train.checkpoint_dir={stores['checkpoints']}"),
                            study_name=study or stores["study"], storage=stores["storage"],
                            tracking_uri=stores["tracking_uri"], progress=False)


def _stop_after_epoch(stores, process, epochs: int, signum: int) -> int:
    """Send ``signum`` once the running trial has reported ``epochs`` epochs (checkpointed before each report)."""
    number = wait_for_training(stores["storage"], stores["study"], process, epochs=epochs, every=0.1)
    process.send_signal(signum)
    return number


def _epochs_logged(client, run) -> tuple[list[int], list[int]]:
    """The epochs a run's curve shows, and those of them that this run trained (logged after it started)."""
    history = client.get_metric_history(run.info.run_id, record.EPOCH_SECONDS)
    return [m.step for m in history], [m.step for m in history if m.timestamp >= run.info.start_time]


def _finals(run) -> dict[str, float]:
    return {key: value for key, value in run.data.metrics.items() if key.startswith(record.FINAL_PREFIX)}


@pytest.mark.slow
@pytest.mark.parametrize("stores", ["sqlite", pytest.param("postgresql", marks=needs_postgres)], indirect=True)
def test_a_trial_killed_at_epoch_3_of_6_trains_epochs_4_to_6_only_and_ends_as_if_never_killed(
        stores, tiny_folder, tmp_path):
    sweep = _sweep(stores, tiny_folder, tmp_path / "cache")
    number = _stop_after_epoch(stores, sweep, 3, signal.SIGKILL)
    sweep.wait(timeout=60)
    killed = trials_of(stores["storage"], stores["study"])[number]
    assert killed.state.name == "RUNNING" and sorted(killed.intermediate_values)[:3] == [1, 2, 3]

    result = _run(stores, tmp_path / "cache")
    assert len(result.recovered) == 1 and f"queued again as trial {number + 1}" in result.recovered[0]
    trials = trials_of(stores["storage"], stores["study"])
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]
    retry = trials[1]
    resumed = retry.user_attrs[record.RESUMED_FROM_EPOCH]
    assert resumed >= 3 and retry.params == killed.params
    assert retry.user_attrs[record.SEED] == killed.user_attrs[record.SEED]  # the seed of the trial it replaces
    assert sorted(retry.intermediate_values) == [1, 2, 3, 4, 5, 6]
    client, _, children = runs_of(stores, stores["study"])
    shown, trained = _epochs_logged(client, children[retry.number])
    assert shown == [1, 2, 3, 4, 5, 6] and trained == list(range(resumed + 1, 7))  # one curve; 0 epochs retrained
    assert children[retry.number].data.tags[record.TAG_RESUMED_FROM_EPOCH] == str(resumed)
    dead = children[number]
    assert dead.info.status == "FAILED" and "is gone" in dead.data.tags[record.FAIL_REASON]
    assert dead.data.tags[record.TAG_TAKEN_OVER_BY] == retry.user_attrs[record.RUN_URL]
    assert list(stores["checkpoints"].rglob("*")) == []  # deleted when the trial ended

    # The same trial, never killed: same seed (trial 0 of a study of the same sampler seed), same epochs.
    reference = _run(stores, tmp_path / "cache", study=f"{stores['study']}-uninterrupted")
    assert reference.counts["COMPLETE"] == 1
    _, _, uninterrupted = runs_of(stores, f"{stores['study']}-uninterrupted")
    assert trials_of(stores["storage"], f"{stores['study']}-uninterrupted")[0].params == retry.params
    assert _finals(children[retry.number]) == pytest.approx(_finals(uninterrupted[0]), abs=2e-3)
    drop_postgres_study(f"{stores['study']}-uninterrupted")


@pytest.mark.slow
@pytest.mark.parametrize("stores", ["sqlite"], indirect=True)
def test_sigterm_mid_trial_queues_it_again_and_the_next_run_resumes_it(stores, tiny_folder, tmp_path):
    sweep = _sweep(stores, tiny_folder, tmp_path / "cache")
    number = _stop_after_epoch(stores, sweep, 2, signal.SIGTERM)
    output = sweep.communicate(timeout=120)[0]
    assert sweep.returncode == 143, output
    assert f"trial {number} was stopped by SIGTERM and queued again as trial {number + 1}" in output
    trials = trials_of(stores["storage"], stores["study"])
    assert [t.state.name for t in trials] == ["FAIL", "WAITING"]
    assert trials[0].user_attrs[record.PREEMPTED_BY] == "SIGTERM"
    assert list(stores["checkpoints"].rglob("epoch-*"))  # kept for the retry

    result = _run(stores, tmp_path / "cache")
    assert result.recovered == [] and result.exit_code == 0
    trials = trials_of(stores["storage"], stores["study"])
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]
    assert trials[1].user_attrs[record.RESUMED_FROM_EPOCH] >= 2
    client, _, children = runs_of(stores, stores["study"])
    assert children[number].info.status == "KILLED"
    assert children[number].data.tags[record.TAG_TAKEN_OVER_BY] == trials[1].user_attrs[record.RUN_URL]
    assert _epochs_logged(client, children[number + 1])[0] == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
@pytest.mark.parametrize("stores", ["sqlite"], indirect=True)
def test_max_trials_counts_a_preempted_trial_once_through_its_retry(stores, tiny_folder, tmp_path):
    sweep = _sweep(stores, tiny_folder, tmp_path / "cache", "--max-trials", "2")
    _stop_after_epoch(stores, sweep, 1, signal.SIGTERM)
    assert sweep.wait(timeout=120) == 143
    # The requeued job runs the same command again, twice: the study is full after the retry and one more.
    assert _run(stores, tmp_path / "cache", trials=5, max_trials=2).exit_code == 0
    assert _run(stores, tmp_path / "cache", trials=5, max_trials=2).exit_code == 0
    states = [t.state.name for t in trials_of(stores["storage"], stores["study"])]
    assert states[0] == "FAIL" and len(states) == 3 and set(states[1:]) <= {"COMPLETE", "PRUNED"}
