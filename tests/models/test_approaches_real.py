"""The pretrained and finetune builders with the real ImageNet MobileNet weights on real Tiny ImageNet images.

The reference figures (0.413 200-way top-1, 0.193 1000-way top-1 on val_0..val_999 at 128 px,
bilinear) were measured independently with ``keras.applications`` (../shared/data/README.md).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from fixtures import model_config

from tinyopt.data import cache as data
from tinyopt.models.approaches import get_approach

pytestmark = pytest.mark.slow

MOBILENET = model_config(backbone="mobilenet", alpha=0.25, weights_resolution=128)
AS_IS = {"resize": "bilinear", "input_size": 128, "flip_tta": False, "restrict_200": True}


@pytest.fixture(scope="module")
def val_1000(dev_cache):
    """The first 1000 images of the official val set (the test split keeps its order), labels, wnids."""
    images, labels = data.load_split("test", dev_cache)
    wnids = [info.wnid for info in data.load_classes(dev_cache)]
    return np.asarray(images[:1000]), np.asarray(labels[:1000]), wnids


def _top1(model, images, labels):
    probs = model.predict(images, batch_size=250, verbose=0)
    return float(np.mean(probs.argmax(axis=1) == labels)), probs


@pytest.mark.parametrize("source", ["imagenet", "file"])
def test_pretrained_mobilenet_scores_as_measured(request, val_1000, mobilenet_weights, source):
    """Both ways to the real weights: Keras' own ``imagenet`` lookup in $KERAS_HOME, and a local file."""
    if source == "imagenet":
        request.getfixturevalue("keras_home_with_mobilenet")
    model_cfg = dataclasses.replace(MOBILENET, weights="imagenet" if source == "imagenet" else str(mobilenet_weights))
    images, labels, wnids = val_1000
    pretrained = get_approach("pretrained")
    top1, _ = _top1(pretrained.build(AS_IS, model=model_cfg, wnids=wnids), images, labels)
    assert abs(top1 - 0.413) <= 0.02
    logits = pretrained.split(None, AS_IS, model=model_cfg).prefix.predict(images, batch_size=250, verbose=0)
    full = pretrained.full_top1([logits], wnids=wnids, labels=labels)
    assert abs(full - 0.193) <= 0.02 and full < top1 - 0.15


def test_finetune_pretrained_head_starts_at_the_as_is_accuracy(val_1000, mobilenet_weights):
    model_cfg = dataclasses.replace(MOBILENET, weights=str(mobilenet_weights))
    images, labels, wnids = val_1000
    as_is_top1, as_is = _top1(get_approach("pretrained").build(AS_IS, model=model_cfg, wnids=wnids), images, labels)
    params = {"trainable_stages": 2, "head_init": "pretrained", "dropout": 0.2, "resize": "bilinear",
              "input_size": 128, "augment": "flip_crop"}
    tuned_top1, tuned = _top1(get_approach("finetune").build(params, model=model_cfg, wnids=wnids), images, labels)
    np.testing.assert_array_equal(tuned.argmax(axis=1), as_is.argmax(axis=1))
    assert tuned_top1 == as_is_top1
