"""Shared by the sweep tests: small search spaces for the fixture, real sweep processes, stores, read-back."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import optuna
import pytest
from mlflow import MlflowClient

from tinyopt.stores import storage
from tinyopt.track import names as run_names

POSTGRES = os.environ.get("TINYOPT_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test")

SMALL = {
    "scratch": ("space.stages=2", "space.width=8", "space.blocks=1", "space.epochs=2", "space.batch_size=16",
                "space.batch_norm=true", "space.learning_rate=0.01", "space.optimizer=adam", "space.warmup_epochs=0",
                "train.eval_batch_size=32"),
    "finetune": ("model.backbone=mobilenet", "model.alpha=0.25", "model.weights=none", "space.input_size=64",
                 "space.epochs=2", "space.batch_size=16", "space.trainable_stages=1", "train.eval_batch_size=32"),
    "pretrained": ("model.backbone=mobilenet", "model.alpha=0.25", "model.weights=none", "space.input_size=64",
                   "train.eval_batch_size=32"),
}
# A scratch trial that trains for minutes unless it is stopped (no early stop on the easy fixture).
LONG = (*SMALL["scratch"], "space.epochs=400", "train.early_stopping_patience=400")


def postgres_reachable() -> bool:
    try:
        import psycopg

        psycopg.connect(POSTGRES.replace("postgresql+psycopg", "postgresql"), connect_timeout=3).close()
        return True
    except Exception:  # noqa: BLE001 - any failure means "not here"
        return False


needs_postgres = pytest.mark.skipif(not postgres_reachable(),
                                    reason=f"no PostgreSQL server at {POSTGRES} (set TINYOPT_TEST_POSTGRES)")


def drop_postgres_study(name: str) -> None:
    if postgres_reachable():
        try:
            optuna.delete_study(study_name=name, storage=POSTGRES)
        except KeyError:
            pass


def earlier_study(url, name="earlier", values=(0.1, 0.5, 0.3, 0.4, 0.2), approach="scratch", direction="maximize"):
    """A study to warm-start from, made without training: one complete trial per value (trial i has dropout
    0.05 * i; ranked 1, 3, 2, 4, 0 by the default values) and a pruned one."""
    from tinyopt.core import record
    from tinyopt.core import space as search_space
    from tinyopt.core.config import load_config

    space = load_config("scratch").space
    study = optuna.create_study(study_name=name, storage=storage.open_storage(url), direction=direction)
    study.set_user_attr(record.APPROACH, approach)
    for number, value in enumerate(values):
        searched = {"dropout": round(0.05 * number, 2), "augment": "flip", "stem_stride": 2}
        study.add_trial(optuna.trial.create_trial(
            params=searched, value=value,
            distributions={key: search_space.distribution(space[key]) for key in searched},
            user_attrs={record.PARAMS: {**searched, "epochs": 30, "head": "gone"}}))
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.PRUNED))
    return study


def start_sweep(args, overrides=SMALL["scratch"], approach="scratch", **popen):
    """A real ``tinyopt sweep`` process (output in ``.stdout``, stderr merged)."""
    command = [sys.executable, "-m", "tinyopt", "sweep", approach, *map(str, args)]
    for item in overrides:
        command += ["--set", item]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def trials_of(url, name):
    """The study's trials, wherever it lives (its SQLite file or the journal of its workers); [] if none."""
    try:
        return storage.load_study(name, url).get_trials(deepcopy=False)
    except Exception:  # noqa: BLE001 - the study, or its file, may not exist yet
        return []


def wait_for_training(url, name, process, timeout=240, epochs=1, every=0.3):
    """The number of a RUNNING trial that has reported ``epochs`` epochs (it is training), waiting for one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        running = [t for t in trials_of(url, name)
                   if t.state.name == "RUNNING" and len(t.intermediate_values) >= epochs]
        if running:
            return running[0].number
        if process.poll() is not None:
            pytest.fail(f"the sweep ended before training {epochs} epoch(s): {process.communicate()[0]}")
        time.sleep(every)
    process.kill()
    pytest.fail(f"no trial had trained {epochs} epoch(s) after {timeout} s: {process.communicate()[0]}")


def runs_of(stores, study):
    client = MlflowClient(stores["tracking_uri"])
    experiment = client.get_experiment_by_name(run_names.experiment_name(study))
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = {int(r.data.tags["trial_number"]): r for r in runs if "mlflow.parentRunId" in r.data.tags}
    return client, parents, children


def artifacts(client, run_id, path=""):
    names = set()
    for item in client.list_artifacts(run_id, path):
        names |= artifacts(client, run_id, item.path) if item.is_dir else {item.path}
    return names


def failing_build(monkeypatch, fail_when):
    """Make the scratch model's build raise (a simulated out-of-memory) on the calls ``fail_when(index)`` picks.

    The scratch approach builds one model per trial, so a study's first sweep fails trial number ``index``.
    """
    from tinyopt.models.approaches import get_approach

    module = get_approach("scratch")
    original = module.build
    calls = []

    def build(params, **kwargs):
        calls.append(params)
        if fail_when(len(calls) - 1):
            raise RuntimeError("out of memory (simulated)")
        return original(params, **kwargs)

    monkeypatch.setattr(module, "build", build)
