"""Feeding Keras (``tinyopt.train.batches``): tf.data and ArrayBatches give the same batches.

Under the TensorFlow backend make_dataset is tf.data and ArrayBatches is tested beside it; under any other
backend both are ArrayBatches. CI runs this file under both backends.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys

import numpy as np
import pytest

from tinyopt.data import cache as data
from tinyopt.train import batches as feeding

pytestmark = pytest.mark.backend  # CI runs these under JAX as well as TensorFlow

BUILDERS = ["make_dataset", "ArrayBatches"]
NUMBERED = 203  # a prime: every batch size below leaves a partial last batch


@pytest.fixture
def numbered(tmp_path) -> tuple[np.ndarray, np.ndarray]:
    """A memory map of distinct random uint8 images, each labelled with its own row number."""
    np.save(tmp_path / "x.npy", np.random.default_rng(0).integers(0, 256, (NUMBERED, 8, 8, 3), dtype=np.uint8))
    return np.load(tmp_path / "x.npy", mmap_mode="r"), np.arange(NUMBERED)


def _batches(dataset, count: int | None = None) -> list:
    """One pass (the first ``count`` batches) over a tf.data dataset or an ArrayBatches, as numpy batches."""
    return list(itertools.islice(dataset.as_numpy_iterator(), count))


def _joined(batches: list) -> tuple[np.ndarray, np.ndarray]:
    """The images and the labels of ``(images, labels)`` batches, each concatenated."""
    images, labels = zip(*batches, strict=True)
    return np.concatenate(images), np.concatenate(labels)


def _epoch(dataset) -> tuple[np.ndarray, np.ndarray]:
    return _joined(_batches(dataset))


@pytest.mark.parametrize("builder", BUILDERS)
def test_batches_are_uint8_in_order_with_their_labels(builder, tiny_cache):
    x, y = data.load_split("train", tiny_cache)
    batches = _batches(getattr(feeding, builder)(x, y, batch_size=32))
    assert [len(images) for images, _ in batches] == [32] * (len(x) // 32) + [len(x) % 32]
    assert all(images.dtype == np.uint8 and labels.dtype == np.int64 for images, labels in batches)
    images, labels = _joined(batches)
    assert images.shape == x.shape
    np.testing.assert_array_equal(images, x)
    np.testing.assert_array_equal(labels, y)
    only_images = _batches(getattr(feeding, builder)(x, batch_size=32))
    assert all(isinstance(batch, np.ndarray) for batch in only_images)
    np.testing.assert_array_equal(np.concatenate(only_images), x)


@pytest.mark.parametrize("builder", BUILDERS)
def test_shuffle_reorders_every_epoch_by_seed_and_keeps_each_label_with_its_image(builder, numbered):
    x, y = numbered
    shuffled = getattr(feeding, builder)(x, y, batch_size=32, shuffle=True, seed=1)
    epochs = [_epoch(shuffled) for _ in range(2)]
    for images, labels in epochs:
        np.testing.assert_array_equal(np.sort(labels), y)  # every image exactly once
        np.testing.assert_array_equal(images, x[labels])  # each with its own label
    assert not np.array_equal(epochs[0][1], y)
    assert not np.array_equal(epochs[0][1], epochs[1][1])  # reshuffled every epoch
    again = getattr(feeding, builder)(x, y, batch_size=32, shuffle=True, seed=1)
    assert all(np.array_equal(_epoch(again)[1], labels) for _, labels in epochs)  # the same epochs, in turn
    other = getattr(feeding, builder)(x, y, batch_size=32, shuffle=True, seed=2)
    assert not np.array_equal(_epoch(other)[1], epochs[0][1])


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("builder", BUILDERS)
def test_repeat_is_endless_full_batches_running_across_epochs(builder, shuffle, numbered):
    x, y = numbered
    endless = getattr(feeding, builder)(x, y, batch_size=50, shuffle=shuffle, repeat=True)
    batches = _batches(endless, 3 * NUMBERED // 50 + 1)
    assert all(len(images) == len(labels) == 50 for images, labels in batches)
    images, labels = _joined(batches)
    np.testing.assert_array_equal(images, x[labels])
    epochs = labels[:3 * NUMBERED].reshape(3, NUMBERED)
    for epoch in epochs:
        np.testing.assert_array_equal(np.sort(epoch), y)
    assert np.array_equal(epochs[0], epochs[1]) != shuffle


@pytest.mark.parametrize("builder", BUILDERS)
def test_views_show_one_view_per_image_per_epoch_drawn_from_the_seed(builder):
    # Two views of 200 examples (cached activations of each image and of its mirror image): 0s and 1s.
    n = 200
    views = [np.zeros((n, 1), np.float16), np.ones((n, 1), np.float16)]
    labels = np.arange(n)

    def shown(dataset) -> np.ndarray:
        """Which view each example showed in one epoch, in example order; each example exactly once."""
        images, order = _epoch(dataset)
        np.testing.assert_array_equal(np.sort(order), labels)
        assert images.dtype == np.float16
        return images[np.argsort(order), 0]

    batches = getattr(feeding, builder)(views, labels, batch_size=32, shuffle=True, seed=3)
    epochs = [shown(batches) for _ in range(3)]
    assert all(0.35 < epoch.mean() < 0.65 for epoch in epochs)  # about half mirrored
    assert not np.array_equal(epochs[0], epochs[1])  # a new draw each epoch
    again = getattr(feeding, builder)(views, labels, batch_size=32, shuffle=True, seed=3)
    np.testing.assert_array_equal(shown(again), epochs[0])  # the seed decides
    assert not np.array_equal(shown(getattr(feeding, builder)(views, labels, batch_size=32, seed=4)), epochs[0])
    with pytest.raises(ValueError, match="views differ"):
        getattr(feeding, builder)([views[0], np.ones((n, 2), np.float16)], labels, batch_size=8)
    with pytest.raises(ValueError, match="draws no views"):
        getattr(feeding, builder)(views, labels, batch_size=8, repeat=True)


@pytest.mark.parametrize("builder", BUILDERS)
@pytest.mark.parametrize(("x", "y", "kwargs"), [
    (np.zeros((3, 8, 8, 3), np.uint8), np.zeros(2), {"batch_size": 2}),
    (np.zeros((3, 8, 8, 3), np.uint8), None, {"batch_size": 0}),
    (np.zeros((0, 8, 8, 3), np.uint8), None, {"batch_size": 2, "repeat": True}),
], ids=["labels-mismatch", "no-batch", "endless-nothing"])
def test_bad_batching_is_refused(builder, x, y, kwargs):
    with pytest.raises(ValueError):
        getattr(feeding, builder)(x, y, **kwargs)


def test_array_batches_sizes_and_random_access(numbered):
    x, y = numbered
    batches = feeding.ArrayBatches(x, y, batch_size=50, shuffle=True, seed=3)
    assert len(batches) == batches.num_batches == 5
    in_order = [batches[i] for i in range(5)]
    for i in (3, 0, 4, 1, 2):  # out of order, as Keras reads batches when fit(shuffle=True)
        np.testing.assert_array_equal(batches[i][1], in_order[i][1])
    assert [len(labels) for _, labels in in_order] == [50, 50, 50, 50, 3]
    looped = list(batches)  # the same epoch, which a finished loop ends
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(looped, in_order, strict=True))
    assert not np.array_equal(batches[0][1], in_order[0][1])
    with pytest.raises(IndexError):
        batches[5]
    endless = feeding.ArrayBatches(x, y, batch_size=50, repeat=True)
    assert endless.num_batches is None
    with pytest.raises(TypeError):
        len(endless)


def test_array_batches_never_serve_a_batch_read_ahead_for_an_abandoned_epoch(numbered):
    # fit and predict read one batch to build the model, then end the epoch (Keras' on_epoch_end) and
    # start again: the batches read ahead for the abandoned pass must not leak into the next one.
    x, y = numbered
    batches = feeding.ArrayBatches(x, y, batch_size=10, shuffle=True, seed=4, threads=2, prefetch=8)
    batches[0]
    batches.on_epoch_end()
    epoch = [batches[i][1] for i in range(len(batches))]
    np.testing.assert_array_equal(np.sort(np.concatenate(epoch)), y)
    fresh = feeding.ArrayBatches(x, y, batch_size=10, shuffle=True, seed=4, prefetch=0)
    fresh.on_epoch_end()
    assert all(np.array_equal(fresh[i][1], labels) for i, labels in enumerate(epoch))


_FIT_UNDER_JAX = """
import sys
import keras
import numpy as np
from tinyopt.train import batches as feeding
from tinyopt.data import cache as data

