"""Compiling and fitting a model from plain hyperparameters (optimizer, schedule, loss).

The learning rate follows a per-epoch schedule applied by ``keras.callbacks.LearningRateScheduler``
rather than a ``LearningRateSchedule`` object, so warmup combines with every decay and a saved
model never needs tinyopt to deserialise its optimizer.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from tinyopt.core import record
from tinyopt.core.config.sections import Config
from tinyopt.core.errors import ConfigError
from tinyopt.core.schema import DECAYS, OPTIMIZERS, PRECISIONS
from tinyopt.train import backend

# train.eval_batch_size = "auto": a CPU gains nothing from larger batches, only memory use; a GPU
# starts here and halves until a batch fits (ResNet50 at 224 px fits 1024 in 16 GB in bfloat16).
AUTO_EVAL_BATCH_CPU = 256
AUTO_EVAL_BATCH_GPU = 1024
# decay = "cooldown": the share of the post-warmup epochs over which the rate falls to 0. A fifth to a
# quarter matches a cosine decay of the same length (Hägele et al., 2024). Measured on the scratch CPU
# preset's CNN (width 32, flip_translate, 24 epochs, float32) on 3,000 dev val images outside the test
# slice: 28.9% top-1 against the cosine's 28.1% (BENCHMARKS.md).
COOLDOWN_FRACTION = 0.25


def lr_at_epoch(params: dict[str, Any]) -> Callable[[int], float]:
    """The learning rate of each (0-based) epoch: linear warmup, then the chosen decay.

    ``exponential`` ends at 1% of the base rate; ``step`` divides it by 10 at 50% and 75% of the
    post-warmup epochs; ``cooldown`` keeps the base rate, then falls linearly towards 0 over the last
    ``COOLDOWN_FRACTION`` of them (at least one epoch). Until its cooldown, a ``cooldown`` trial's rate
    does not depend on how many epochs it plans, so a pruner comparing trials of different lengths at
    one epoch compares like with like; under ``cosine`` a shorter trial has decayed further by then
    and looks better than it is.
    """
    base = float(params["learning_rate"])
    epochs = int(params["epochs"])
    warmup = _warmup(params)
    decay = params.get("decay", "constant")
    cooldown = _cooldown(params)
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
        if decay == "cooldown":
            left = epochs - epoch  # epochs left, this one included
            return base * min(1.0, left / (cooldown + 1))
        return base

    return schedule


def _warmup(params: dict[str, Any]) -> int:
    return min(int(params.get("warmup_epochs", 0)), max(int(params["epochs"]) - 1, 0))


def _cooldown(params: dict[str, Any]) -> int:
    """How many of the last epochs a ``cooldown`` decay spends falling to 0."""
    return max(1, round((int(params["epochs"]) - _warmup(params)) * COOLDOWN_FRACTION))


def early_stopping_start(params: dict[str, Any]) -> int:
    """The first (0-based) epoch early stopping watches: under ``cooldown`` the first of the cooldown, else 0.

    At its base rate a trial's selection score wanders rather than climbs, and most of its gain comes in
    the cooldown: early stopping with a patience of 3 epochs stopped a 32-epoch trial of the scratch CPU
    preset long before it, at 25% selection top-1.
    """
    return int(params["epochs"]) - _cooldown(params) if params.get("decay") == "cooldown" else 0


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


def compile_model(model, params: dict[str, Any], jit_compile: str | bool = "auto") -> None:
    """Compile with the trial's optimizer and loss; metrics are top-1 ``accuracy`` and ``top5``.

    ``jit_compile`` is ``train.jit_compile``: ``auto`` lets Keras decide (XLA with a GPU, and always
    on JAX, whose only alternative is op-by-op execution).
    """
    import keras

    model.compile(
        optimizer=make_optimizer(params),
        loss=make_loss(float(params.get("label_smoothing", 0.0))),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy"),
                 keras.metrics.SparseTopKCategoricalAccuracy(k=5, name="top5")],
        jit_compile=jit_compile,
    )


def build_model(approach: Any, params: dict[str, Any], config: Config, wnids: list[str], device: str
                ) -> tuple[Any, str, int]:
    """A trial's model as its config asks: the precision policy set, built, XLA as ``train.jit_compile`` says.

    Returns:
        The uncompiled model, the dtype policy in force, and the evaluation batch size on ``device``.
    """
    policy = set_precision(config.train.mixed_precision)
    model = approach.build(params, model=config.model, wnids=wnids)
    if config.train.jit_compile != "auto":
        model.jit_compile = config.train.jit_compile  # for predict; compile() sets it again for training
    return model, policy, eval_batch_size(model, config.train.eval_batch_size, device)


def epoch_metrics(logs: dict[str, Any], model, *, seconds: float, train_seconds: float,
                  train_images: int) -> dict[str, float]:
    """One epoch of ``fit`` under the names of ``record.EPOCH_METRICS``; what ``logs`` lacks is left out.

    Args:
        logs: Keras' epoch logs of a model ``compile_model`` compiled: ``loss``, ``accuracy``, ``top5``
            and, with validation data, the same prefixed ``val_``.
        model: that model; its optimizer's learning rate is the epoch's.
        seconds: the whole epoch, validation included.
        train_seconds: its training part, which ``images_per_second`` counts.
        train_images: the images one epoch trains on.
    """
    import keras

    metrics = {
        record.TRAIN_LOSS: logs.get("loss"), record.TRAIN_TOP1: logs.get("accuracy"),
        record.TRAIN_TOP5: logs.get("top5"), record.SELECTION_LOSS: logs.get("val_loss"),
        record.SELECTION_TOP1: logs.get("val_accuracy"), record.SELECTION_TOP5: logs.get("val_top5"),
        record.LR: float(keras.ops.convert_to_numpy(model.optimizer.learning_rate)),
        record.EPOCH_SECONDS: seconds, record.IMAGES_PER_SECOND: train_images / max(train_seconds, 1e-9),
    }
    return {key: float(value) for key, value in metrics.items() if value is not None}


def inference_model(model):
    """The same layers without the compiled optimizer and loss, in Keras' own classes: reloads anywhere."""
    import keras

    from tinyopt.models.blocks import plain_keras

    # input/output, not inputs/outputs: a list output would make the reloaded model return a list.
    return plain_keras(keras.Model(model.input, model.output, name=model.name))


