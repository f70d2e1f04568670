"""The latency of a trial's model: one image, compiled, warmed up, the median of repeats; and its parameter count."""

from __future__ import annotations

import time

import keras
import numpy as np
import pytest

from tinyopt.core import record
from tinyopt.train import latency


def _timed_calls(monkeypatch, seconds):
    """Make ``measure`` time a fake compiled model whose n-th call takes ``seconds(n)``; return the inputs seen."""
    seen = []

    def compiled(model, jit_compile):
        def predict(image):
            seen.append(image)
            time.sleep(seconds(len(seen) - 1))
        return predict

    monkeypatch.setattr(latency, "_compiled", compiled)
    return seen


class _Model:
    inputs = [keras.KerasTensor((None, 64, 64, 3), dtype="uint8")]

    def count_params(self):
        return 1234


def test_the_warm_up_is_not_timed_and_a_stray_slow_call_moves_the_median_little(monkeypatch):
    # The warm-up calls compile (slow); then one call in the timed ones is as slow, the rest take 1 ms.
    seen = _timed_calls(monkeypatch, lambda n: 0.1 if n < latency.WARMUP_CALLS or n == 8 else 0.001)
    found = latency.measure(_Model())
    assert len(seen) == latency.WARMUP_CALLS + latency.REPEATS
    assert 0.9 <= found[record.LATENCY_MS] < 5  # the mean would be above 7 ms
    assert found[record.MODEL_PARAMS] == 1234
    assert all(image.shape == (1, 64, 64, 3) and image.dtype == np.uint8 for image in seen)  # one image, as served


def test_a_slow_model_is_timed_for_the_budget_only(monkeypatch):
    monkeypatch.setattr(latency, "BUDGET_SECONDS", 0.0)
    seen = _timed_calls(monkeypatch, lambda n: 0.002)
    assert latency.measure(_Model())[record.LATENCY_MS] >= 2
    assert len(seen) == latency.WARMUP_CALLS + latency.MIN_REPEATS


@pytest.mark.backend  # CI runs it under JAX as well as TensorFlow
@pytest.mark.parametrize("jit_compile", [False, True])
def test_a_keras_model_is_timed_compiled_on_one_image(jit_compile):
    image = keras.Input((64, 64, 3), dtype="uint8")
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(8, 3)(keras.layers.Rescaling(1 / 255)(image)))
    model = keras.Model(image, keras.layers.Dense(5, activation="softmax")(x))
    started = time.perf_counter()
    found = latency.measure(model, jit_compile)
    assert time.perf_counter() - started < 5  # compiled once, then cheap: no part of a trial to notice
    assert 0 < found[record.LATENCY_MS] < 100
    assert found[record.MODEL_PARAMS] == model.count_params() == 3 * 3 * 3 * 8 + 8 + 8 * 5 + 5
