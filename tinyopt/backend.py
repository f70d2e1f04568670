"""The Keras backend: imported once, quietly, and the device that trials run on.

TensorFlow's C++ libraries log a few lines the moment they load (absl's "before InitializeLog"
notice, oneDNN and CPU-instruction notices, "could not find cuda drivers", a failed cuInit on a
machine without a GPU). They are written straight to file descriptor 2 before TensorFlow reads
``TF_CPP_MIN_LOG_LEVEL``, so no setting hides them: ``load`` captures descriptor 2 while the
backend loads and looks for devices, drops those start-up lines and passes every other line on.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from functools import lru_cache

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


@lru_cache(maxsize=1)
def load() -> str:
    """Import Keras and its backend without their start-up chatter; return the device description.

    Call it before the first ``import keras`` of a command (later imports find the modules loaded).

    Returns:
        What ``device_name`` returns.
    """
    with _startup_lines_dropped():
        import keras  # noqa: F401

        return device_name()


def device_name() -> str:
    """The accelerator training runs on (its model name), or ``cpu``."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return "cpu"
    details = tf.config.experimental.get_device_details(gpus[0])
    return details.get("device_name", "gpu")
