"""The Keras backend and the GPU settings: which backend runs, what each setting means on which device."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

from tinyopt.core.errors import ConfigError
from tinyopt.train import backend, training

pytestmark = pytest.mark.backend  # CI runs these under JAX as well as TensorFlow


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (Keras picks its backend once, at import) with ``env`` added."""
    # Not this process' XLA_PYTHON_CLIENT_* either: a sweep run earlier in it has set them.
    full = {k: v for k, v in os.environ.items()
            if k not in ("KERAS_BACKEND", *env) and not k.startswith("XLA_PYTHON_CLIENT_")}
    full.update({k: v for k, v in env.items() if v is not None})
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=120)


def test_the_backend_is_read_as_keras_reads_it_without_importing_it(tmp_path):
    (tmp_path / "keras.json").write_text(json.dumps({"backend": "jax"}))
    code = "import sys; from tinyopt.train import backend; print(backend.name(), 'keras' in sys.modules)"
    assert _python(code, KERAS_HOME=str(tmp_path)).stdout.split() == ["jax", "False"]
    assert _python(code, KERAS_HOME=str(tmp_path), KERAS_BACKEND="tensorflow").stdout.split() == ["tensorflow", "False"]
    assert _python(code, KERAS_HOME=str(tmp_path / "none")).stdout.split() == ["tensorflow", "False"]


def test_an_unsupported_backend_is_one_clear_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "tinyopt", "sweep", "scratch", "--trials", "1"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120,
                          env={**os.environ, "KERAS_BACKEND": "torch"})
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "error: the Keras backend is 'torch' (KERAS_BACKEND or keras.json); tinyopt runs on tensorflow or jax: "
        "set KERAS_BACKEND=tensorflow or KERAS_BACKEND=jax"]
    assert not any(tmp_path.iterdir())  # no study, no run


@pytest.mark.parametrize("setting, device, capability, policy", [
    ("auto", "cpu", None, "float32"),
    ("auto", "NVIDIA H100 80GB HBM3", 9.0, "mixed_bfloat16"),
    ("auto", "NVIDIA A100-SXM4-40GB", 8.0, "mixed_bfloat16"),
    ("auto", "Tesla V100-SXM2-16GB", 7.0, "mixed_float16"),
    ("auto", "Tesla T4", 7.5, "mixed_float16"),
    ("bfloat16", "cpu", None, "mixed_bfloat16"),
    ("float16", "NVIDIA H100 80GB HBM3", 9.0, "mixed_float16"),
    ("off", "NVIDIA H100 80GB HBM3", 9.0, "float32"),
])
def test_mixed_precision_follows_the_device(setting, device, capability, policy):
    assert training.precision_policy(setting, device, capability) == policy


def test_float16_training_scales_its_loss():
    """Keras wraps the optimizer in a LossScaleOptimizer under mixed_float16 (the older GPUs' auto)."""
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax", dtype="float32")])
        training.compile_model(model, {"optimizer": "adam", "learning_rate": 1e-3, "epochs": 1})
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    finally:
        keras.mixed_precision.set_global_policy("float32")


class _OutOfMemory(Exception):
    """Stands for the backends' own errors, which ``backend.is_out_of_memory`` knows by name or message."""


def test_the_evaluation_batch_halves_until_it_fits():
    tried = []

    def attempt(size):
        tried.append(size)
        if size > 200:
            raise _OutOfMemory("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 123 bytes")

    assert training.largest_fitting(attempt, 1024) == 128 and tried == [1024, 512, 256, 128]

    def broken(size):
        raise ValueError("not a memory error")

    with pytest.raises(ValueError):
        training.largest_fitting(broken, 1024)


def test_auto_evaluation_batch_on_a_cpu_and_a_number_as_given():
    model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Flatten(), keras.layers.Dense(2)])
    assert training.eval_batch_size(model, "auto", "cpu") == training.AUTO_EVAL_BATCH_CPU
    assert training.eval_batch_size(model, 48, "NVIDIA H100 80GB HBM3") == 48


