"""End-to-end sweeps on the generated fixture: Optuna trial states and their MLflow runs."""

from __future__ import annotations

import keras
import numpy as np
import optuna
import pytest
from mlflow.entities import LoggedModelStatus
from sweep_helpers import SMALL, artifacts, failing_build, runs_of

from tinyopt.core import record
from tinyopt.core.config import load_config
from tinyopt.core.errors import StudyError
from tinyopt.objectives.model import QuietEvents
from tinyopt.sweep import runner, sampling
from tinyopt.track import names as run_names
from tinyopt.track import store as mlflow_store


@pytest.fixture
def stores(tmp_path):
    return {"storage": f"sqlite:///{tmp_path}/studies/tinyopt.db",
            "tracking_uri": f"sqlite:///{tmp_path}/mlruns/mlflow.db"}


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    return tmp_path_factory.mktemp("sweep_cache")


def sweep(approach, stores, tiny_folder, cache_root, trials, *extra, **kwargs):
    return runner.run_sweep(approach, trials=trials, source=str(tiny_folder), cache_dir=str(cache_root),
                            overrides=SMALL[approach] + extra, progress=False, **stores, **kwargs)


def load_study(stores, name):
    return optuna.load_study(study_name=name, storage=stores["storage"])


@pytest.mark.backend  # CI runs it under JAX as well as TensorFlow
@pytest.mark.parametrize("approach", ["scratch", "finetune", "pretrained"])
def test_sweep_records_every_trial_in_mlflow(approach, stores, tiny_folder, cache_root):
    result = sweep(approach, stores, tiny_folder, cache_root, 2)
    study = load_study(stores, approach)
    states = [t.state for t in study.trials]
    assert states == [optuna.trial.TrialState.COMPLETE] * 2
    assert result.counts["COMPLETE"] == 2 and len(result.top) == 2
    client, parents, children = runs_of(stores, approach)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(children) == [0, 1]
    for trial in study.trials:
        run = children[trial.number]
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert run.data.tags["approach"] == approach and run.data.tags["trial_state"] == "COMPLETE"
        assert run.data.tags["device"] == "cpu"
        assert run.data.tags["keras_backend"] == keras.backend.backend()
        assert run.data.tags["precision"] == "float32"  # auto: no mixed precision on a CPU
        assert run.data.tags["jit_compile"] in ("True", "False") and run.data.tags["eval_batch_size"] == "32"
        assert not any(key.startswith("system/") for key in run.data.metrics)  # auto: only with a GPU
        assert trial.user_attrs[record.RUN_ID] == run.info.run_id
        assert trial.user_attrs[record.RUN_URL].endswith(f"#/experiments/{run.info.experiment_id}/runs/"
                                                         f"{run.info.run_id}?workflowType=machine_learning")
        # The searched params and a few identifying ones, not the resolved config (an artifact and a hash).
        identifying = {"approach", "backbone", "weights", "data", record.CONFIG_HASH} & set(run.data.params)
        assert set(run.data.params) == set(trial.params) | identifying
        assert {"approach", "data", record.CONFIG_HASH} <= identifying and len(run.data.params) <= 20
        for name, value in trial.params.items():
            assert run.data.params[name] == run_names.param_text(value)  # 4 significant digits
        assert run.data.params[record.CONFIG_HASH] == run_names.config_hash(study.user_attrs["config"])
        # Named after the trial and the params study.run_name lists; every value in the description.
        assert run.info.run_name.startswith(f"t{trial.number}")
        description = run.data.tags[record.TAG_DESCRIPTION]
        assert all(f"| {key} |" in description for key in trial.user_attrs[record.PARAMS])
        # Final scores once, under names no per-epoch series has; 4 significant digits.
        final = {key: value for key, value in run.data.metrics.items() if key.startswith(record.FINAL_PREFIX)}
        assert {record.final(key) for key in record.SCORES} <= set(final)
        assert final[record.final("selection_top1")] == pytest.approx(trial.value, abs=5e-5)
        for key in final:
            assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [0], key
        assert all(len(repr(value)) <= 12 for value in run.data.metrics.values()), run.data.metrics
        # What serving its model costs, whatever the study optimises: a metric and a user attr.
        for key in record.COSTS:
            assert run.data.metrics[key] > 0 and run.data.metrics[key] == pytest.approx(trial.user_attrs[key], rel=1e-3)
        names = artifacts(client, run.info.run_id)
        assert {"predictions.npz", "config.json", "classes.tsv"} <= names
        if approach != "pretrained":
            assert "learning_curve.png" in names
            for key in record.EPOCH_METRICS:
                steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
                assert steps == [1, 2], key  # one point per epoch, counted from 1
            assert not {"loss", "accuracy", "selection_accuracy", "learning_rate"} & set(run.data.metrics)
        else:
            assert not set(record.EPOCH_METRICS) & set(run.data.metrics)
        # A kept model is an MLflow logged model of this run, and its run says so.
        kept = trial.user_attrs[record.MODEL_KEPT]
        assert run.data.tags[record.TAG_MODEL_KEPT] == str(kept).lower()
        assert len(run.outputs.model_outputs if run.outputs else []) == int(kept)
        if kept:
            model = client.get_logged_model(run.outputs.model_outputs[0].model_id)
            assert model.source_run_id == run.info.run_id and model.status == LoggedModelStatus.READY
            assert run.data.tags[record.TAG_MODEL_URI] == f"models:/{model.model_id}"
    assert study.trials[0].user_attrs[record.MODEL_KEPT]  # the first complete trial is always the best so far
    # The best tag: exactly the best trial's run.
    tagged = [number for number, run in children.items() if run.data.tags.get(record.TAG_BEST) == "true"]
    assert tagged == [study.best_trial.number]
    # The parent run is the sweep's summary.
    parent = client.get_run(parents[0].info.run_id)
    history = client.get_metric_history(parent.info.run_id, record.BEST_SO_FAR)
    assert [m.step for m in history] == [0, 1]
    assert history[-1].value == pytest.approx(study.best_value, abs=5e-5)
    assert history[0].value == pytest.approx(study.trials[0].value, abs=5e-5)
    assert parent.data.metrics[f"{record.COUNT_PREFIX}complete"] == 2
    assert parent.data.metrics[f"{record.COUNT_PREFIX}failed"] == 0
    assert parent.data.metrics[record.COMPUTE_SECONDS] > 0
    assert parent.data.tags[record.TAG_BEST_TRIAL] == str(study.best_trial.number)
    assert parent.data.tags[record.TAG_BEST_RUN] == children[study.best_trial.number].info.run_id
    assert f"Best: trial {study.best_trial.number}" in parent.data.tags[record.TAG_DESCRIPTION]
    assert {record.HISTORY, record.CONFIG_FILE} <= artifacts(client, parent.info.run_id)
    assert parent.data.params["approach"] == approach
    assert study.metric_names == [record.OBJECTIVE_NAME]