x, y = data.load_split("train", sys.argv[1])
sx, sy = data.load_split("selection", sys.argv[1])


class Recorded(feeding.ArrayBatches):
    # Records the labels Keras reads, epoch by epoch (from a model build's pass on).
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.epochs = [[]]

    def __getitem__(self, index):
        batch = super().__getitem__(index)
        self.epochs[-1].append(batch[1])
        return batch

    def on_epoch_end(self):
        super().on_epoch_end()
        self.epochs.append([])


assert keras.backend.backend() == "jax"
assert type(feeding.make_dataset(x, y, batch_size=16)) is feeding.ArrayBatches
train = Recorded(x, y, batch_size=16, shuffle=True, seed=5)
classes = int(y.max()) + 1
model = keras.Sequential([keras.layers.Rescaling(1 / 255), keras.layers.Flatten(),
                          keras.layers.Dense(classes, activation="softmax")])
model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
history = model.fit(train, validation_data=feeding.make_dataset(sx, sy, batch_size=16), epochs=2, shuffle=False,
                    verbose=0).history
assert len(history["val_accuracy"]) == 2, history
full = [np.concatenate(epoch) for epoch in train.epochs if len(epoch) == len(train)]
assert len(full) == 2 and not np.array_equal(*full), train.epochs
assert all(np.array_equal(np.sort(labels), np.sort(y)) for labels in full)  # each image once per epoch

