"""scratch: a VGG/ResNet-style CNN trained from random weights on the 64 px images.

Params (``sweeps/scratch.toml``): ``stem_stride`` (a first 3x3 convolution of ``width`` filters at
stride 1 or 2: stride 2 makes every later layer 4x cheaper, which on a CPU buys epochs), ``stages``
(each ends with a 2x2 max-pool), ``width`` (filters of the first stage, doubled per stage), ``blocks``
per stage (``convs`` 3x3 convolutions each, 1 or 2, with a skip connection when ``residual``),
``batch_norm``, ``dropout`` (before the classifier), ``initializer`` (of every kernel), ``augment``.
Training params are ignored here.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import layers

from tinyopt.core.config.sections import ModelConfig
from tinyopt.core.errors import ConfigError
from tinyopt.models import blocks

TRAINS = True


def _conv(x: Any, filters: int, params: dict[str, Any], *, kernel: int = 3, relu: bool = True,
          strides: int = 1) -> Any:
    batch_norm = params["batch_norm"]
    # A bias before BatchNormalization is cancelled by its mean subtraction.
    x = layers.Conv2D(filters, kernel, strides=strides, padding="same", use_bias=not batch_norm,
                      kernel_initializer=params["initializer"])(x)
    if batch_norm:
        x = blocks.FusedBatchNormalization()(x)
    return layers.ReLU()(x) if relu else x


def _block(x: Any, filters: int, params: dict[str, Any]) -> Any:
    convs = int(params["convs"])
    if not params["residual"]:
        for _ in range(convs):
            x = _conv(x, filters, params)
        return x
    shortcut = x if x.shape[-1] == filters else _conv(x, filters, params, kernel=1, relu=False)
    y = x
    for number in range(convs):
        y = _conv(y, filters, params, relu=number < convs - 1)
    return layers.ReLU()(layers.Add()([shortcut, y]))


def build(params: dict[str, Any], *, model: ModelConfig, wnids: list[str]) -> keras.Model:
    """The from-scratch CNN for one trial, uncompiled.

    Args:
        params: ``stem_stride``, ``stages``, ``width``, ``blocks``, ``convs``, ``residual``, ``batch_norm``,
            ``dropout``, ``initializer``, ``augment``; other keys are ignored.
        model: the ``[model]`` section; its only setting, ``weights``, must be ``"none"`` (it exists so that
            ``--set model.weights=none`` works the same for every approach).
        wnids: class wnids in class-index order (only their number matters).

    Returns:
        uint8 images (N, 64, 64, 3) -> float32 probabilities (N, len(wnids)).

    Raises:
        ConfigError: unknown augment name, or pretrained weights asked of a model trained from scratch.
    """
    if model.pretrained:
        raise ConfigError(f"scratch trains from random weights; model.weights must be none, got {model.weights!r}")
    image = blocks.image_input()
    # Zero-centred pixels: without batch norm, uncentred inputs slow the first layers' training.
    x = layers.Rescaling(1 / 127.5, offset=-1.0, dtype="float32")(blocks.float_images(image, params["augment"]))
    x = _conv(x, params["width"], params, strides=params["stem_stride"])
    for stage in range(params["stages"]):
        for _ in range(params["blocks"]):
            x = _block(x, params["width"] * 2**stage, params)
        x = layers.MaxPooling2D()(x)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dropout(params["dropout"])(x)
    logits = layers.Dense(len(wnids), kernel_initializer=params["initializer"])(x)
    return keras.Model(image, blocks.probabilities(logits), name="scratch")
