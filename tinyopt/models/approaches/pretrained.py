"""pretrained: an ImageNet backbone used as-is. Nothing trains; a trial picks how 64 px images meet it.

Params (``sweeps/pretrained.toml``): ``resize``, ``input_size``, ``flip_tta`` (average the
probabilities of each image and its mirror image), ``restrict_200``:

- true: a softmax over the ImageNet logits of the dataset's classes only;
- false: the baseline of the report this project grew from, the full 1000-way softmax. ``build``
  outputs its ``len(wnids)`` columns, not renormalised, so that they are comparable class
  probabilities for the ensemble. The report's top-1 counts a hit only when the argmax over all
  1000 classes is the label, which those columns cannot tell: ``full_top1`` scores it.

A sweep never runs ``build``'s model on the data: ``split`` gives the 1000 ImageNet logits of each
view, computed once per (weights, resize, input size, view) and shared by every trial that needs
them (``tinyopt.data.activations``), and ``outputs`` and ``full_top1`` finish both ``restrict_200``
choices from them in numpy. ``build``'s model is what a kept trial saves.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
from keras import layers
from scipy.special import softmax

from tinyopt.core.config.sections import ModelConfig
from tinyopt.data.activations import Split
from tinyopt.data.imagenet import imagenet_indices
from tinyopt.models import backbones, blocks

TRAINS = False


def _probabilities(params: dict[str, Any], model_cfg: ModelConfig, wnids: list[str] | None
                   ) -> tuple[Any, Any]:
    """Input and softmax over the ImageNet outputs of ``wnids`` (all 1000 when None), averaged over views."""
    features = backbones.load(model_cfg, input_size=params["input_size"])
    head = features.classifier(wnids)
    image = blocks.image_input()
    x = backbones.resize(blocks.float_images(image), params["resize"], params["input_size"])
    views = [x, keras.ops.flip(x, axis=2)] if params["flip_tta"] else [x]
    probs = [blocks.probabilities(head(features.model(view))) for view in views]
    # float32, or mixed precision would average (and output) in float16.
    return image, probs[0] if len(probs) == 1 else layers.Average(dtype="float32")(probs)


def build(params: dict[str, Any], *, model: ModelConfig, wnids: list[str]) -> keras.Model:
    """The pretrained classifier for one trial.

    Args:
        params: ``resize``, ``input_size``, ``flip_tta``, ``restrict_200``.
        model: the ``[model]`` section (backbone, weights, alpha, weights_resolution).
        wnids: class wnids in class-index order; all must be ImageNet-1k classes.

    Returns:
        uint8 images (N, 64, 64, 3) -> float32 probabilities (N, len(wnids)).

    Raises:
        ConfigError, TrialError, WeightsError: see ``tinyopt.models.backbones.load`` and ``resize``.
        DataError: a wnid is not an ImageNet-1k class.
    """
    restrict = params["restrict_200"]
    image, probs = _probabilities(params, model, wnids if restrict else None)
    if not restrict:
        probs = keras.ops.take(probs, imagenet_indices(wnids), axis=1)
    return keras.Model(image, probs, name="pretrained")


def full_outputs(params: dict[str, Any], *, model: ModelConfig) -> keras.Model:
    """The same pipeline as ``build`` with the full 1000-way ImageNet softmax as output.

    ``restrict_200`` is ignored. With ``restrict_200=false``, ``build``'s output equals
    ``full_outputs(...)(x)[:, imagenet_indices(wnids)]``.
    """
    image, probs = _probabilities(params, model, None)
    return keras.Model(image, probs, name="pretrained_1000")


def uncached(params: dict[str, Any], model: ModelConfig) -> str | None:
    """Why this trial's logits cannot be reused by other trials (None: they can)."""
    if not model.pretrained:
        return "weights = none: each trial's backbone is random"
    return None


def split(pretrained: keras.Model, params: dict[str, Any], *, model: ModelConfig) -> Split:
    """The 1000 ImageNet logits of each view, from which every ``restrict_200`` and ``flip_tta`` is computed.

    ``pretrained`` (``build``'s model) is not needed: nothing trains, ``outputs`` finishes in numpy.
    """
    features = backbones.load(model, input_size=params["input_size"])
    image = blocks.image_input()
    x = backbones.resize(blocks.float_images(image), params["resize"], params["input_size"])
    logits = layers.Activation("linear", dtype="float32")(features.classifier(None)(features.model(x)))
    return Split(keras.Model(image, logits, name="imagenet_logits"), None, boundary="imagenet logits",
                 views=2 if params["flip_tta"] else 1, dtype="float32")


def outputs(params: dict[str, Any], views: list[np.ndarray], *, wnids: list[str]) -> np.ndarray:
    """``build``'s output from the logits of each view (``split``): (N, len(wnids)) probabilities."""
    columns = imagenet_indices(wnids)
    if params["restrict_200"]:
        return np.mean([softmax(view[:, columns], axis=1) for view in views], axis=0)
    return _full(views)[:, columns]


def full_top1(views: list[np.ndarray], *, wnids: list[str], labels: np.ndarray) -> float:
    """Top-1 accuracy of the argmax over all 1000 ImageNet classes (the ``restrict_200=false`` score).

    Args:
        views: the 1000 logits of each view (``split``).
        wnids: class wnids in class-index order.
        labels: integer class indices (N,).

    Returns:
        The fraction of images whose 1000-way argmax is the ImageNet output of their label.
    """
    targets = np.asarray(imagenet_indices(wnids))[np.asarray(labels)]
    return float(np.mean(np.argmax(_full(views), axis=1) == targets))


def _full(views: list[np.ndarray]) -> np.ndarray:
    return np.mean([softmax(view, axis=1) for view in views], axis=0)