def test_gpu_settings_can_be_forced_on_a_cpu(stores, tiny_folder, cache_root, monkeypatch):
    """MLflow's system metrics, bfloat16 and the automatic evaluation batch, asked for on a CPU."""
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
    sweep("scratch", stores, tiny_folder, cache_root, 1, "train.system_metrics=true",
          "train.mixed_precision=bfloat16", "train.eval_batch_size=auto", "train.jit_compile=false")
    client, _, children = runs_of(stores, "scratch")
    run = children[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["precision"] == "mixed_bfloat16" and run.data.tags["jit_compile"] == "False"
    assert run.data.tags["eval_batch_size"] == "256"  # auto on a CPU
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(run.data.metrics)
    assert np.isfinite(run.data.metrics[record.final("selection_top1")])


@pytest.mark.backend
def test_predictions_and_kept_model_reproduce_the_trial(stores, tiny_folder, cache_root):
    import keras

    from tinyopt.data import build
    from tinyopt.data import cache as data

    sweep("scratch", stores, tiny_folder, cache_root, 1)
    trial = load_study(stores, "scratch").trials[0]
    run_id = trial.user_attrs["mlflow_run_id"]
    saved = mlflow_store.load_predictions(run_id, stores["tracking_uri"])
    cache = build.prepare(str(tiny_folder), str(cache_root), progress=False)
    x_sel, y_sel = data.load_split("selection", cache)
    _, y_test = data.load_split("test", cache)
    assert saved["selection_probs"].shape == (len(y_sel), 5) and saved["selection_probs"].dtype == np.float32
    np.testing.assert_array_equal(saved["selection_labels"], y_sel)
    np.testing.assert_array_equal(saved["test_labels"], y_test)
    assert np.mean(saved["selection_probs"].argmax(1) == y_sel) == pytest.approx(trial.value)
    model = keras.models.load_model(mlflow_store.download_model(run_id, stores["tracking_uri"], cache_root / run_id))
    predicted = model.predict(np.asarray(x_sel), verbose=0)
    assert isinstance(predicted, np.ndarray) and predicted.shape == saved["selection_probs"].shape
    np.testing.assert_allclose(predicted, saved["selection_probs"], atol=1e-5)


def test_a_study_keeps_the_objectives_it_was_made_with(stores):
    runner.open_sweep("scratch", "scratch", load_config("scratch"), **stores)
    both = load_config("scratch", overrides=['study.objectives=["selection_top1", "latency_ms"]'])
    with pytest.raises(StudyError) as err:
        runner.open_sweep("scratch", "scratch", both, **stores)
    assert str(err.value) == ("study 'scratch' optimises study.objectives = [\"selection_top1\"], not "
                              "[\"selection_top1\", \"latency_ms\"]; pass --study with another name for the new "
                              "objectives, or --set 'study.objectives=[\"selection_top1\"]' to continue it")
    session = runner.open_sweep("scratch", "both", both, **stores)
    assert session.study.metric_names == [record.SELECTION_TOP1, record.LATENCY_MS]  # optuna-dashboard's names
    assert [d.name for d in session.study.directions] == ["MAXIMIZE", "MINIMIZE"]
    assert session.notes == [sampling.pruning_note(both.study)]
    session.tracker.end_sweep()


def test_rerun_continues_the_same_study_and_parent_run(stores, tiny_folder, cache_root):
    sweep("scratch", stores, tiny_folder, cache_root, 1)
    # Without --data the prepared cache is used as it is (no download of the official archive).
    result = runner.run_sweep("scratch", trials=2, cache_dir=str(cache_root), overrides=SMALL["scratch"],
                              progress=False, **stores)
    assert result.new_trials == 2 and len(load_study(stores, "scratch").trials) == 3
    _, parents, children = runs_of(stores, "scratch")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED" and sorted(children) == [0, 1, 2]
    with pytest.raises(StudyError, match="holds scratch trials"):
        sweep("finetune", stores, tiny_folder, cache_root, 1, study_name="scratch")


def test_first_trial_runs_the_space_defaults(stores, tiny_folder, cache_root):
    from tinyopt.core.config import load_config
    from tinyopt.core.space import defaults

    sweep("scratch", stores, tiny_folder, cache_root, 1)
    config = load_config("scratch", overrides=SMALL["scratch"])
    assert load_study(stores, "scratch").trials[0].user_attrs["params"] == defaults(config.space)


class _PruneTrialOne(optuna.pruners.BasePruner):
    def prune(self, study, trial):
        return trial.number == 1


def test_a_pruned_trial_run_is_finished_and_says_where_it_was_pruned(stores, tiny_folder, cache_root, monkeypatch):
    monkeypatch.setattr(sampling, "make_pruner", lambda *args: _PruneTrialOne())
    sweep("scratch", stores, tiny_folder, cache_root, 2)
    states = [t.state for t in load_study(stores, "scratch").trials]
    assert states == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED]
    client, _, children = runs_of(stores, "scratch")
    assert children[1].info.status == "FINISHED" and children[1].data.tags["trial_state"] == "PRUNED"
    assert children[1].data.tags[record.TAG_OUTCOME].startswith("pruned after epoch 1 of 2 by _PruneTrialOne")
    assert record.TRIAL_SECONDS in children[1].data.metrics
    assert len(client.get_metric_history(children[1].info.run_id, record.SELECTION_TOP1)) == 1