endless = Recorded(x, y, batch_size=16, shuffle=True, seed=5, repeat=True)
steps = len(x) // 16 * 2 // 3  # epochs of two thirds of the images: the stream runs on across them
history = model.fit(endless, steps_per_epoch=steps, epochs=3, shuffle=False, verbose=0).history
assert len(history["loss"]) == 3, history
stream = feeding.ArrayBatches(x, y, batch_size=16, shuffle=True, seed=5, repeat=True)
read = [labels for epoch in endless.epochs for labels in epoch]
assert all(np.array_equal(labels, stream[i][1]) for i, labels in enumerate(read)), read
assert len(read) == 3 * steps

unbuilt = keras.Sequential([keras.layers.Flatten(), keras.layers.Dense(3)])
predicted = unbuilt.predict(feeding.make_dataset(x, batch_size=16), verbose=0)  # builds on a first batch
assert predicted.shape == (len(x), 3), predicted.shape
whole = keras.ops.convert_to_numpy(unbuilt(x[:]))
# float32 sums of 12288 pixel products (0-255) in another order, batched or not: relative to the outputs' scale.
np.testing.assert_allclose(predicted, whole, rtol=0, atol=1e-5 * np.abs(whole).max())
assert "tensorflow" not in sys.modules
"""


def test_under_jax_fit_and_predict_take_array_batches_without_tensorflow(tiny_cache):
    result = subprocess.run([sys.executable, "-c", _FIT_UNDER_JAX, str(tiny_cache)], capture_output=True, text=True,
                            env={**os.environ, "KERAS_BACKEND": "jax"}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]




@pytest.mark.backend
def test_training_batches_of_every_epoch_follow_from_the_seed_and_the_epoch_alone():
    rng = np.random.default_rng(2)
    x, y = rng.integers(0, 255, (37, 4, 4, 3), dtype=np.uint8), rng.integers(0, 5, 37)
    views = [x, x[:, :, ::-1]]  # a flip view: which one each image shows is drawn per epoch too

    def epochs(first: int, count: int) -> list[list[tuple[np.ndarray, np.ndarray]]]:
        data, steps = feeding.training_batches(views, y, batch_size=8, seed=4, first_epoch=first)
        if steps is None:  # ArrayBatches: a pass per epoch
            read = []
            for _ in range(count):
                read.append([(np.asarray(a), np.asarray(b)) for a, b in data])
            return read
        stream = data.as_numpy_iterator()
        return [[next(stream) for _ in range(steps)] for _ in range(count)]

    whole = epochs(0, 4)
    assert [len(epoch) for epoch in whole] == [5] * 4  # 37 images in batches of 8
    assert all(sorted(np.concatenate([b for _, b in epoch]).tolist()) == sorted(y.tolist()) for epoch in whole)
    assert not np.array_equal(whole[0][0][1], whole[1][0][1])  # reshuffled
    for got, want in zip(epochs(2, 2), whole[2:], strict=True):  # resumed at epoch 2: the same epochs 2 and 3
        for (gx, gy), (wx, wy) in zip(got, want, strict=True):
            np.testing.assert_array_equal(gx, wx)
            np.testing.assert_array_equal(gy, wy)
    reference = feeding.ArrayBatches(views, y, batch_size=8, shuffle=True, seed=4, first_epoch=3)
    for (gx, gy), (wx, wy) in zip(whole[3], reference, strict=True):  # on TensorFlow as on any other backend
        np.testing.assert_array_equal(gx, wx)
        np.testing.assert_array_equal(gy, wy)
