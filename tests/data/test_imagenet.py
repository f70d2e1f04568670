"""The ImageNet-1k class order of Keras ImageNet models, bundled with the package."""

from __future__ import annotations

import pytest
from fixtures import FIXTURE_WNIDS

from tinyopt.core.errors import DataError
from tinyopt.data.imagenet import imagenet_indices, imagenet_wnids


def test_imagenet_order_is_keras_output_order():
    wnids = imagenet_wnids()
    # Keras ImageNet models order their outputs by wnid, ascending.
    assert len(wnids) == 1000 and list(wnids) == sorted(wnids)
    assert imagenet_indices(["n01440764", "n15075141", "n01443537"]) == [0, 999, 1]


def test_unknown_wnid_is_a_clear_error():
    with pytest.raises(DataError, match="n99999999"):
        imagenet_indices(["n01443537", "n99999999"])


def test_every_fixture_class_is_an_imagenet_class_in_its_place():
    wnids = imagenet_wnids()
    indices = imagenet_indices(FIXTURE_WNIDS)
    assert [wnids[k] for k in indices] == list(FIXTURE_WNIDS)
    assert imagenet_indices([]) == []


def test_the_error_counts_the_unknown_wnids_and_says_what_to_do():
    with pytest.raises(DataError) as err:
        imagenet_indices(["n99999998", "n01443537", "n99999999"])
    message = str(err.value)
    assert message.startswith("2 class wnid(s) are not ImageNet-1k classes (first: 'n99999998')")
    assert "head_init='random' or the scratch approach" in message and "\n" not in message
