"""finetune: an ImageNet backbone with a new head for the dataset's classes, trained from a chosen stage.

Params (``sweeps/finetune.toml``): ``trainable_stages`` (how many final backbone stages train: 0 =
head only, 5 = everything), ``head_init`` (``pretrained``: the ImageNet classifier's own rows for
these classes, so training starts from the as-is accuracy; ``random``), ``head_width`` (a hidden
ReLU layer of that width before the head; random init only; absent or 0 = none), ``dropout`` (before
the head), ``resize``, ``input_size``, ``augment``. Training params (optimizer, learning rate, ...) are
ignored here; ``tinyopt.train.training`` compiles and fits the model.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import layers

from tinyopt.core.config.sections import ModelConfig
from tinyopt.core.errors import ConfigError, TrialError
from tinyopt.core.schema import HEAD_INITS
from tinyopt.data.activations import Split
from tinyopt.models import backbones, blocks

TRAINS = True
# Augmentations a cache of frozen activations can keep: a flip is one of two cached views per image.
CACHED_AUGMENTATIONS = ("none", "flip")
_TOP = "top"  # the layers after the backbone, as one sub-model the cached suffix reuses


def build(params: dict[str, Any], *, model: ModelConfig, wnids: list[str]) -> keras.Model:
    """The fine-tuning model for one trial, uncompiled.

    Args:
        params: ``trainable_stages``, ``head_init``, ``head_width`` (optional), ``dropout``, ``resize``,
            ``input_size``, ``augment``; other keys are ignored.
        model: the ``[model]`` section (backbone, weights, alpha, weights_resolution).
        wnids: class wnids in class-index order; ImageNet-1k classes when ``head_init="pretrained"``.

    Returns:
        uint8 images (N, 64, 64, 3) -> float32 probabilities (N, len(wnids)); frozen stages are
        non-trainable, their BatchNormalization layers in inference mode.

    Raises:
        ConfigError: unknown names or a ``trainable_stages`` outside 0..5.
        TrialError: a hidden head layer with ``head_init="pretrained"``, or zeropad below 64 px.
        WeightsError: see ``tinyopt.models.backbones.load``.
    """
    head_init, width = params["head_init"], params.get("head_width") or 0
    if head_init not in HEAD_INITS:
        raise ConfigError(f"unknown head_init {head_init!r}; choose one of: {', '.join(HEAD_INITS)}")
    if head_init == "pretrained" and width:
        raise TrialError(f"head_width={width} needs head_init='random': the pretrained head is the ImageNet "
                         "classifier itself, with no hidden layer; use head_width=0")
    features = backbones.load(model, input_size=params["input_size"])
    features.set_trainable_stages(params["trainable_stages"])
    pooled = keras.Input(features.model.output.shape[1:], name="features")
    x = pooled
    if width:
        x = layers.Dense(width, activation="relu", name="hidden")(x)
    x = layers.Dropout(params["dropout"])(x)
    head = features.classifier(wnids) if head_init == "pretrained" else layers.Dense(len(wnids), name="head")
    top = keras.Model(pooled, blocks.probabilities(head(x)), name=_TOP)
    image = blocks.image_input()
    x = blocks.float_images(image, params["augment"])
    x = features.model(backbones.resize(x, params["resize"], params["input_size"]))
    return keras.Model(image, top(x), name="finetune")


def uncached(params: dict[str, Any], model: ModelConfig) -> str | None:
    """Why this trial cannot train on cached activations of its frozen stages (None: it can)."""
    if params["trainable_stages"] >= backbones.STAGES:
        return "nothing is frozen (trainable_stages = 5)"
    if params["augment"] not in CACHED_AUGMENTATIONS:
        return f"augment = {params['augment']} changes every image in every epoch"
    if not model.pretrained:
        return "weights = none: each trial's backbone is random"
    return None


def split(finetune: keras.Model, params: dict[str, Any], *, model: ModelConfig) -> Split:
    """The model ``build`` made, cut where its frozen stages end (see ``uncached`` for when it can be).

    The prefix runs the frozen stages on un-augmented images (a horizontal flip is applied to the
    uint8 images before it: ``views``); the suffix is the rest, sharing the model's layers, so that
    training the suffix trains the model.
    """
    bone = finetune.get_layer("backbone")
    boundary = backbones.frozen_boundary(bone, backbones.get(model.backbone),
                                         params["trainable_stages"])
    image = blocks.image_input()
    pixels = backbones.resize(blocks.float_images(image), params["resize"], params["input_size"])
    prefix = keras.Model(image, keras.Model(bone.input, boundary, name="frozen")(pixels), name="finetune_frozen")
    cut = keras.Input(boundary.shape[1:], name="activations")
    x = cut if boundary is bone.output else keras.Model(boundary, bone.output, name="trainable")(cut)
    suffix = keras.Model(cut, finetune.get_layer(_TOP)(x), name="finetune_trainable")
    views = 2 if params["augment"] == "flip" else 1
    frozen = backbones.STAGES - params["trainable_stages"]
    return Split(prefix, suffix, boundary=f"stage {frozen} output", views=views)
