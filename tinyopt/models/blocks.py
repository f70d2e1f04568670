"""Pieces shared by the approaches' models: the image input, augmentation, batch norm and the output softmax."""

from __future__ import annotations

from typing import Any

import keras
from keras import layers

from tinyopt.core.errors import ConfigError
from tinyopt.core.schema import AUGMENTATIONS

IMAGE_SIZE = 64


def image_input() -> Any:
    """The model input: uint8 images, kept as uint8 until here to spare host memory."""
    return keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3), dtype="uint8", name="image")


def _augmentation_layers(augment: str) -> list[layers.Layer]:
    if augment not in AUGMENTATIONS:
        raise ConfigError(f"unknown augment {augment!r}; choose one of: {', '.join(AUGMENTATIONS)}")
    if augment == "none":
        return []
    chain: list[layers.Layer] = [layers.RandomFlip("horizontal", dtype="float32")]
    if augment == "flip_crop":
        # Zooming in by up to 25% then shifting is a random crop of 75-100% of the side, rescaled to
        # the full size; keras' RandomCrop would instead resize the image at inference.
        chain.append(layers.RandomZoom((-0.25, 0.0), fill_mode="reflect", dtype="float32"))
    if augment in ("flip_translate", "flip_crop"):
        chain.append(layers.RandomTranslation(0.125, 0.125, fill_mode="reflect", dtype="float32"))
    return chain


def float_images(image: Any, augment: str = "none") -> Any:
    """Cast uint8 images to float32 0..255 pixels and add the training-only augmentation.

    Args:
        image: the uint8 input tensor.
        augment: ``none``, ``flip`` (horizontal), ``flip_translate`` (+ shifts up to 1/8 of the side)
            or ``flip_crop`` (+ random crops of 75-100% of the side, rescaled).

    Raises:
        ConfigError: unknown augment name.
    """
    x = keras.ops.cast(image, "float32")
    for layer in _augmentation_layers(augment):
        x = layer(x)
    return x


def probabilities(logits: Any) -> Any:
    """Softmax in float32, also when the rest of the model runs in mixed precision."""
    return layers.Activation("softmax", dtype="float32")(logits)


class FusedBatchNormalization(layers.BatchNormalization):
    """Keras' ``BatchNormalization``, computed by TensorFlow's fused kernel on the TensorFlow backend.

    Keras 3 normalises with separate TensorFlow ops (the moments, then the affine transform, and as many
    again for the gradient; keras-team/keras-core#225): on a CPU they took a third of a scratch epoch,
    which TensorFlow's ``FusedBatchNormV3`` does in one kernel each way. Same weights, same moving
    statistics, same outputs; anything the kernel does not cover (another backend or axis, a mask,
    renorm) runs Keras' own code. ``plain_keras`` turns it back into ``BatchNormalization`` for saving.
    """

    def call(self, inputs, training=None, mask=None):
        if (keras.backend.backend() != "tensorflow" or mask is not None or self.renorm or len(inputs.shape) != 4
                or self.axis not in (-1, 3) or not (self.center and self.scale)):
            return super().call(inputs, training=training, mask=mask)
        import tensorflow as tf

        learning = bool(training and self.trainable)
        normalised, mean, variance, *_ = tf.raw_ops.FusedBatchNormV3(
            x=inputs, scale=keras.ops.cast(self.gamma, "float32"), offset=keras.ops.cast(self.beta, "float32"),
            mean=tf.zeros([0]) if learning else keras.ops.cast(self.moving_mean, "float32"),
            variance=tf.zeros([0]) if learning else keras.ops.cast(self.moving_variance, "float32"),
            epsilon=self.epsilon, is_training=learning, data_format="NHWC")
        if learning:
            # The kernel returns the batch variance with Bessel's correction; Keras averages the biased one.
            count = keras.ops.cast(keras.ops.prod(keras.ops.shape(inputs)[:-1]), "float32")
            variance = variance * (count - 1.0) / count
            for moving, batch in ((self.moving_mean, mean), (self.moving_variance, variance)):
                moving.assign(moving * self.momentum + keras.ops.cast(batch, moving.dtype) * (1.0 - self.momentum))
        return keras.ops.cast(normalised, self.compute_dtype)


def plain_keras(model: keras.Model) -> keras.Model:
    """``model`` with each ``FusedBatchNormalization`` replaced by Keras' ``BatchNormalization``, weights copied.

    The layers of tinyopt's own would otherwise be saved by their tinyopt class name, which Keras
    cannot load without tinyopt. Only ``model``'s own layers are looked at (the scratch CNN nests no
    model); a model that has none is returned as it is.
    """
    swapped: dict[int, tuple[layers.Layer, layers.Layer]] = {}

    def swap(layer: layers.Layer) -> layers.Layer:
        if not isinstance(layer, FusedBatchNormalization):
            return layer  # shared with the model as it is: weights and all
        plain = layers.BatchNormalization.from_config(layer.get_config())
        swapped[id(layer)] = (layer, plain)
        return plain

    if not any(isinstance(layer, FusedBatchNormalization) for layer in model.layers):
        return model
    clone = keras.models.clone_model(model, clone_function=swap)
    for fused, plain in swapped.values():
        plain.set_weights(fused.get_weights())
    return clone
