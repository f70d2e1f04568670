"""Shared by the sweep tests: small search spaces for the fixture and MLflow read-back."""

from __future__ import annotations

from mlflow import MlflowClient

from tinyopt import tracking

SMALL = {
    "scratch": ("space.stages=2", "space.width=8", "space.blocks=1", "space.epochs=2", "space.batch_size=16",
                "space.batch_norm=true", "space.learning_rate=0.01", "space.optimizer=adam", "space.warmup_epochs=0",
                "train.eval_batch_size=32"),
    "finetune": ("model.backbone=mobilenet", "model.alpha=0.25", "model.weights=none", "space.input_size=64",
                 "space.epochs=2", "space.batch_size=16", "space.trainable_stages=1", "train.eval_batch_size=32"),
    "pretrained": ("model.backbone=mobilenet", "model.alpha=0.25", "model.weights=none", "space.input_size=64",
                   "train.eval_batch_size=32"),
}



def runs_of(stores, study):
    client = MlflowClient(stores["tracking_uri"])
    experiment = client.get_experiment_by_name(tracking.experiment_name(study))
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = {int(r.data.tags["trial_number"]): r for r in runs if "mlflow.parentRunId" in r.data.tags}
    return client, parents, children


def artifacts(client, run_id, path=""):
    names = set()
    for item in client.list_artifacts(run_id, path):
        names |= artifacts(client, run_id, item.path) if item.is_dir else {item.path}
    return names
