"""Feeding Keras: batches of uint8 images (and labels) from an array, on any backend.

``make_dataset`` gives ``fit`` and ``predict`` the prepared cache's memory maps (``tinyopt.data.cache``),
or the views of cached activations (``tinyopt.train.feeds``), as tf.data under TensorFlow and as
``ArrayBatches``, a ``keras.utils.PyDataset``, under any other backend. It is the one
backend-specific piece besides ``tinyopt.train.backend``; import this module only where Keras is wanted
(after ``tinyopt.train.backend.load``).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import keras
import numpy as np


def _views(x: np.ndarray | list[np.ndarray], y: np.ndarray | None, batch_size: int, repeat: bool) -> list[np.ndarray]:
    """``x`` as a list of views, checked for batching."""
    views = list(x) if isinstance(x, list | tuple) else [x]
    if any(view.shape != views[0].shape or view.dtype != views[0].dtype for view in views):
        raise ValueError(f"views differ in shape or dtype: {[(view.shape, str(view.dtype)) for view in views]}")
    if repeat and len(views) > 1:
        raise ValueError("an endless dataset draws no views: give one array")
    _check_batching(views[0], y, batch_size, repeat)
    return views


def _gather(views: list[np.ndarray], rows: np.ndarray, chosen: np.ndarray | None = None) -> np.ndarray:
    """Rows of the views, row ``i`` from view ``chosen[i]`` (None: the one view)."""
    if chosen is None:
        return np.asarray(views[0][rows])
    batch = np.empty((len(rows), *views[0].shape[1:]), views[0].dtype)
    for number, view in enumerate(views):
        picked = chosen == number
        batch[picked] = view[rows[picked]]
    return batch


def _check_batching(x: np.ndarray, y: np.ndarray | None, batch_size: int, repeat: bool) -> None:
    if y is not None and len(y) != len(x):
        raise ValueError(f"x has {len(x)} images but y has {len(y)} labels")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if repeat and not len(x):
        raise ValueError("an endless dataset needs at least one image")


class ArrayBatches(keras.utils.PyDataset):
    """uint8 image batches (with int64 labels) gathered in numpy from an array, for any Keras backend.

    The backend-neutral twin of ``make_dataset``'s tf.data pipeline, with the same batches: the last
    batch of an epoch may be smaller; ``shuffle`` draws a new order every epoch from ``seed`` and the
    epoch number (so a seed always gives the same epochs); ``repeat`` makes one endless stream of
    full batches that runs across epoch boundaries, like ``tf.data``'s ``repeat().batch()``.

    An epoch ends when Keras calls ``on_epoch_end`` (``fit`` does after each epoch) or when a ``for``
    loop over the dataset (or over ``as_numpy_iterator()``, as on a tf.data dataset) finishes. Give
    ``fit`` ``shuffle=False``: the order is shuffled here, and ``fit``'s default reorders whole batches
    with Python's global ``random``, which also makes the look-ahead miss.

    Batches are prefetched by a pool of ``threads`` that gather the ``prefetch`` batches after the
    one asked for (numpy releases the GIL while it copies out of a memory map). Keras' own thread
    workers stay off: in Keras 3.15 their queue keeps the batches read ahead during the pass that
    ``fit`` and ``predict`` abandon after one batch to build the model and serves them at the start
    of the next pass, which repeats some images in the first epoch, drops others and misorders
    ``predict``'s output. Batches read ahead here are keyed by epoch and position, so a stale one is
    never served.

    Args:
        x: uint8 images (N, H, W, C), typically a memory map from ``load_split``; or a list of views
            of the same N examples (e.g. cached activations of each image and of its mirror image),
            of which each epoch draws one per example at random, from ``seed`` and the epoch.
        y: labels (N,), or None for batches of images only.
        batch_size: images per batch.
        shuffle: reshuffle the order every epoch.
        seed: seed of the shuffle.
        repeat: one endless stream (then ``fit`` needs ``steps_per_epoch``).
        threads: threads gathering batches ahead; defaults to ``min(4, os.cpu_count())``.
        prefetch: batches gathered ahead; defaults to twice ``threads``; 0 reads on demand.
        first_epoch: the epoch whose order the first pass reads (a training resumed after it).

    Raises:
        ValueError: ``x`` and ``y`` differ in length, ``batch_size`` < 1, or ``repeat`` without images.
    """

    def __init__(self, x: np.ndarray | list[np.ndarray], y: np.ndarray | None = None, *, batch_size: int,
                 shuffle: bool = False, seed: int = 0, repeat: bool = False, threads: int | None = None,
                 prefetch: int | None = None, first_epoch: int = 0):
        super().__init__(workers=1, use_multiprocessing=False)  # Keras' workers off; see the class docstring
        self.views = _views(x, y, batch_size, repeat)
        x = self.views[0]
        self.x, self.batch_size, self.shuffle, self.seed, self.repeat = x, batch_size, shuffle, seed, repeat
        self.y = None if y is None else np.asarray(y, dtype=np.int64)
        self._threads = threads or min(4, os.cpu_count() or 1)
        self._depth = 2 * self._threads if prefetch is None else prefetch
        self._lock = threading.Lock()
        self._epoch = first_epoch  # stays put when repeating: batch positions then count from the stream's start
        self._orders: dict[int, np.ndarray] = {}
        self._draws: dict[int, np.ndarray] = {}
        self._ahead: dict[tuple[int, int], Future] = {}
        self._last = -1
        self._pool: ThreadPoolExecutor | None = None

    @property
    def num_batches(self) -> int | None:
        """Batches per epoch, or None (Keras' mark of an endless dataset) when repeating."""
        return None if self.repeat else -(-len(self.x) // self.batch_size)

    def __len__(self) -> int:
        if self.repeat:
            raise TypeError("an endless ArrayBatches has no length")
        return self.num_batches

    def __getitem__(self, index: int):
        """Batch ``index`` of the current epoch (of the stream when repeating): images or (images, labels)."""
        if index < 0 or (not self.repeat and index >= self.num_batches):
            raise IndexError(f"batch {index} is out of range")
        with self._lock:
            epoch = self._epoch
            ready = self._ahead.pop((epoch, index), None)
            if index in (0, self._last + 1):  # read in order, so the next batches are worth gathering now
                self._read_ahead(epoch, index)
            self._last = index
        return ready.result() if ready is not None else self._batch(epoch, index)

    def __iter__(self):
        """One epoch (endless when repeating); the next loop is the next epoch, as with tf.data."""
        yield from super().__iter__()
        self.on_epoch_end()

    def as_numpy_iterator(self):
        """A new pass, as ``tf.data.Dataset.as_numpy_iterator`` starts one: code that reads
        ``make_dataset``'s batches itself need not know which backend built them."""
        return iter(self)

    def on_epoch_end(self) -> None:
        """Move to the next epoch's order; an endless stream runs on across Keras' epochs instead."""
        if not self.repeat:
            with self._lock:
                self._epoch += 1

    def _read_ahead(self, epoch: int, index: int) -> None:
        # Called with the lock held.
        stop = index + 1 + self._depth
        wanted = {(epoch, i) for i in range(index + 1, stop if self.repeat else min(stop, self.num_batches))}
        for key in self._ahead.keys() - wanted:  # an earlier epoch's or a skipped batch
            self._ahead.pop(key).cancel()
        for key in sorted(wanted - self._ahead.keys()):
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="tinyopt-batches")
            self._ahead[key] = self._pool.submit(self._batch, *key)

    def _batch(self, epoch: int, index: int):
        rows = self._rows(epoch, index)
        images = _gather(self.views, rows, self._chosen(epoch, rows) if len(self.views) > 1 else None)
        return images if self.y is None else (images, self.y[rows])

    def _chosen(self, epoch: int, rows: np.ndarray) -> np.ndarray:
        """The view each of ``rows`` shows in ``epoch``."""
        with self._lock:
            draw = self._draws.get(epoch)
            if draw is None:
                draw = self._draws[epoch] = np.random.default_rng([self.seed, epoch, 1]).integers(
                    len(self.views), size=len(self.x))
                if len(self._draws) > 3:  # as for _orders
                    del self._draws[min(self._draws)]
        return draw[rows]

    def _rows(self, epoch: int, index: int) -> np.ndarray:
        count = len(self.x)
        start = index * self.batch_size
        stop = start + self.batch_size if self.repeat else min(start + self.batch_size, count)
        pieces = []
        while start < stop:  # an endless stream's batch may run on into the next epochs
            lap, offset = divmod(start, count)
            take = min(stop - start, count - offset)
            # The shuffle only decides which images share a batch (and an epoch); in ascending order a
            # memory map reads them faster, and the labels follow the same rows.
            pieces.append(np.sort(self._order(epoch + lap)[offset:offset + take]) if self.shuffle
                          else np.arange(offset, offset + take))
            start += take
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def _order(self, epoch: int) -> np.ndarray:
        with self._lock:
            order = self._orders.get(epoch)
            if order is None:
                order = self._orders[epoch] = np.random.default_rng([self.seed, epoch]).permutation(len(self.x))
                if len(self._orders) > 3:  # threads reading ahead may still be on the previous epochs
                    del self._orders[min(self._orders)]
            return order


def make_dataset(x: np.ndarray | list[np.ndarray], y: np.ndarray | None = None, *, batch_size: int,
                 shuffle: bool = False, seed: int = 0, repeat: bool = False):
    """Batches of an array (with int64 labels when ``y`` is given) for ``fit`` and ``predict`` on any backend.

    Under the TensorFlow backend a ``tf.data`` pipeline, its fastest input: only indices flow through
    tf.data; each batch is gathered from ``x`` (typically a memory map) in numpy, so the dataset is never
    copied into the graph and images stay uint8 until the model. Under any other backend an
    ``ArrayBatches`` with the same batches, which imports no TensorFlow.

    Args:
        x: uint8 images (N, H, W, C), e.g. from ``load_split``; or a list of views of the same N
            examples (cached activations of each image and of its mirror image), of which each epoch
            shows one per example at random, drawn from ``seed`` anew every epoch.
        y: labels (N,), or None for images only.
        batch_size: images per batch; the last batch of an epoch may be smaller.
        shuffle: reshuffle the order every epoch.
        seed: seed of the shuffle and of the views' draw.
        repeat: repeat forever (for ``steps_per_epoch``); one view only.

    Returns:
        A prefetching ``tf.data.Dataset`` or ``ArrayBatches`` of ``images`` or ``(images, labels)`` batches.

    Raises:
        ValueError: ``x`` and ``y`` differ in length, views differ in shape or dtype, ``batch_size`` < 1, or
            ``repeat`` without images or with views.
    """
    if keras.backend.backend() != "tensorflow":
        return ArrayBatches(x, y, batch_size=batch_size, shuffle=shuffle, seed=seed, repeat=repeat)
    views = _views(x, y, batch_size, repeat)
    import tensorflow as tf

    count, shape, dtype = len(views[0]), views[0].shape[1:], tf.as_dtype(views[0].dtype)
    labels = None if y is None else tf.constant(np.asarray(y, dtype=np.int64))
    indices = tf.data.Dataset.range(count)
    if shuffle:
        indices = indices.shuffle(count, seed=seed, reshuffle_each_iteration=True)
    if repeat:
        indices = indices.repeat()
    if len(views) > 1:
        # A view per example per epoch: a random stream that starts anew, differently, every epoch.
        indices = tf.data.Dataset.zip(indices, tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True))

    def gather(rows, *draws):  # draws: random int64s of the batch's rows, when there are views to draw from
        images = tf.numpy_function(lambda r, *d: _gather(views, r, *(draw % len(views) for draw in d)),
                                   [rows, *draws], dtype, stateful=False)
        images.set_shape((None, *shape))
        return images if labels is None else (images, tf.gather(labels, rows))

    return indices.batch(batch_size).map(gather, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def training_batches(x: np.ndarray | list[np.ndarray], y: np.ndarray, *, batch_size: int, seed: int,
                     first_epoch: int = 0) -> tuple[object, int | None]:
    """Shuffled training batches whose every epoch follows from ``seed`` and its number, on any backend.

    A training resumed at ``first_epoch`` (from a checkpoint) reads the very batches an uninterrupted
    one reads from there, and both backends read the same batches: those of ``ArrayBatches``. Under
    TensorFlow they flow through tf.data as one endless stream of epochs (tf.data's own reshuffling
    follows how many passes were made, which a resumed run cannot know), so ``fit`` needs the
    returned ``steps_per_epoch``.

    Returns:
        The batches for ``fit`` and its ``steps_per_epoch`` (None: the batches end each epoch themselves).
    """
    batches = ArrayBatches(x, y, batch_size=batch_size, shuffle=True, seed=seed, first_epoch=first_epoch)
    if keras.backend.backend() != "tensorflow":
        return batches, None
    import tensorflow as tf

    steps, shape = batches.num_batches, batches.x.shape[1:]
    dtype = tf.as_dtype(batches.x.dtype)

    def gather(epoch, index):
        images, labels = tf.numpy_function(lambda e, i: batches._batch(int(e), int(i)), [epoch, index],
                                           (dtype, tf.int64), stateful=False)
        images.set_shape((None, *shape))
        labels.set_shape((None,))
        return images, labels

    keys = tf.data.Dataset.range(first_epoch, 2**62).flat_map(
        lambda epoch: tf.data.Dataset.range(steps).map(lambda index: (epoch, index)))
    return keys.map(gather, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE), steps