class _PruneEverything(optuna.pruners.BasePruner):
    def prune(self, study, trial):
        return True


def test_a_trial_that_trained_its_last_epoch_completes_where_the_pruner_would_prune(stores, tiny_folder, cache_root,
                                                                                    monkeypatch):
    """The pruner judges every epoch but the last: a trial that finished its schedule keeps its result."""
    monkeypatch.setattr(sampling, "make_pruner", lambda *args: _PruneEverything())
    sweep("scratch", stores, tiny_folder, cache_root, 1, "space.epochs=2", study_name="two")
    sweep("scratch", stores, tiny_folder, cache_root, 1, "space.epochs=1", study_name="one")
    two, one = load_study(stores, "two").trials[0], load_study(stores, "one").trials[0]
    assert two.state.name == "PRUNED" and list(two.intermediate_values) == [1]
    assert one.state.name == "COMPLETE" and list(one.intermediate_values) == [1]
    assert one.user_attrs[record.MODEL_KEPT] and "test_top1" in one.user_attrs


def test_early_stopping_waits_for_a_cooldown(stores, tiny_folder, cache_root):
    """A rate too small to change anything: no epoch improves, so patience 0 stops a trial after its second
    epoch, unless its decay is a cooldown, which early stopping only watches from its first cooldown epoch."""
    frozen = ("space.epochs=4", "space.learning_rate=1e-12", "train.early_stopping_patience=0")
    for decay in ("constant", "cooldown"):
        sweep("scratch", stores, tiny_folder, cache_root, 1, *frozen, f"space.decay={decay}", study_name=decay)
    assert len(load_study(stores, "constant").trials[0].intermediate_values) == 2
    cooled = load_study(stores, "cooldown").trials[0]
    assert len(cooled.intermediate_values) == 4 and cooled.user_attrs[record.BEST_EPOCH] == 4


