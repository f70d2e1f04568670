"""What serving a trial's model costs: the latency of one image's prediction, and the parameter count.

Measured on the model a bundle saves (``tinyopt.train.training.inference_model``), on the device the
sweep runs on, as a served model runs: one compiled call on a batch of one image, the input the bundle
takes, timed until its output is ready. Keras and the backend are imported inside.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

from tinyopt.core import record

# The first call traces and compiles the function (seconds with XLA), and the next ones still warm
# caches and the allocator: none of them is what a served model costs.
WARMUP_CALLS = 3
# The median of this many calls: a stray slow call (the OS, the MLflow thread logging the last epoch)
# moves it little, and the figure repeats within a few percent on an idle machine.
REPEATS = 15
# ... unless the calls take longer than this in all (a large model on a CPU): the median of the
# calls made by then, at least MIN_REPEATS of them.
BUDGET_SECONDS = 3.0
MIN_REPEATS = 5


def measure(model: Any, jit_compile: bool = False) -> dict[str, float]:
    """The median milliseconds of one single-image prediction of ``model``, and its parameter count.

    Args:
        model: a Keras model taking a batch of images (``uint8``, 64x64x3 for a tinyopt model).
        jit_compile: compile with XLA under TensorFlow, as the trial did (``train.jit_compile``); JAX
            always compiles (``jax.jit``), as Keras does.

    Returns:
        ``{record.LATENCY_MS: ..., record.MODEL_PARAMS: ...}``, as the trial records them.
    """
    import numpy as np

    spec = model.inputs[0]
    image = np.zeros((1, *spec.shape[1:]), dtype=spec.dtype)
    predict = _compiled(model, jit_compile)
    for _ in range(WARMUP_CALLS):
        predict(image)
    took: list[float] = []
    started = time.perf_counter()
    while len(took) < REPEATS and (len(took) < MIN_REPEATS or time.perf_counter() - started < BUDGET_SECONDS):
        begin = time.perf_counter()
        predict(image)
        took.append(time.perf_counter() - begin)
    return {record.LATENCY_MS: statistics.median(took) * 1000, record.MODEL_PARAMS: float(model.count_params())}


def _compiled(model: Any, jit_compile: bool) -> Callable[[Any], Any]:
    """``model``'s inference as one compiled call that returns once the output is computed.

    Not ``model.predict``, whose per-call set-up (a data adapter, callbacks, a progress bar) costs more
    than a small model's forward pass; the graph Keras' own ``predict_on_batch`` runs, without its
    Python bookkeeping (under JAX, reading and writing back every variable on each call).
    """
    import keras

    if keras.backend.backend() == "jax":
        import jax

        trainable = [v.value for v in model.trainable_variables]
        frozen = [v.value for v in model.non_trainable_variables]
        call = jax.jit(lambda t, f, x: model.stateless_call(t, f, x, training=False)[0])
        return lambda x: jax.block_until_ready(call(trainable, frozen, x))
    import tensorflow as tf

    call = tf.function(lambda x: model(x, training=False), jit_compile=jit_compile, reduce_retracing=True)
    return lambda x: call(x).numpy()  # .numpy() waits for the device
