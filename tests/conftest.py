"""Shared pytest fixtures: generated Tiny ImageNet look-alikes, the real dev data, offline weights."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tinyopt.data import build

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fixtures import make_tiny_imagenet, small_mobilenet, zip_folder  # noqa: E402

MOBILENET_FILE = "mobilenet_2_5_128_tf.h5"


def shared_data_dir() -> Path:
    """``$TINYOPT_SHARED_DATA`` if set, else ``../shared/data`` beside the repository."""
    override = os.environ.get("TINYOPT_SHARED_DATA")
    return Path(override) if override else Path(__file__).resolve().parents[2] / "shared" / "data"


def _shared_file(name: str) -> Path:
    path = shared_data_dir() / name
    if not path.is_file():
        pytest.skip(f"real data file {path} is absent (set TINYOPT_SHARED_DATA to the folder holding it)")
    return path


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    """A generated ``tiny-imagenet-200`` folder (5 classes, 30 train + 6 val images each)."""
    return make_tiny_imagenet(tmp_path_factory.mktemp("tiny_folder"))


@pytest.fixture(scope="session")
def tiny_zip(tiny_folder, tmp_path_factory) -> Path:
    """``tiny_folder`` zipped like the official archive."""
    return zip_folder(tiny_folder, tmp_path_factory.mktemp("tiny_zip") / "tiny-imagenet-200.zip")


@pytest.fixture(scope="session")
def tiny_cache(tiny_folder, tmp_path_factory) -> Path:
    """A prepared cache of ``tiny_folder`` with default options; read-only for tests."""
    from tinyopt.data import build

    return build.prepare(tiny_folder, tmp_path_factory.mktemp("tiny_cache"), progress=False)


@pytest.fixture(scope="session")
def dev_zip() -> Path:
    """The real 200-class dev subset of Tiny ImageNet, or a skip when it is absent."""
    return _shared_file("tiny-imagenet-200-dev.zip")


@pytest.fixture(scope="session")
def dev_cache(dev_zip, tmp_path_factory) -> Path:
    """A prepared cache of the dev zip with default options; read-only for tests."""

    return build.prepare(dev_zip, tmp_path_factory.mktemp("dev_cache"), progress=False)


@pytest.fixture(scope="session")
def mobilenet_weights() -> Path:
    """The official Keras ImageNet weights of MobileNet v1 (alpha 0.25, 128 px), or a skip."""
    return _shared_file(MOBILENET_FILE)


@pytest.fixture(scope="session")
def mobilenet_weights_or_none() -> str:
    """The MobileNet weights file as ``model.weights`` when ../shared/data has it, else ``none`` (random weights)."""
    path = shared_data_dir() / MOBILENET_FILE
    return str(path) if path.is_file() else "none"


@pytest.fixture(scope="session")
def random_mobilenet_file(tmp_path_factory) -> Path:
    """A weights file of a random MobileNet (alpha 0.25) whose predictions differ between images.

    Straight from its initializers, a MobileNet in inference mode shrinks activations towards 0 (every
    BN assumes variance 1), so every image would get uniform probabilities and the equivalence tests
    of the approaches would hold trivially. One training-mode pass with BN momentum 0 gives each BN the
    statistics of the activations it really sees.
    """
    import keras
    import numpy as np

    keras.utils.set_random_seed(0)
    net = keras.applications.MobileNet(alpha=0.25, input_shape=(128, 128, 3), weights=None)
    for layer in net.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.0
    pixels = np.random.default_rng(1).uniform(-1, 1, (32, 128, 128, 3)).astype(np.float32)
    net(pixels, training=True)
    assert len(set(net.predict(pixels, verbose=0).argmax(axis=1))) > 5
    path = tmp_path_factory.mktemp("weights") / "mobilenet_random.weights.h5"
    net.save_weights(path)
    return path


@pytest.fixture
def random_mobilenet(random_mobilenet_file):
    """The [model] section of the MobileNet whose weights ``random_mobilenet_file`` holds."""
    return small_mobilenet(weights=str(random_mobilenet_file))


@pytest.fixture(scope="session")
def _keras_home_dir(mobilenet_weights, tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("keras_home")
    (home / "models").mkdir()
    shutil.copyfile(mobilenet_weights, home / "models" / MOBILENET_FILE)
    return home


@pytest.fixture
def keras_home_with_mobilenet(_keras_home_dir, monkeypatch) -> Path:
    """Point Keras at a home holding the MobileNet weights, so ``weights="imagenet"`` loads offline."""
    monkeypatch.setenv("KERAS_HOME", str(_keras_home_dir))
    # Keras reads KERAS_HOME once at import; patch the module too in case it is already imported.
    import keras.src.backend.config as keras_config

    monkeypatch.setattr(keras_config, "_KERAS_DIR", str(_keras_home_dir))
    return _keras_home_dir


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def free_port():
    """A function returning a TCP port of 127.0.0.1 that nothing listens on, for a server a test starts."""
    return _free_port


@pytest.fixture
def mlflow_server(tmp_path):
    """An `mlflow server` on loopback with a fresh store, stopped after the test."""
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path}/server.db", "--artifacts-destination", str(tmp_path / "art")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{url}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("mlflow server did not start within 60 s")
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


@pytest.fixture(scope="session", autouse=True)
def _no_checkpoints_left_in_the_checkout():
    """Sweeps on a PostgreSQL study keep checkpoints in ./checkpoints (no storage file to put them beside): a
    trial left queued again at a test's end leaves its checkpoint there. Removed after the session, if it made it."""
    folder = Path(__file__).resolve().parents[1] / "checkpoints"
    existed = folder.exists()
    yield
    if not existed:
        shutil.rmtree(folder, ignore_errors=True)