def test_failed_trial_is_recorded_and_the_sweep_goes_on(stores, tiny_folder, cache_root, monkeypatch):
    failing_build(monkeypatch, lambda number: number == 1)
    result = sweep("scratch", stores, tiny_folder, cache_root, 3)
    states = [t.state.name for t in load_study(stores, "scratch").trials]
    assert states == ["COMPLETE", "FAIL", "COMPLETE"] and result.counts["FAIL"] == 1
    client, parents, children = runs_of(stores, "scratch")
    assert children[1].info.status == "FAILED"
    assert "out of memory (simulated)" in children[1].data.tags["fail_reason"]
    assert "traceback.txt" in artifacts(client, children[1].info.run_id)
    assert parents[0].info.status == "FINISHED"


def test_a_run_whose_every_trial_failed_is_an_error(stores, tiny_folder, cache_root, monkeypatch):
    failing_build(monkeypatch, lambda number: True)
    with pytest.raises(StudyError, match="all 2 trials of this run failed.*out of memory"):
        sweep("scratch", stores, tiny_folder, cache_root, 2)  # fewer than max_consecutive_failures (5)
    _, parents, _ = runs_of(stores, "scratch")
    assert parents[0].info.status == "FAILED"


def test_consecutive_failures_stop_the_sweep(stores, tiny_folder, cache_root, monkeypatch):
    failing_build(monkeypatch, lambda number: True)
    with pytest.raises(StudyError, match="2 consecutive failed trials.*out of memory"):
        sweep("scratch", stores, tiny_folder, cache_root, 10, "study.max_consecutive_failures=2")
    assert len(load_study(stores, "scratch").trials) == 2
    _, parents, _ = runs_of(stores, "scratch")
    assert parents[0].info.status == "FAILED"


class _InterruptAtTrialOne(QuietEvents):
    def trial_started(self, number, epochs):
        if number == 1:
            raise KeyboardInterrupt


def test_ctrl_c_closes_the_runs(stores, tiny_folder, cache_root):
    with pytest.raises(KeyboardInterrupt):
        sweep("scratch", stores, tiny_folder, cache_root, 3, events=_InterruptAtTrialOne())
    study = load_study(stores, "scratch")
    assert study.trials[0].state.name == "COMPLETE"
    _, parents, children = runs_of(stores, "scratch")
    assert parents[0].info.status == "KILLED"
    assert children[1].info.status == "KILLED"


