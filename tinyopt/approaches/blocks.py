"""Pieces shared by the approaches' models: the image input, augmentation and the output softmax."""

from __future__ import annotations

from typing import Any

import keras
from keras import layers

from tinyopt.errors import ConfigError
from tinyopt.schema import AUGMENTATIONS

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
