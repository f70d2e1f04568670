"""ImageNet backbones from ``keras.applications``: how tinyopt builds, feeds, loads and freezes each.

``load()`` returns a backbone cut below its 1000-way ImageNet classifier: a feature model that takes
float images at the input size and holds the backbone's own ``preprocess_input`` (as built-in Keras
layers and ops, so a saved model reloads without tinyopt), plus the classifier's kernel and bias,
which the approaches use whole, restrict to their classes, or replace. ``resize()`` brings the
dataset's images to the input size in front of it.

The model is always built with ``include_top=True`` and ``weights=None`` at the requested input size,
and the weights of the model Keras builds at its canonical size are copied in: convolution, pooling
and classifier weights do not depend on the input size, so one code path serves ``imagenet`` (Keras
downloads into ``$KERAS_HOME/models/`` and reuses that file), a local weights file, and every size.
"""

from __future__ import annotations

import bisect
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import keras
import numpy as np
from keras import layers

from tinyopt.core.config.sections import ModelConfig
from tinyopt.core.errors import ConfigError, TrialError, WeightsError
from tinyopt.core.schema import IMAGENET_WEIGHTS, MIN_INPUT_SIZE, RESIZE_METHODS
from tinyopt.data.activations import digest
from tinyopt.data.imagenet import imagenet_indices

STAGES = 5
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


def _caffe_preprocess(x: Any) -> Any:
    """``imagenet_utils.preprocess_input`` in "caffe" mode (ResNet50): RGB to BGR, minus the BGR mean."""
    x = keras.ops.flip(x, axis=-1)
    return layers.Rescaling(1.0, offset=[-mean for mean in _CAFFE_MEAN_BGR], dtype="float32")(x)


def _tf_preprocess(x: Any) -> Any:
    """``imagenet_utils.preprocess_input`` in "tf" mode (MobileNet): 0..255 to -1..1."""
    return layers.Rescaling(1 / 127.5, offset=-1.0, dtype="float32")(x)


def _resnet_stage(layer_name: str) -> int:
    """conv1/pool1 (the stem) are stage 1; ``convN_block*`` layers are stage N."""
    match = re.match(r"(?:conv|pool)([1-5])_", layer_name)
    if match is None:
        raise ValueError(f"ResNet layer {layer_name!r} belongs to no stage")
    return int(match.group(1))


# MobileNet's stride-2 depthwise blocks; each begins a stage, as conv2..conv5 do in ResNet50.
_MOBILENET_STAGE_STARTS = (2, 4, 6, 12)


def _mobilenet_stage(layer_name: str) -> int:
    """conv1 + block 1 are stage 1 (the stem); blocks 2-3, 4-5, 6-11 and 12-13 are stages 2 to 5."""
    match = re.match(r"conv_(?:dw|pw|pad)_(\d+)(?:_|$)", layer_name)
    if match is None and not layer_name.startswith("conv1"):
        raise ValueError(f"MobileNet layer {layer_name!r} belongs to no stage")
    block = int(match.group(1)) if match else 1
    return 1 + bisect.bisect_right(_MOBILENET_STAGE_STARTS, block)


@dataclass(frozen=True)
class Backbone:
    """How to build, feed and freeze one ``keras.applications`` model.

    Attributes:
        constructor: the ``keras.applications`` function.
        preprocess: adds the model's own ``preprocess_input`` to a float tensor of 0..255 pixels.
        classifier: name of the 1000-way ImageNet layer (its input is the pooled feature vector).
        stage_of: layer name -> freeze stage, 1 (stem) to ``STAGES`` (last).
        stage_ends: the layer whose output ends each of stages 1 to ``STAGES - 1``: everything after
            it depends on that output alone, so a frozen prefix can be cut there.
        resolutions: input sizes that ImageNet weights exist for; the first is the default.
        alphas: width multipliers that ImageNet weights exist for; empty if the model has no ``alpha``.
    """

    constructor: Callable[..., Any]
    preprocess: Callable[[Any], Any]
    classifier: str
    stage_of: Callable[[str], int]
    stage_ends: tuple[str, ...]
    resolutions: tuple[int, ...]
    alphas: tuple[float, ...] = ()


