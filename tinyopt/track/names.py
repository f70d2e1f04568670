"""What MLflow shows of a sweep, named: run names, identifying params, experiment names, run links.

Pure functions, without mlflow: the ensemble names its members' weight params with ``safe_name`` and
the sweep summary writes its links, neither of which needs MLflow loaded.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from tinyopt.core import record
from tinyopt.core.config.sections import Config
from tinyopt.core.urls import ML_LAYOUT, redact, sqlite_path

# Where `tinyopt ui` serves an embedded store: the links an Optuna trial carries to its run.
DEFAULT_UI = "http://127.0.0.1:5000"
TAG_LIMIT = 8000  # MLflow rejects longer tag values (a run's description is one)
_UNSAFE = re.compile(r"[^\w.\-]")  # MLflow accepts only these characters in param and metric names
_MODEL_UNSAFE = re.compile(r"[^\w\-]")
_SHORT_KEYS = {"learning_rate": "lr", "weight_decay": "wd", "batch_size": "bs", "label_smoothing": "ls",
               "trainable_stages": "train_stages", "input_size": "px"}
# Run colours: MLflow's own repeat every few runs, so the best trial would share its colour with another.
BEST_COLOUR = "#d62728"
_PALETTE = ("#1f77b4", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
            "#aec7e8", "#98df8a", "#c5b0d5", "#c49c94", "#f7b6d2", "#dbdb8d", "#9edae5", "#393b79")
STATE_NAMES = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running"}


def safe_name(text: str) -> str:
    """``text`` with every character MLflow rejects in param and metric names replaced by ``_``."""
    return _UNSAFE.sub("_", text)


def short_value(value: Any) -> str:
    """A value as a run name shows it: ``3e-4``, ``0.25``, ``160``, ``adamw``, ``True``."""
    if isinstance(value, float) and not isinstance(value, bool):
        if value != 0 and (abs(value) < 1e-2 or abs(value) >= 1e4):
            mantissa, exponent = f"{value:.1e}".split("e")
            return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
        return f"{value:.3g}"
    return str(value)


def short_param(value: Any) -> str:
    """A param's value in a terminal table or a note: floats at 3 significant digits."""
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def param_text(value: Any) -> str:
    """A param as a run shows it: floats to 4 significant digits (``0.0002007``, not ``0.00020074099001954847``).

    The exact values stay in the run's ``config.json``, its description and the Optuna trial.
    """
    if isinstance(value, float) and not isinstance(value, bool):
        return f"{value:.4g}"
    return str(value)


def model_name(study_name: str, number: int, refit: bool = False) -> str:
    """The name of a trial's kept model in MLflow's Models tab: ``finetune-trial-12``, ``finetune-refit-of-12``."""
    # MLflow refuses / : . % " ' in a logged model's name.
    return _MODEL_UNSAFE.sub("_", f"{study_name}-{'refit-of' if refit else 'trial'}-{number}")


def run_colour(number: int) -> str:
    """The colour of trial ``number``'s run in the MLflow UI's charts; never ``BEST_COLOUR``."""
    return _PALETTE[number % len(_PALETTE)]


def run_name(number: int, headline: dict[str, Any]) -> str:
    """``t12 stages=2 adamw lr=3e-4``: the trial number, then its telling params (a word alone is its own label)."""
    parts = [f"t{number}"]
    for key, value in headline.items():
        shown = short_value(value)
        # A word names itself (adamw, bicubic); "none" would not say of what.
        alone = isinstance(value, str) and value != "none"
        parts.append(shown if alone else f"{_SHORT_KEYS.get(key, key)}={shown}")
    return " ".join(parts)


def config_hash(config: dict[str, Any]) -> str:
    """A short digest of the resolved config: equal hashes, equal configs (the config itself is ``config.json``)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:12]


def identity(config: Config) -> dict[str, Any]:
    """The few params that say what a run is, beside the searched ones: approach, backbone, weights, data slice."""
    model, data = config.model, config.data
    found: dict[str, Any] = {"approach": config.approach}
    if model is not None and model.backbone is not None:
        found["backbone"] = model.backbone + (f" alpha={model.alpha}" if model.backbone == "mobilenet" else "")
    if model is not None:
        found["weights"] = Path(str(model.weights)).name  # a path says where, its name says which
    if data is not None:
        caps = [f"{split}={data.per_class(split) or 'all'}" for split in ("train", "selection", "test")]
        found["data"] = "per class " + " ".join(caps)
    if config.ensemble is not None:
        found["members_of"] = ",".join(config.ensemble.studies)
    found[record.CONFIG_HASH] = config_hash(config.as_dict())
    return found


def markdown_table(params: dict[str, Any]) -> list[str]:
    rows = [f"| {key} | {short_value(value)} |" for key, value in params.items()]
    return ["| param | value |", "| --- | --- |", *rows]


def experiment_name(study_name: str) -> str:
    """The MLflow experiment that holds a study's runs."""
    return f"tinyopt/{study_name}"


def run_path(experiment_id: str, run_id: str) -> str:
    """A run's page within the MLflow UI, relative to its address (a description's links work on any host).

    In the model-training layout: without ``workflowType`` MLflow 3 shows a run as a GenAI "evaluation run".
    """
    return f"#/experiments/{experiment_id}/runs/{run_id}?{ML_LAYOUT}"


def ui_command(tracking_uri: str) -> str:
    """The shell command that opens the MLflow UI on this store (credentials hidden)."""
    if sqlite_path(tracking_uri) is None:
        return f"open {redact(tracking_uri)} in a browser"
    return f"tinyopt ui --tracking-uri {tracking_uri}"