def test_trials_per_process_runs_the_sweep_in_fresh_processes(stores, tiny_folder, cache_root):
    import os

    from click.testing import CliRunner

    from tinyopt.cli import cli

    args = ["sweep", "scratch", "--trials", "3", "--trials-per-process", "2", "--data", str(tiny_folder),
            "--cache", str(cache_root), "--storage", stores["storage"], "--tracking-uri", stores["tracking_uri"]]
    for item in SMALL["scratch"]:
        args += ["--set", item]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert [t.state.name for t in load_study(stores, "scratch").trials] == ["COMPLETE"] * 3
    _, parents, children = runs_of(stores, "scratch")
    assert len(parents) == 1 and sorted(children) == [0, 1, 2]
    workers = [children[n].data.tags["worker"] for n in (0, 1, 2)]
    assert workers[0] == workers[1] != workers[2]
    assert not any(w.endswith(f":{os.getpid()}") for w in workers)



def test_the_models_of_the_best_k_trials_are_kept(stores, tiny_folder, cache_root, monkeypatch):
    from tinyopt.objectives import model as objectives
    from tinyopt.train import metrics

    # Selection top-1 of trials 0..3 as chosen here: each new trial enters the top 2 and pushes one out.
    chosen = iter([0.1, 0.3, 0.2, 0.4])

    def scores(probs, labels):
        found = metrics.scores(probs, labels)
        if len(labels) == selection_size:
            found["top1"] = next(chosen)
        return found

    from tinyopt.data import build
    from tinyopt.data import cache as data

    cache = build.prepare(str(tiny_folder), str(cache_root), progress=False)
    selection_size = len(data.load_split("selection", cache)[1])
    monkeypatch.setattr(objectives, "scores", scores)
    sweep("scratch", stores, tiny_folder, cache_root, 4, "study.keep_models=2")
    study = load_study(stores, "scratch")
    assert [t.value for t in study.trials] == [0.1, 0.3, 0.2, 0.4]
    # Each was among the best two when it ended, so each stored its model ...
    assert [t.user_attrs[record.MODEL_KEPT] for t in study.trials] == [True] * 4
    client, _, children = runs_of(stores, "scratch")
    kept = {n for n, run in children.items() if run.data.tags[record.TAG_MODEL_KEPT] == "true"}
    # ... and the models of trials 0 and 2 were deleted when they dropped out of the best two.
    assert kept == {1, 3}
    live = {m.model_id for m in client.search_logged_models(experiment_ids=[children[0].info.experiment_id])}
    for number, run in children.items():
        assert (run.outputs.model_outputs[0].model_id in live) == (number in kept), number
        assert (record.TAG_MODEL_URI in run.data.tags) == (number in kept)
    assert mlflow_store.download_model(children[3].info.run_id, stores["tracking_uri"], cache_root / "kept").is_file()
    with pytest.raises(StudyError, match="kept no model"):
        mlflow_store.download_model(children[0].info.run_id, stores["tracking_uri"], cache_root / "dropped")


def test_a_trial_training_at_the_deadline_stops_and_is_pruned(stores, tiny_folder, cache_root):
    from sweep_helpers import LONG, start_sweep

    # Trials of 400 epochs: without the deadline the first one alone would train for minutes.
    process = start_sweep(["--timeout", "40", "--trials", "5", "--data", tiny_folder, "--cache", cache_root,
                           "--storage", stores["storage"], "--tracking-uri", stores["tracking_uri"]], LONG)
    output = process.communicate(timeout=600)[0]
    assert process.returncode == 0, output
    trials = load_study(stores, "scratch").trials
    assert len(trials) == 1 and trials[0].state.name == "PRUNED", output
    stop = trials[0].user_attrs[record.DEADLINE_STOP]
    reported = len(trials[0].intermediate_values)  # the partial epoch included
    assert 0 < stop["epochs"] < 400 and reported - 1 < stop["epochs"] <= reported
    assert "trial 0 was still training at the --timeout deadline" in output
    assert "1 pruned" in output
    client, parents, children = runs_of(stores, "scratch")
    assert children[0].info.status == "FINISHED" and parents[0].info.status == "FINISHED"
    assert children[0].data.tags[record.TAG_OUTCOME].startswith("stopped at the --timeout deadline")
    history = client.get_metric_history(children[0].info.run_id, record.SELECTION_TOP1)
    assert max(m.step for m in history) == len(trials[0].intermediate_values)