# The names of tinyopt.core.schema.BACKBONES; which ImageNet weights each has is stated there, without keras.
_BACKBONES = {
    "resnet50": Backbone(keras.applications.ResNet50, _caffe_preprocess, "predictions", _resnet_stage,
                         ("pool1_pool", "conv2_block3_out", "conv3_block4_out", "conv4_block6_out"),
                         **IMAGENET_WEIGHTS["resnet50"]),
    "mobilenet": Backbone(keras.applications.MobileNet, _tf_preprocess, "conv_preds", _mobilenet_stage,
                          ("conv_pw_1_relu", "conv_pw_3_relu", "conv_pw_5_relu", "conv_pw_11_relu"),
                          **IMAGENET_WEIGHTS["mobilenet"]),
}
NAMES = tuple(_BACKBONES)


def get(name: str) -> Backbone:
    """The registry entry of a backbone name (``model.backbone``).

    Raises:
        ConfigError: unknown name.
    """
    if name not in _BACKBONES:
        raise ConfigError(f"unknown model.backbone {name!r}; choose one of: {', '.join(NAMES)}")
    return _BACKBONES[name]


@dataclass(frozen=True)
class Features:
    """A backbone cut below its ImageNet classifier.

    Attributes:
        model: float32 images (N, S, S, 3) with 0..255 pixels at the input size -> pooled features
            (N, F); the backbone's ``preprocess_input`` is inside it.
        kernel: the ImageNet classifier's kernel, (F, 1000).
        bias: the ImageNet classifier's bias, (1000,).
        backbone: the registry entry, for freezing by stage.
    """

    model: keras.Model
    kernel: np.ndarray
    bias: np.ndarray
    backbone: Backbone

    def classifier(self, wnids: Iterable[str] | None = None, name: str = "head") -> layers.Dense:
        """A Dense layer over the features holding the ImageNet classifier's rows for ``wnids``.

        Args:
            wnids: the classes to keep, in output order; None keeps all 1000 ImageNet outputs.
            name: layer name.

        Returns:
            A built Dense layer (linear: its outputs are logits).

        Raises:
            DataError: a wnid is not an ImageNet-1k class.
        """
        columns = slice(None) if wnids is None else imagenet_indices(wnids)
        kernel, bias = self.kernel[:, columns], self.bias[columns]
        dense = layers.Dense(bias.shape[0], name=name)
        dense.build((None, kernel.shape[0]))
        # Set after building rather than through a Constant initializer, which would copy the whole
        # matrix into the saved model's config.
        dense.set_weights([kernel, bias])
        return dense

    def set_trainable_stages(self, count: int) -> None:
        """Let only the last ``count`` stages train: 0 freezes the whole backbone, ``STAGES`` frees it all.

        Keras 3 runs a non-trainable BatchNormalization layer in inference mode, so the frozen stages
        keep their ImageNet statistics while the others train.

        Raises:
            ConfigError: ``count`` outside 0..STAGES.
        """
        if not 0 <= count <= STAGES:
            raise ConfigError(f"trainable_stages must be 0 to {STAGES}, got {count}")
        first = STAGES - count + 1
        for layer in self.model.layers:
            if layer.weights:
                layer.trainable = self.backbone.stage_of(layer.name) >= first


def frozen_boundary(model: keras.Model, backbone: Backbone, trainable_stages: int) -> Any:
    """The tensor of the feature ``model`` where its frozen stages end and the ``trainable_stages`` begin.

    0 trainable stages give the model's output (the pooled features); ``STAGES`` give its input.
    """
    frozen = STAGES - trainable_stages
    if frozen == STAGES:
        return model.output
    return model.input if frozen == 0 else model.get_layer(backbone.stage_ends[frozen - 1]).output


