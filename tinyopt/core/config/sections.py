"""The resolved config, typed: one frozen dataclass per TOML section, built once when the config loads.

The TOML files in ``sweeps/`` are the only place a default lives: these classes declare no default.
A setting that an approach's TOML does not have (``model.backbone`` for scratch, ``[train]`` for the
ensemble) is ``None`` here: that approach has no such setting. ``Config.as_dict`` gives back the
resolved config as plain nested dicts: what the study stores, MLflow logs as ``config.json`` and
``config_hash`` digests. ``Config.from_dict`` rebuilds the typed config from such a dict (the one a
study stored), so a store written by an earlier version reads the same way.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any, Self


def _section(cls: type, table: dict[str, Any] | None) -> Any:
    """``cls`` from a TOML table: every field its value, or None where the approach has no such setting."""
    if table is None:
        return None
    values = {f.name: table.get(f.name) for f in fields(cls)}
    return cls(**{key: tuple(value) if isinstance(value, list) else value for key, value in values.items()})


@dataclass(frozen=True)
class DataConfig:
    """``[data]``: the per-class caps of each split (0 keeps all) and the seed of the capped slice."""

    train_per_class: int
    selection_per_class: int
    test_per_class: int
    seed: int

    def per_class(self, split: str) -> int:
        """The cap of ``split`` (``train``, ``selection`` or ``test``)."""
        return {"train": self.train_per_class, "selection": self.selection_per_class,
                "test": self.test_per_class}[split]


@dataclass(frozen=True)
class ModelConfig:
    """``[model]``: the backbone and its pretrained weights (``imagenet``, a file, or ``none``)."""

    weights: str
    backbone: str | None
    alpha: float | None
    weights_resolution: int | None

    @property
    def pretrained(self) -> bool:
        """Whether the model starts from pretrained weights (``weights`` is not ``none``)."""
        return str(self.weights).lower() != "none"


@dataclass(frozen=True)
class TrainConfig:
    """``[train]``: how trials train and evaluate (precision, XLA, memory, the activation cache, early stopping)."""

    eval_batch_size: int | str
    mixed_precision: str
    jit_compile: bool | str
    gpu_memory: str
    system_metrics: bool | str
    activation_cache: bool | None
    activation_cache_gb: float | str | None
    early_stopping_patience: int | None
    checkpoint: str | None
    checkpoint_dir: str | None


@dataclass(frozen=True)
class StudyConfig:
    """``[study]``: the sampler, the pruner, the failure policy, heartbeats, kept models, run names, warm starts."""

    sampler: str
    n_startup_trials: int
    pruner: str
    max_consecutive_failures: int
    heartbeat_interval: int
    requeue: str | None
    pruner_warmup_epochs: int | None
    pruner_reduction_factor: int | None
    keep_models: int | None
    warm_start_trials: int | None
    run_name: tuple[str, ...] | None
    # What the study optimises, the selection top-1 first (None: the ensemble, whose [ensemble] says).
    objectives: tuple[str, ...] | None


@dataclass(frozen=True)
class EnsembleConfig:
    """``[ensemble]``: the member studies, how many of each, the objective and the greedy start."""

    studies: tuple[str, ...]
    top_k: int
    objective: str
    greedy_rounds: int
    min_members: int


@dataclass(frozen=True)
class Config:
    """The resolved config of one approach.

    Attributes:
        approach: ``pretrained``, ``finetune``, ``scratch`` or ``ensemble``.
        study: ``[study]``.
        space: ``[space]`` as data, read-only: a fixed value or a distribution table per param
            (``tinyopt.core.space`` reads it).
        data, model, train: their sections; None for the ensemble, which trains nothing.
        ensemble: ``[ensemble]``; None for the other approaches.
    """

    approach: str
    study: StudyConfig
    space: MappingProxyType
    data: DataConfig | None
    model: ModelConfig | None
    train: TrainConfig | None
    ensemble: EnsembleConfig | None
    _resolved: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_dict(cls, resolved: dict[str, Any]) -> Self:
        """The typed config of a resolved config dict (``load_config``'s, or the one a study stored)."""
        return cls(approach=resolved["approach"], study=_section(StudyConfig, resolved["study"]),
                   space=MappingProxyType(copy.deepcopy(resolved.get("space", {}))),
                   data=_section(DataConfig, resolved.get("data")), model=_section(ModelConfig, resolved.get("model")),
                   train=_section(TrainConfig, resolved.get("train")),
                   ensemble=_section(EnsembleConfig, resolved.get("ensemble")), _resolved=copy.deepcopy(resolved))

    def as_dict(self) -> dict[str, Any]:
        """The resolved config as plain nested dicts (a copy): stored, logged and hashed as it always was."""
        return copy.deepcopy(self._resolved)
