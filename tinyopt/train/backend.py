"""The Keras backend: which one runs, imported once and quietly, and what tinyopt asks of it.

Model and training code use Keras alone; what differs between TensorFlow and JAX (the device,
GPU memory, out-of-memory errors, caches between trials) sits behind one function each here.
The input pipeline is the one other backend-specific piece (``tinyopt.train.batches.make_dataset``).

TensorFlow's C++ libraries log a few lines the moment they load (absl's "before InitializeLog"
notice, oneDNN and CPU-instruction notices, "could not find cuda drivers", a failed cuInit on a
machine without a GPU). They are written straight to file descriptor 2 before TensorFlow reads
``TF_CPP_MIN_LOG_LEVEL``, so no setting hides them: ``load`` captures descriptor 2 while the
backend loads and looks for devices, drops those start-up lines and passes every other line on.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import random
import re
import sys
import tempfile
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

from tinyopt.core.errors import ConfigError
from tinyopt.core.schema import GPU_MEMORY

SUPPORTED = ("tensorflow", "jax")
# Set by the supervisor for a worker that shares its GPU with others (``--gpus 0,0``).
SHARE_ENV = "TINYOPT_GPU_SHARE"
# JAX's own default share of GPU memory taken at start, split between the workers of one GPU.
_JAX_PREALLOCATED = 0.75
_memory_mode = "grow"  # train.gpu_memory, applied to TensorFlow when it loads

# Start-up notices only: any other line (a real error, a Python warning) reaches the terminal.
_STARTUP_NOISE = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|I\d{4} [\d:.]+ +\d+ \S+\.cc:\d+\] "  # glog INFO lines: notices by definition
    r"|E\d{4} [\d:.]+ +\d+ cuda_(?:platform|driver|executor)\.cc:\d+\] failed call to cuInit"
    r"|To enable the following instructions: .* rebuild TensorFlow with the appropriate compiler flags\.)"
)


@contextlib.contextmanager
def _startup_lines_dropped() -> Iterator[None]:
    """Run the body with file descriptor 2 captured; replay what it wrote, less the start-up noise."""
    try:
        saved = os.dup(2)
    except OSError:  # no stderr at all (a daemon): nothing to keep quiet
        yield
        return
    with tempfile.TemporaryFile(mode="w+b") as captured:
        sys.stderr.flush()
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [line for line in captured.read().decode(errors="replace").splitlines(keepends=True)
                    if not _STARTUP_NOISE.match(line)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


def name() -> str:
    """The Keras backend in force, found as Keras finds it, without importing Keras.

    ``KERAS_BACKEND`` first, then ``backend`` in ``$KERAS_HOME/keras.json`` (``~/.keras``), then
    TensorFlow, Keras' default.
    """
    if "keras" in sys.modules:
        return sys.modules["keras"].backend.backend()
    if os.environ.get("KERAS_BACKEND"):
        return os.environ["KERAS_BACKEND"]
    home = Path(os.environ.get("KERAS_HOME") or Path.home() / ".keras")
    try:
        return json.loads((home / "keras.json").read_text()).get("backend", "tensorflow")
    except (OSError, ValueError):
        return "tensorflow"


def check() -> None:
    """Raise ``ConfigError`` unless the backend in force is one tinyopt runs on."""
    found = name()
    if found not in SUPPORTED:
        raise ConfigError(f"the Keras backend is {found!r} (KERAS_BACKEND or keras.json); tinyopt runs on "
                          f"{' or '.join(SUPPORTED)}: set KERAS_BACKEND=tensorflow or KERAS_BACKEND=jax")


def set_gpu_memory(mode: str) -> None:
    """Apply ``train.gpu_memory`` before the backend loads; a later call changes nothing loaded.

    ``grow`` takes GPU memory as it is needed, so several workers can share one GPU; ``preallocate``
    takes it up front (JAX's default: faster allocation). Workers that share a GPU (``SHARE_ENV``)
    split JAX's preallocated share between them. A ``XLA_PYTHON_CLIENT_*`` variable the user set wins.

    Raises:
        ConfigError: an unknown mode, or TensorFlow asked to preallocate a GPU that workers share
            (TensorFlow takes nearly all of it, so the second worker could not start).
    """
    if mode not in GPU_MEMORY:
        raise ConfigError(f"train.gpu_memory: got {mode!r}; expected one of {', '.join(GPU_MEMORY)}")
    share = int(os.environ.get(SHARE_ENV, "1") or 1)
    if mode == "preallocate" and share > 1 and name() == "tensorflow":
        raise ConfigError(f"train.gpu_memory = preallocate cannot share a GPU between {share} workers on "
                          "TensorFlow; set train.gpu_memory = grow, or give each worker its own GPU")
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false" if mode == "grow" else "true")
    if mode == "preallocate" and share > 1:
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", f"{_JAX_PREALLOCATED / share:.3f}")
    global _memory_mode
    _memory_mode = mode


@lru_cache(maxsize=1)
def load() -> str:
    """Import Keras and its backend without their start-up chatter; return the device description.

    Call it before the first ``import keras`` of a command (later imports find the modules loaded),
    and after ``set_gpu_memory``.

    Returns:
        What ``device_name`` returns.

    Raises:
        ConfigError: a backend tinyopt does not run on.
    """
    check()
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # as ``grow``, the default
    with _startup_lines_dropped():
        import keras  # noqa: F401

        if name() == "tensorflow":
            import tensorflow as tf

            for gpu in tf.config.list_physical_devices("GPU"):
                tf.config.experimental.set_memory_growth(gpu, _memory_mode == "grow")
        return device_name()


def _jax_device():
    import jax

    return jax.devices()[0]


def device_name() -> str:
    """The accelerator training runs on (its model name), or ``cpu``."""
    if name() == "jax":
        device = _jax_device()
        return "cpu" if device.platform == "cpu" else device.device_kind
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return "cpu"
    details = tf.config.experimental.get_device_details(gpus[0])
    return details.get("device_name", "gpu")


def gpu_count() -> int:
    """How many GPUs the backend in force can use on this machine (0 on a CPU-only build or machine)."""
    if name() == "jax":
        import jax

        try:
            return len(jax.devices("gpu"))
        except RuntimeError:  # JAX has no GPU backend here
            return 0
    import tensorflow as tf

    return len(tf.config.list_physical_devices("GPU"))


def check_gpus(ids: list[str]) -> None:
    """Raise ``ConfigError`` unless every GPU index ``--gpus`` lists exists here (a UUID is left to CUDA).

    Without this, a worker pinned to a GPU that does not exist trains on the CPU without a word.
    """
    listed, count = ",".join(ids), gpu_count()
    if not count:
        raise ConfigError(f"--gpus {listed}: the Keras {name()} backend finds no GPU on this machine, so every "
                          "trial would run on the CPU; drop --gpus (--workers K runs K workers on the CPU), or "
                          "install a GPU build (pip install 'tinyopt[gpu]' or 'tinyopt[jax-cuda]')")
    missing = sorted({gpu for gpu in ids if gpu.isdigit() and int(gpu) >= count}, key=int)
    if missing:
        raise ConfigError(f"--gpus {listed}: no GPU {', '.join(missing)} on this machine, which has {count} "
                          f"(0 to {count - 1}); list GPUs that exist")


def compute_capability() -> float | None:
    """The GPU's CUDA compute capability (8.0 and up support bfloat16), or None without a GPU."""
    if device_name() == "cpu":
        return None
    if name() == "jax":
        found = getattr(_jax_device(), "compute_capability", None)
        return float(found) if found else None
    import tensorflow as tf

    details = tf.config.experimental.get_device_details(tf.config.list_physical_devices("GPU")[0])
    major_minor = details.get("compute_capability")
    return float(f"{major_minor[0]}.{major_minor[1]}") if major_minor else None


def peak_memory() -> int | None:
    """Peak bytes in use on the GPU since ``reset_peak_memory`` (JAX: since the process started), or None."""
    if device_name() == "cpu":
        return None
    if name() == "jax":
        stats = _jax_device().memory_stats() or {}
        return stats.get("peak_bytes_in_use")
    import tensorflow as tf

    return tf.config.experimental.get_memory_info("GPU:0")["peak"]


def reset_peak_memory() -> None:
    """Start a new peak for ``peak_memory`` where the backend can (TensorFlow; JAX keeps the process peak)."""
    if name() == "tensorflow" and device_name() != "cpu":
        import tensorflow as tf

        tf.config.experimental.reset_memory_stats("GPU:0")


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is the backend running out of device memory."""
    # TensorFlow raises ResourceExhaustedError; JAX an XlaRuntimeError whose message starts RESOURCE_EXHAUSTED.
    return type(err).__name__ == "ResourceExhaustedError" or "RESOURCE_EXHAUSTED" in str(err)


def seed(value: int) -> None:
    """Seed Python, numpy and Keras (its backend and the global SeedGenerator layers draw from).

    ``keras.utils.set_random_seed`` does this and also seeds TensorFlow whenever it is installed,
    importing it under JAX too (seconds and about a gigabyte per process, and its start-up lines on
    the terminal). Under another backend the same is done here without TensorFlow.
    """
    import keras

    if name() == "tensorflow":
        keras.utils.set_random_seed(value)
        return
    import numpy as np
    from keras.src.backend.common import global_state
    from keras.src.random import seed_generator
    from keras.src.utils import rng_utils

    global_state.set_global_attribute(rng_utils.GLOBAL_RANDOM_SEED, value)
    global_state.set_global_attribute(seed_generator.GLOBAL_SEED_GENERATOR, None)  # remade from the seed
    random.seed(value)
    np.random.seed(value)


def free_memory() -> None:
    """Drop what the last trial left: Keras' global state and, on JAX, its compiled functions."""
    import keras

    keras.backend.clear_session(free_memory=True)
    if name() == "jax":
        import jax

        jax.clear_caches()
    gc.collect()