def test_auto_evaluation_batch_on_a_gpu_probes_the_model(monkeypatch):
    """On a GPU, auto predicts blank batches of the model's input from AUTO_EVAL_BATCH_GPU down."""
    model = keras.Sequential([keras.Input((8, 8, 3), dtype="uint8"), keras.layers.Flatten(), keras.layers.Dense(2)])
    shapes = []
    real_predict = model.predict

    def predict(x, **kwargs):
        shapes.append((x.shape, x.dtype))
        if len(x) > 300:
            raise _OutOfMemory("RESOURCE_EXHAUSTED")
        return real_predict(x, **kwargs)

    monkeypatch.setattr(model, "predict", predict)
    assert training.eval_batch_size(model, "auto", "NVIDIA H100 80GB HBM3") == 256
    assert shapes == [((1024, 8, 8, 3), np.uint8), ((512, 8, 8, 3), np.uint8), ((256, 8, 8, 3), np.uint8)]


def test_gpu_memory_settings_reach_jax_before_it_loads():
    code = ("import os; from tinyopt.train import backend; backend.set_gpu_memory({mode!r}); "
            "print(os.environ['XLA_PYTHON_CLIENT_PREALLOCATE'], os.environ.get('XLA_PYTHON_CLIENT_MEM_FRACTION'))")
    assert _python(code.format(mode="grow"), KERAS_BACKEND="jax").stdout.split() == ["false", "None"]
    assert _python(code.format(mode="preallocate"), KERAS_BACKEND="jax").stdout.split() == ["true", "None"]
    shared = _python(code.format(mode="preallocate"), KERAS_BACKEND="jax", **{backend.SHARE_ENV: "3"})
    assert shared.stdout.split() == ["true", "0.250"]  # JAX's 75%, split between the 3 workers of the GPU
    mine = _python(code.format(mode="grow"), KERAS_BACKEND="jax", XLA_PYTHON_CLIENT_PREALLOCATE="true")
    assert mine.stdout.split() == ["true", "None"]  # what the user set wins


def test_tensorflow_cannot_preallocate_a_shared_gpu(monkeypatch):
    monkeypatch.setattr(backend, "name", lambda: "tensorflow")
    monkeypatch.setenv(backend.SHARE_ENV, "2")
    with pytest.raises(ConfigError, match="train.gpu_memory = grow"):
        backend.set_gpu_memory("preallocate")
    with pytest.raises(ConfigError, match="expected one of grow, preallocate"):
        backend.set_gpu_memory("all")


def test_out_of_memory_is_recognised_on_both_backends():
    assert backend.is_out_of_memory(RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 1.2GiB"))
    assert not backend.is_out_of_memory(RuntimeError("INVALID_ARGUMENT: shapes differ"))
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        assert backend.is_out_of_memory(tf.errors.ResourceExhaustedError(None, None, "OOM when allocating"))


def test_the_device_and_memory_queries_answer_on_a_cpu():
    assert backend.device_name() == "cpu"
    assert backend.compute_capability() is None and backend.peak_memory() is None
    backend.reset_peak_memory()
    backend.free_memory()


def test_seeding_repeats_the_same_weights_and_leaves_tensorflow_out_under_jax():
    code = textwrap.dedent("""
        import sys
        import keras, numpy as np
        from tinyopt.train import backend

        def weights(seed):
            backend.seed(seed)
            return keras.ops.convert_to_numpy(keras.Sequential([keras.Input((3,)), keras.layers.Dense(4)]).weights[0])

        assert np.array_equal(weights(7), weights(7)) and not np.array_equal(weights(7), weights(8))
        print(keras.backend.backend(), "tensorflow" in sys.modules)
    """)
    done = _python(code, KERAS_BACKEND="jax")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["jax", "False"]