def _interpolation_matrix(method: str, source: int, size: int) -> np.ndarray:
    """The (source, size) matrix that resizes one axis, taken from Keras' own resize of one-hot columns.

    ``area`` is computed here (each output pixel averages the input it covers, as TensorFlow's
    ResizeArea does), because ``keras.ops.image.resize`` offers it on TensorFlow only.
    """
    if method == "area":
        scale = source / size
        starts = np.arange(size) * scale
        pixels = np.arange(source)[:, None]
        overlap = np.minimum(pixels + 1, starts + scale) - np.maximum(pixels, starts)
        return (np.clip(overlap, 0, None) / scale).astype(np.float32)
    one_hot = np.eye(source, dtype=np.float32).reshape(source, source, 1, 1)
    resized = keras.ops.image.resize(one_hot, (size, 1), interpolation=method)
    return keras.ops.convert_to_numpy(resized).reshape(source, size)


def _separable_resize(x: Any, matrix: np.ndarray) -> Any:
    # Not keras.layers.Resizing: XLA has no bicubic or area resize kernels, and Keras compiles with
    # XLA by default on GPUs, for training and for predict. These interpolations are separable, so
    # one fixed matrix product per axis gives the same result with ops that XLA compiles.
    axis = layers.Dense(matrix.shape[1], use_bias=False, trainable=False, dtype="float32")
    axis.build((None, matrix.shape[0]))
    axis.set_weights([matrix])
    x = layers.Permute((3, 1, 2), dtype="float32")(x)  # (N, C, H, W): Dense acts on the last axis
    x = layers.Permute((1, 3, 2), dtype="float32")(axis(x))  # (N, C, W', H)
    return layers.Permute((3, 2, 1), dtype="float32")(axis(x))  # (N, C, W', H') -> (N, H', W', C)


