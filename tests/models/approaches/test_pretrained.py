"""pretrained: an ImageNet backbone as-is; its 200-way and 1000-way outputs, mirror TTA, and its logits' reuse."""

from __future__ import annotations

import numpy as np
import pytest
from fixtures import FIXTURE_WNIDS, default_params, random_images, small_mobilenet

from tinyopt.core.errors import DataError
from tinyopt.data.imagenet import imagenet_indices
from tinyopt.models.approaches import get_approach

WNIDS = sorted(FIXTURE_WNIDS)
SMALL = small_mobilenet()


@pytest.mark.backend
def test_restrict_200_false_is_the_columns_of_the_1000_way_softmax(random_mobilenet):
    pretrained = get_approach("pretrained")
    params = default_params("pretrained", input_size=64, restrict_200=False)
    columns = pretrained.build(params, model=random_mobilenet, wnids=WNIDS).predict(random_images(), verbose=0)
    full = pretrained.full_outputs(params, model=random_mobilenet).predict(random_images(), verbose=0)
    assert full.shape == (4, 1000)
    np.testing.assert_allclose(columns, full[:, imagenet_indices(WNIDS)], atol=1e-7)
    restricted = pretrained.build(dict(params, restrict_200=True), model=random_mobilenet, wnids=WNIDS).predict(
        random_images(), verbose=0)
    np.testing.assert_array_equal(restricted.argmax(1), columns.argmax(1))
    # A label scores under the 1000-way argmax only when its ImageNet output is the global argmax.
    labels = np.arange(4) % len(WNIDS)
    hits = full.argmax(1) == np.asarray(imagenet_indices(WNIDS))[labels]
    logits = pretrained.split(None, params, model=random_mobilenet).prefix.predict(random_images(), verbose=0)
    assert pretrained.full_top1([logits], wnids=WNIDS, labels=labels) == hits.mean()


@pytest.mark.backend
@pytest.mark.parametrize("restrict_200", [True, False])
@pytest.mark.parametrize("flip_tta", [False, True])
def test_pretrained_outputs_from_logits_are_the_models_outputs(random_mobilenet, restrict_200, flip_tta):
    """What a sweep computes from each view's cached 1000 logits is what the saved model outputs."""
    pretrained = get_approach("pretrained")
    params = default_params("pretrained", input_size=96, resize="bicubic", restrict_200=restrict_200, flip_tta=flip_tta)
    cut = pretrained.split(None, params, model=random_mobilenet)
    assert cut.views == (2 if flip_tta else 1) and cut.suffix is None
    images = random_images(8)
    views = [cut.prefix.predict(view, verbose=0) for view in (images, images[:, :, ::-1])[:cut.views]]
    expected = pretrained.build(params, model=random_mobilenet, wnids=WNIDS).predict(images, verbose=0)
    # float32 rounding in another order (numpy's softmax here, XLA's under JAX): within 1e-5.
    np.testing.assert_allclose(pretrained.outputs(params, views, wnids=WNIDS), expected, atol=2e-5)


@pytest.mark.backend
def test_flip_tta_averages_an_image_and_its_mirror(random_mobilenet):
    pretrained = get_approach("pretrained")
    params = default_params("pretrained", input_size=64)
    plain = pretrained.build(params, model=random_mobilenet, wnids=WNIDS)
    tta = pretrained.build(dict(params, flip_tta=True), model=random_mobilenet, wnids=WNIDS)
    images = random_images()
    mirrored = images[:, :, ::-1]
    expected = (plain.predict(images, verbose=0) + plain.predict(mirrored, verbose=0)) / 2
    np.testing.assert_allclose(tta.predict(images, verbose=0), expected, atol=1e-6)


@pytest.mark.backend
def test_classes_outside_imagenet():
    with pytest.raises(DataError, match="n99999999"):
        get_approach("pretrained").build(default_params("pretrained", input_size=32), model=SMALL,
                                         wnids=[*WNIDS, "n99999999"])


def _hand_made_logits() -> np.ndarray:
    """Two images' 1000 ImageNet logits: the first peaks on class 0's output, the second on an output of no
    class of the fixture (log 4) above class 1's (log 2)."""
    columns = imagenet_indices(WNIDS)
    outside = next(k for k in range(1000) if k not in columns)
    logits = np.zeros((2, 1000))
    logits[0, columns[0]] = np.log(4)
    logits[1, outside], logits[1, columns[1]] = np.log(4), np.log(2)
    return logits


def test_outputs_restricted_to_the_classes_are_their_softmax_averaged_over_views():
    pretrained = get_approach("pretrained")
    logits = _hand_made_logits()
    one = pretrained.outputs({"restrict_200": True}, [logits], wnids=WNIDS)
    np.testing.assert_allclose(one, [[4 / 8, 1 / 8, 1 / 8, 1 / 8, 1 / 8], [1 / 6, 2 / 6, 1 / 6, 1 / 6, 1 / 6]])
    mirrored = np.zeros_like(logits)  # a view that tells nothing: uniform
    two = pretrained.outputs({"restrict_200": True}, [logits, mirrored], wnids=WNIDS)
    np.testing.assert_allclose(two, (one + 0.2) / 2)


def test_outputs_of_the_1000_way_softmax_are_its_columns_and_full_top1_its_argmax():
    pretrained = get_approach("pretrained")
    logits = _hand_made_logits()
    full = pretrained.outputs({"restrict_200": False}, [logits], wnids=WNIDS)
    np.testing.assert_allclose(full, [[4 / 1003, 1 / 1003, 1 / 1003, 1 / 1003, 1 / 1003],
                                      [1 / 1004, 2 / 1004, 1 / 1004, 1 / 1004, 1 / 1004]])
    labels = np.array([0, 1])
    assert full.argmax(axis=1).tolist() == [0, 1]  # both right among the fixture's classes...
    assert pretrained.full_top1([logits], wnids=WNIDS, labels=labels) == 0.5  # ...one right among all 1000


@pytest.mark.parametrize("weights, why", [("imagenet", None),
                                          ("none", "weights = none: each trial's backbone is random")])
def test_uncached_only_for_random_weights(weights, why):
    assert get_approach("pretrained").uncached({}, small_mobilenet(weights=weights)) == why
