"""Backbone registry, in-model preprocessing and resizing, and weights errors."""

from __future__ import annotations

import urllib.error

import keras
import numpy as np
import pytest
from fixtures import model_config

from tinyopt.core.errors import ConfigError, TrialError, WeightsError
from tinyopt.models import backbones

pytestmark = pytest.mark.backend  # CI runs these under JAX as well as TensorFlow


@pytest.mark.parametrize("name, reference", [("resnet50", keras.applications.resnet50.preprocess_input),
                                              ("mobilenet", keras.applications.mobilenet.preprocess_input)])
def test_preprocess_matches_keras_applications(name, reference):
    pixels = np.random.default_rng(0).uniform(0, 255, (3, 8, 8, 3)).astype(np.float32)
    inputs = keras.Input((8, 8, 3))
    ours = keras.Model(inputs, backbones.get(name).preprocess(inputs)).predict(pixels, verbose=0)
    np.testing.assert_allclose(ours, reference(pixels.copy()), atol=1e-5)


@pytest.mark.parametrize("name, expected", [
    ("resnet50", {"conv1_conv": 1, "conv1_bn": 1, "conv2_block1_0_conv": 2, "conv3_block4_3_bn": 3,
                  "conv4_block6_2_conv": 4, "conv5_block1_1_conv": 5}),
    ("mobilenet", {"conv1": 1, "conv1_bn": 1, "conv_pw_1_bn": 1, "conv_pad_2": 2, "conv_dw_3": 2,
                   "conv_dw_4": 3, "conv_pw_5_bn": 3, "conv_dw_6": 4, "conv_pw_11": 4, "conv_dw_12_bn": 5,
                   "conv_pw_13": 5}),
])
def test_stages(name, expected):
    stage_of = backbones.get(name).stage_of
    assert {layer: stage_of(layer) for layer in expected} == expected
    with pytest.raises(ValueError):
        stage_of("predictions")


def test_unknown_backbone():
    with pytest.raises(ConfigError, match="vgg16"):
        backbones.get("vgg16")


def _resized(method: str, size: int, images: np.ndarray, *, jit_compile: bool = False) -> np.ndarray:
    inputs = keras.Input(images.shape[1:])
    model = keras.Model(inputs, backbones.resize(inputs, method, size))
    model.jit_compile = jit_compile
    return model.predict(images, verbose=0)


def test_zeropad_centres_the_image_in_zeros():
    images = np.random.default_rng(0).uniform(1, 255, (2, 64, 64, 3)).astype(np.float32)
    padded = _resized("zeropad", 96, images)
    assert padded.shape == (2, 96, 96, 3)
    np.testing.assert_array_equal(padded[:, 16:80, 16:80], images)
    assert np.count_nonzero(padded) == images.size


@pytest.mark.parametrize("method", ["bilinear", "bicubic", "area"])
@pytest.mark.parametrize("size", [40, 96, 224])
def test_resize_methods(method, size):
    """Each method resizes as ``keras.ops.image.resize`` does; ``area`` as TensorFlow's, which JAX lacks."""
    if method == "area" and keras.backend.backend() != "tensorflow":
        pytest.importorskip("tensorflow", reason="area resize is compared with TensorFlow's own")
    images = np.random.default_rng(0).uniform(0, 255, (2, 64, 64, 3)).astype(np.float32)
    if method == "area":
        import tensorflow as tf

        expected = tf.image.resize(images, (size, size), method="area").numpy()
    else:
        expected = keras.ops.convert_to_numpy(keras.ops.image.resize(images, (size, size), interpolation=method))
    # TensorFlow's area kernel rounds its weights in float32 (1e-5), times pixel values up to 255.
    np.testing.assert_allclose(_resized(method, size, images), expected, atol=1e-2 if method == "area" else 1e-3)


@pytest.mark.parametrize("method", backbones.RESIZE_METHODS)
def test_resize_compiles_with_xla(method):
    """Keras compiles with XLA by default on GPUs, which has no bicubic or area resize kernel of its own."""
    images = np.random.default_rng(0).uniform(0, 255, (2, 64, 64, 3)).astype(np.float32)
    np.testing.assert_allclose(_resized(method, 96, images, jit_compile=True), _resized(method, 96, images),
                               atol=1e-3)


def test_resize_errors():
    inputs = keras.Input((64, 64, 3))
    with pytest.raises(TrialError, match="zeropad"):
        backbones.resize(inputs, "zeropad", 48)
    with pytest.raises(ConfigError, match="nearest"):
        backbones.resize(inputs, "nearest", 96)
    with pytest.raises(ConfigError, match="at least 32"):
        backbones.resize(inputs, "bilinear", 16)


def _load(**model):
    return backbones.load(model_config(**model), input_size=32)


@pytest.fixture
def offline_keras_home(tmp_path, monkeypatch):
    """An empty Keras home and no network, whatever the machine running the tests can reach."""
    import keras.src.backend.config as keras_config
    import keras.src.utils.file_utils as file_utils

    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.setattr(keras_config, "_KERAS_DIR", str(tmp_path))

    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(file_utils, "urlretrieve", no_network)


def test_imagenet_weights_unreachable_says_how_to_go_on(offline_keras_home):
    with pytest.raises(WeightsError) as info:
        _load(backbone="mobilenet", alpha=0.5, weights_resolution=128, weights="imagenet")
    message = str(info.value)
    assert "\n" not in message
    assert "mobilenet (alpha 0.5)" in message and "--set model.weights=PATH" in message and "none" in message


@pytest.mark.parametrize("model, match", [
    ({"alpha": 0.3, "weights_resolution": 128}, "alpha"),
    ({"alpha": 0.25, "weights_resolution": 100}, "weights_resolution"),
])
def test_imagenet_weights_exist_only_for_some_mobilenets(model, match):
    with pytest.raises(WeightsError, match=match):
        _load(backbone="mobilenet", weights="imagenet", **model)


def test_missing_weights_file(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        _load(backbone="mobilenet", alpha=0.25, weights=str(tmp_path / "nope.h5"))


def test_imagenet_weights_from_keras_home(keras_home_with_mobilenet, mobilenet_weights):
    """``weights="imagenet"`` takes the file Keras finds in $KERAS_HOME/models/, at any input size."""
    features = _load(backbone="mobilenet", alpha=0.25, weights_resolution=128, weights="imagenet")
    reference = keras.applications.MobileNet(alpha=0.25, input_shape=(128, 128, 3), weights=str(mobilenet_weights))
    kernel, bias = reference.get_layer("conv_preds").get_weights()
    np.testing.assert_array_equal(features.kernel, kernel.reshape(-1, 1000))
    np.testing.assert_array_equal(features.bias, bias)
    np.testing.assert_array_equal(features.model.get_layer("conv_pw_13").get_weights()[0],
                                  reference.get_layer("conv_pw_13").get_weights()[0])