def resize(x: Any, method: str, size: int) -> Any:
    """Resize square float images to ``size`` x ``size`` inside a model.

    Args:
        x: (N, H, H, C) float tensor.
        method: ``bilinear``, ``bicubic`` or ``area`` (as ``keras.ops.image.resize``, without
            antialiasing), or ``zeropad`` (centred in zero pixels, as the report did).
        size: target side.

    Raises:
        ConfigError: unknown method, or a size below 32.
        TrialError: zeropad to a size below the image size.
    """
    if method not in RESIZE_METHODS:
        raise ConfigError(f"unknown resize {method!r}; choose one of: {', '.join(RESIZE_METHODS)}")
    if size < MIN_INPUT_SIZE:
        raise ConfigError(f"input_size must be at least {MIN_INPUT_SIZE} for keras.applications models, "
                          f"got {size}")
    current = x.shape[1]
    if size == current:
        return x
    if method != "zeropad":
        return _separable_resize(x, _interpolation_matrix(method, current, size))
    pad = size - current
    if pad < 0:
        raise TrialError(f"resize='zeropad' cannot shrink {current} px images to input_size={size}; "
                         f"use an input_size of at least {current} or another resize method")
    return layers.ZeroPadding2D(((pad // 2, pad - pad // 2),) * 2, dtype="float32")(x)


def _describe(name: str, spec: Backbone, alpha: float) -> str:
    return f"{name} (alpha {alpha})" if spec.alphas else name


def _constructor_kwargs(spec: Backbone, alpha: float) -> dict[str, Any]:
    return {"alpha": alpha} if spec.alphas else {}


@dataclass(frozen=True)
class _Weights:
    arrays: tuple[np.ndarray, ...]
    digest: str  # of the arrays, so that imagenet and the same file under another name agree


@lru_cache(maxsize=2)
def _source_weights(name: str, alpha: float, size: int, source: str, stamp: object) -> _Weights:
    """The weights of the model Keras builds from ``source`` at its canonical size.

    Cached so that repeated trials do not rebuild and reload it; ``stamp`` (the file's mtime, or
    KERAS_HOME for ``imagenet``) only keys the cache.
    """
    spec = _BACKBONES[name]
    net = spec.constructor(include_top=True, weights=source, input_shape=(size, size, 3),
                           **_constructor_kwargs(spec, alpha))
    arrays = tuple(net.get_weights())
    return _Weights(arrays, digest(*arrays))


def weights_digest(model_cfg: ModelConfig) -> str | None:
    """A digest of the pretrained weights a ``[model]`` section loads (None for ``weights = "none"``).

    Taken from the loaded arrays: ``imagenet`` and the same file under another name agree, a file
    replaced in place does not.
    """
    weights = _pretrained_weights(model_cfg.backbone, get(model_cfg.backbone), float(model_cfg.alpha), model_cfg)
    return None if weights is None else weights.digest


def _first_line(err: Exception) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def _pretrained_weights(name: str, spec: Backbone, alpha: float, model_cfg: ModelConfig) -> _Weights | None:
    source = str(model_cfg.weights)
    if source.lower() == "none":
        return None
    described = _describe(name, spec, alpha)
    size = int(model_cfg.weights_resolution) if spec.alphas else spec.resolutions[0]
    fallback = "pass a local weights file with --set model.weights=PATH, or --set model.weights=none"
    if source == "imagenet":
        if spec.alphas and alpha not in spec.alphas:
            raise WeightsError(f"ImageNet weights of {name} exist for model.alpha in {list(spec.alphas)}, not "
                               f"{alpha}; set one of those, or {fallback}")
        if size not in spec.resolutions:
            raise WeightsError(f"ImageNet weights of {name} exist for model.weights_resolution in "
                               f"{list(spec.resolutions)}, not {size}; set one of those, or {fallback}")
        try:
            return _source_weights(name, alpha, size, "imagenet", os.environ.get("KERAS_HOME", ""))
        except Exception as err:  # Keras raises a bare Exception when the download fails
            raise WeightsError(f"cannot get the ImageNet weights of {described} ({_first_line(err)}); "
                               f"{fallback}") from err
    path = Path(source).expanduser()
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist; {fallback}, or imagenet")
    try:
        return _source_weights(name, alpha, size, str(path.resolve()), path.stat().st_mtime_ns)
    except Exception as err:  # h5py and Keras raise several types for a file of another model
        raise WeightsError(f"weights file {path} does not fit backbone {described} ({_first_line(err)}); "
                           f"pass weights of that backbone with its 1000-way classifier (include_top=True), "
                           f"or --set model.weights=imagenet or none"
                           ) from err


def check_weights(model_cfg: ModelConfig) -> None:
    """Load the pretrained weights a ``[model]`` section names, before any study exists.

    They are cached, so the first trial does not load them again.

    Raises:
        ConfigError: unknown backbone.
        WeightsError: the weights cannot be had (no download) or do not fit the backbone.
    """
    _pretrained_weights(model_cfg.backbone, get(model_cfg.backbone), float(model_cfg.alpha), model_cfg)


def load(model_cfg: ModelConfig, *, input_size: int) -> Features:
    """Build a backbone with its weights, cut below the ImageNet classifier.

    Args:
        model_cfg: the ``[model]`` section: ``backbone``, ``weights`` ("imagenet", a weights file, or
            "none"), ``alpha`` and ``weights_resolution`` (MobileNet only).
        input_size: side of the (already resized, see ``resize``) images the backbone sees.

    Returns:
        The feature model and the ImageNet classifier weights.

    Raises:
        ConfigError: unknown backbone.
        WeightsError: the weights cannot be had or do not fit the backbone.
    """
    name = model_cfg.backbone
    spec = get(name)
    alpha = float(model_cfg.alpha)
    weights = _pretrained_weights(name, spec, alpha, model_cfg)
    pixels = keras.Input((input_size, input_size, 3), dtype="float32", name="pixels")
    net = spec.constructor(include_top=True, weights=None, input_tensor=spec.preprocess(pixels),
                           input_shape=(input_size, input_size, 3), classifier_activation=None,
                           **_constructor_kwargs(spec, alpha))
    if weights is not None:
        net.set_weights(weights.arrays)
    top = net.get_layer(spec.classifier)
    kernel, bias = top.get_weights()
    features = layers.Flatten()(top.input)
    return Features(keras.Model(pixels, features, name="backbone"), kernel.reshape(-1, kernel.shape[-1]), bias,
                    spec)
