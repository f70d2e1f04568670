"""Pieces shared by the approaches' models: the uint8 input, float pixels and augmentation, softmax, batch norm."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from tinyopt.core.errors import ConfigError
from tinyopt.core.schema import AUGMENTATIONS
from tinyopt.models import blocks
from tinyopt.models.blocks import FusedBatchNormalization, plain_keras


def _images(n: int = 4) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, 64, 64, 3), dtype=np.uint8)


def test_image_input_is_uint8_at_the_dataset_size():
    image = blocks.image_input()
    assert tuple(image.shape) == (None, blocks.IMAGE_SIZE, blocks.IMAGE_SIZE, 3) == (None, 64, 64, 3)
    assert image.dtype == "uint8" and image.name == "image"


@pytest.mark.parametrize("augment", AUGMENTATIONS)
def test_float_images_are_the_pixels_as_float32_outside_training(augment):
    image = blocks.image_input()
    model = keras.Model(image, blocks.float_images(image, augment))
    assert model.outputs[0].dtype == "float32"
    images = _images()
    out = keras.ops.convert_to_numpy(model(images, training=False))
    np.testing.assert_array_equal(out, images.astype(np.float32))


def test_augmentation_changes_the_pixels_in_training_only():
    image = blocks.image_input()
    model = keras.Model(image, blocks.float_images(image, "flip_crop"))
    assert [type(layer).__name__ for layer in model.layers if type(layer).__name__.startswith("Random")] == [
        "RandomFlip", "RandomZoom", "RandomTranslation"]
    images = _images(8)
    keras.utils.set_random_seed(0)
    trained = keras.ops.convert_to_numpy(model(images, training=True))
    assert trained.shape == images.shape and not np.array_equal(trained, images.astype(np.float32))


def test_unknown_augment_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown augment 'mixup'; choose one of: none, flip, flip_translate"):
        blocks.float_images(blocks.image_input(), "mixup")


def test_probabilities_are_a_float32_softmax_under_mixed_precision():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        logits = keras.Input((3,))
        model = keras.Model(logits, blocks.probabilities(keras.layers.Dense(3)(logits)))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert model.outputs[0].dtype == "float32"
    x = np.array([[0.0, 1.0, 2.0]], dtype=np.float32)
    model.layers[1].set_weights([np.eye(3, dtype=np.float32), np.zeros(3, dtype=np.float32)])
    expected = np.exp(x) / np.exp(x).sum()
    np.testing.assert_allclose(model.predict(x, verbose=0), expected, atol=1e-3)  # float16 logits


def _twin_models(fused: bool) -> keras.Model:
    keras.utils.set_random_seed(3)
    image = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(6, 3, padding="same", use_bias=False)(image)
    x = (FusedBatchNormalization if fused else keras.layers.BatchNormalization)(momentum=0.5)(x)
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.ReLU()(x))
    model = keras.Model(image, keras.layers.Dense(4, activation="softmax")(x))
    model.compile(keras.optimizers.SGD(0.5), "sparse_categorical_crossentropy")
    return model


@pytest.mark.backend
@pytest.mark.parametrize("policy, tolerance", [("float32", 1e-5), ("mixed_bfloat16", 3e-2)])
def test_fused_batch_norm_trains_and_predicts_as_keras_batch_norm(policy, tolerance):
    """Outputs, gradients and moving statistics alike: after 3 epochs every weight and prediction agrees."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(2.0, 3.0, (64, 8, 8, 3)).astype("float32"), rng.integers(0, 4, 64)
    keras.mixed_precision.set_global_policy(policy)
    try:
        models = [_twin_models(fused) for fused in (False, True)]
        for model in models:
            model.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0)
        keras_bn, fused_bn = models
        assert any(isinstance(layer, FusedBatchNormalization) for layer in fused_bn.layers)
        for mine, theirs in zip(fused_bn.get_weights(), keras_bn.get_weights(), strict=True):
            np.testing.assert_allclose(mine, theirs, atol=tolerance, rtol=tolerance)
        assert not np.allclose(fused_bn.get_layer(index=2).moving_variance, 1.0)  # the statistics did move
        np.testing.assert_allclose(fused_bn.predict(x, verbose=0), keras_bn.predict(x, verbose=0), atol=tolerance)
    finally:
        keras.mixed_precision.set_global_policy("float32")


@pytest.mark.backend
def test_plain_keras_swaps_fused_batch_norm_for_keras_own_with_its_weights():
    model = _twin_models(fused=True)
    x = np.random.default_rng(1).normal(size=(16, 8, 8, 3)).astype("float32")
    model.fit(x, np.arange(16) % 4, epochs=1, verbose=0)
    plain = plain_keras(model)
    assert [type(layer).__name__ for layer in plain.layers].count("BatchNormalization") == 1
    assert not any(isinstance(layer, FusedBatchNormalization) for layer in plain.layers)
    np.testing.assert_allclose(plain.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)
    unchanged = _twin_models(fused=False)
    assert plain_keras(unchanged) is unchanged