def precision_policy(setting: str, device: str, capability: float | None) -> str:
    """The Keras dtype policy ``train.mixed_precision`` (auto|bfloat16|float16|off) means on a device.

    ``auto`` is off on a CPU (mixed precision is slower there), bfloat16 on GPUs that compute in it
    (compute capability 8.0 and up: A100, H100) and float16 on older ones, whose loss Keras scales
    (``compile`` wraps the optimizer in a ``LossScaleOptimizer`` under ``mixed_float16``).
    """
    if setting not in PRECISIONS:
        raise ConfigError(f"train.mixed_precision must be one of {', '.join(PRECISIONS)}, got {setting!r}")
    if setting == "bfloat16":
        return "mixed_bfloat16"
    if setting == "float16":
        return "mixed_float16"
    if setting == "off" or device == "cpu":
        return "float32"
    return "mixed_bfloat16" if (capability or 0.0) >= 8.0 else "mixed_float16"


def set_precision(setting: str) -> str:
    """Apply ``train.mixed_precision`` globally on this device; return the policy name in force."""
    import keras

    policy = precision_policy(setting, backend.device_name(), backend.compute_capability())
    keras.mixed_precision.set_global_policy(policy)
    return policy


def largest_fitting(attempt: Callable[[int], Any], start: int) -> int:
    """The first of ``start``, ``start // 2``, ... down to 1 for which ``attempt(size)`` does not run out of memory.

    Raises:
        Whatever ``attempt`` raises other than running out of device memory, or that at size 1.
    """
    size = start
    while True:
        try:
            attempt(size)
            return size
        except Exception as err:  # noqa: BLE001 - only out-of-memory is retried; the rest is re-raised
            if size == 1 or not backend.is_out_of_memory(err):
                raise
            size //= 2


def eval_batch_size(model, setting: int | str, device: str) -> int:
    """``train.eval_batch_size`` for this model: the number given, or for ``auto`` what fits the device.

    On a GPU, ``auto`` predicts one batch of blank images at ``AUTO_EVAL_BATCH_GPU``, halving it until
    it fits; that batch shape is then compiled already for the evaluations that follow.
    """
    if setting != "auto":
        return int(setting)
    if device == "cpu":
        return AUTO_EVAL_BATCH_CPU
    shape, dtype = tuple(model.inputs[0].shape[1:]), model.inputs[0].dtype

    def attempt(size: int) -> None:
        model.predict(np.zeros((size, *shape), dtype=dtype), batch_size=size, verbose=0)

    return largest_fitting(attempt, AUTO_EVAL_BATCH_GPU)
