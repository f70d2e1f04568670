"""What a trial trains and predicts on: images through the whole model, or activations cached once and reused."""

from __future__ import annotations

import shutil
from collections import namedtuple

import keras
import numpy as np
import pytest

from tinyopt.data.activations import CacheUnavailable, Split, Store
from tinyopt.train.feeds import CachedFeed, ImageFeed

pytestmark = pytest.mark.backend  # batches are tf.data under TensorFlow, a PyDataset under the other backends

RNG = np.random.default_rng(0)
SPLITS = {split: (RNG.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8), np.arange(n) % 3)
          for split, n in (("train", 10), ("selection", 6), ("test", 6))}


class _LeftColumn:
    """Stands for a frozen prefix: the mean of each image's left column of pixels (a mirror image differs)."""

    class output:  # noqa: N801 - mimics keras.Model.output
        shape = (None, 3)

    def __init__(self):
        self.calls = 0

    def predict_on_batch(self, batch):
        self.calls += 1
        return batch[:, :, 0, :].mean(axis=1)


def _model(inputs) -> keras.Model:
    keras.utils.set_random_seed(0)
    x = keras.Input(inputs)
    return keras.Model(x, keras.layers.Dense(3, activation="softmax")(keras.layers.Flatten()(x)))


def _labels(dataset) -> list[int]:
    return [int(label) for _, labels in dataset.as_numpy_iterator() for label in labels]


def _one_epoch(batches, steps):
    """The first epoch of ``ImageFeed.training``'s batches (an endless stream of ``steps`` a epoch under TF)."""
    return batches if steps is None else batches.take(steps)


def test_an_image_feed_feeds_the_whole_model():
    model = _model((4, 4, 3))
    feed = ImageFeed(model, SPLITS)
    assert feed.trainee() is model
    x, y = SPLITS["selection"]
    predicted = feed.predict("selection", 4)
    assert predicted.dtype == np.float32 and predicted.shape == (6, 3)
    np.testing.assert_allclose(predicted, model.predict(x.astype(np.float32), verbose=0), atol=1e-6)
    assert _labels(feed.batches("selection", 4)) == y.tolist()  # in order
    shuffled = _labels(_one_epoch(*feed.training(4, seed=1)))
    assert sorted(shuffled) == sorted(SPLITS["train"][1].tolist()) and shuffled != SPLITS["train"][1].tolist()


def _cached(store, suffix=None, finish=None, needs=None):
    cut = Split(_LeftColumn(), suffix, boundary="left column", views=2, dtype="float32")
    return CachedFeed(_model((4, 4, 3)), SPLITS, cut, store, {"model": "test"}, needs or {"selection": 1, "test": 1},
                      lambda split: f"digest of {split}", finish)


def test_a_cached_feed_builds_each_views_activations_once_then_reuses_them():
    feed = _cached(Store(None, ram_bytes=2**20), finish=lambda views: np.mean(views, axis=0) / 255,
                   needs={"selection": 2, "test": 1})
    x = SPLITS["selection"][0]
    expected = (x[:, :, 0, :].mean(axis=1) + x[:, :, -1, :].mean(axis=1)) / 2 / 255  # the image and its mirror
    np.testing.assert_allclose(feed.predict("selection", 4), expected, rtol=1e-6)
    assert feed.predict("selection", 4).dtype == np.float32
    assert feed.reused == [False, True] and feed.note() == "built"
    calls = feed.cut.prefix.calls
    feed.predict("selection", 4)
    assert feed.cut.prefix.calls == calls and feed.reused[-1] is True
    assert feed.trainee() is None and feed.inputs("test", 4)[0].shape == (6, 3)


def test_a_cached_feed_trains_and_predicts_its_suffix_on_the_activations():
    suffix = _model((3,))
    feed = _cached(Store(None, ram_bytes=2**20), suffix=suffix, needs={"train": 2, "selection": 1, "test": 1})
    assert feed.trainee() is suffix
    activations = SPLITS["test"][0][:, :, 0, :].mean(axis=1)
    np.testing.assert_allclose(feed.predict("test", 4), suffix.predict(activations, verbose=0), atol=1e-6)
    assert sorted(_labels(_one_epoch(*feed.training(4, seed=0)))) == sorted(SPLITS["train"][1].tolist())
    feed.predict("test", 4)
    assert feed.reused == [False, False, True] and feed.note() == "built"


def test_check_room_refuses_what_the_disk_cannot_hold_until_it_is_cached(tmp_path, monkeypatch):
    feed = _cached(Store(tmp_path / "activations", ram_bytes=0), finish=lambda views: views[0])
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2**40, 2**40 - 2**29, 2**29))  # 0.5 GB free
    with pytest.raises(CacheUnavailable, match="GB of activations would leave"):
        feed.check_room()
    monkeypatch.undo()
    feed.predict("selection", 4)
    feed.predict("test", 4)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2**40, 2**40, 0))
    feed.check_room()  # everything it reads is on disk already
    assert len(list((tmp_path / "activations").glob("*.npy"))) == 2
