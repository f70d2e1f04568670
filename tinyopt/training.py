"""Compiling and fitting a model from plain hyperparameters (optimizer, schedule, loss).

The learning rate follows a per-epoch schedule applied by ``keras.callbacks.LearningRateScheduler``
rather than a ``LearningRateSchedule`` object, so warmup combines with every decay and a saved
model never needs tinyopt to deserialise its optimizer.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from tinyopt.backend import device_name
from tinyopt.errors import ConfigError
from tinyopt.schema import DECAYS, OPTIMIZERS, PRECISIONS


def lr_at_epoch(params: dict[str, Any]) -> Callable[[int], float]:
    """The learning rate of each (0-based) epoch: linear warmup, then the chosen decay.

    ``exponential`` ends at 1% of the base rate; ``step`` divides it by 10 at 50% and 75% of the
    post-warmup epochs.
    """
    base = float(params["learning_rate"])
    epochs = int(params["epochs"])
    warmup = min(int(params.get("warmup_epochs", 0)), max(epochs - 1, 0))
    decay = params.get("decay", "constant")
    if decay not in DECAYS:
        raise ConfigError(f"unknown decay {decay!r}; use one of {', '.join(DECAYS)}")

    def schedule(epoch: int, _current_lr: float | None = None) -> float:
        if epoch < warmup:
            return base * (epoch + 1) / (warmup + 1)
        progress = (epoch - warmup) / max(epochs - warmup, 1)
        if decay == "cosine":
            return base * 0.5 * (1 + math.cos(math.pi * progress))
        if decay == "exponential":
            return base * 0.01 ** progress
        if decay == "step":
            return base * (0.1 if progress >= 0.5 else 1.0) * (0.1 if progress >= 0.75 else 1.0)
        return base

    return schedule


def make_optimizer(params: dict[str, Any]):
    """A Keras optimizer from ``optimizer``, ``learning_rate``, ``momentum`` and ``weight_decay``.

    Keras 3 applies ``weight_decay`` decoupled for every optimizer, which would make ``adam`` the
    same as ``adamw``; ``adam`` therefore runs without it.
    """
    import keras

    name = params.get("optimizer", "adam")
    lr = float(params["learning_rate"])
    decay = float(params.get("weight_decay", 0.0)) or None
    momentum = float(params.get("momentum", 0.9))
    if name == "sgd":
        return keras.optimizers.SGD(lr, momentum=momentum, nesterov=True, weight_decay=decay)
    if name == "adam":
        return keras.optimizers.Adam(lr)
    if name == "adamw":
        return keras.optimizers.AdamW(lr, weight_decay=decay or 0.0)
    if name == "rmsprop":
        return keras.optimizers.RMSprop(lr, momentum=momentum, weight_decay=decay)
    raise ConfigError(f"unknown optimizer {name!r}; use one of {', '.join(OPTIMIZERS)}")


def make_loss(label_smoothing: float):
    """Cross-entropy on integer labels, with optional label smoothing.

    Keras' sparse cross-entropy has no smoothing, so labels are one-hot encoded inside the loss only:
    the data pipeline and every metric keep integer class indices.
    """
    import keras
    from keras import ops

    if not label_smoothing:
        return keras.losses.SparseCategoricalCrossentropy()

    def smoothed_sparse_crossentropy(y_true, y_pred):
        one_hot = ops.one_hot(ops.cast(ops.reshape(y_true, (-1,)), "int32"), ops.shape(y_pred)[-1])
        return keras.losses.categorical_crossentropy(one_hot, y_pred, label_smoothing=label_smoothing)

    return smoothed_sparse_crossentropy


def compile_model(model, params: dict[str, Any]) -> None:
    """Compile with the trial's optimizer and loss; metrics are top-1 ``accuracy`` and ``top5``."""
    import keras

    model.compile(
        optimizer=make_optimizer(params),
        loss=make_loss(float(params.get("label_smoothing", 0.0))),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy"),
                 keras.metrics.SparseTopKCategoricalAccuracy(k=5, name="top5")],
    )


def set_precision(setting: str) -> str:
    """Apply ``train.mixed_precision`` (auto|on|off) globally and return the policy name in force.

    ``auto`` turns mixed float16 on only where a GPU is present: on a CPU it is slower.
    """
    import keras

    if setting not in PRECISIONS:
        raise ConfigError(f"train.mixed_precision must be one of {', '.join(PRECISIONS)}, got {setting!r}")
    mixed = setting == "on" or (setting == "auto" and device_name() != "cpu")
    policy = "mixed_float16" if mixed else "float32"
    keras.mixed_precision.set_global_policy(policy)
    return policy
