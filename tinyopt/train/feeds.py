"""What a trial trains and predicts on: the images through the whole model, or cached activations.

``ImageFeed`` feeds the uint8 images to the whole model. ``CachedFeed`` feeds the activations where
the model's frozen layers end (``tinyopt.data.activations``) to the part that trains, or, for a model that
does not train, finishes its output from them in numpy. Both answer the same questions, so the
objective trains and scores a trial the same way whichever it has.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from tinyopt.core.config.sections import Config
from tinyopt.data.activations import Split, Store


def cache_refusal(approach: Any, params: dict[str, Any], config: Config) -> str | None:
    """Why a trial of ``approach`` with ``params`` reads no cached activations (None: it does).

    An approach without frozen layers (``uncached`` missing: scratch) never does.
    """
    uncached = getattr(approach, "uncached", None)
    if uncached is None:
        return "the approach has no frozen layers"
    return uncached(params, config.model) if config.train.activation_cache else "train.activation_cache = false"


def cached_resize(params: dict[str, Any]) -> str:
    """The resize a cache of a trial's activations is keyed by: images already at the input size are not
    resized (every method gives the same pixels), so their trials share one cache."""
    from tinyopt.models.blocks import IMAGE_SIZE  # keras: kept off the modules that only read this one

    return params["resize"] if params["input_size"] != IMAGE_SIZE else "none"


class ImageFeed:
    """The uint8 images of each split through the whole model.

    Args:
        model: the trial's model.
        splits: split name -> (images, labels).
    """

    def __init__(self, model: Any, splits: dict[str, tuple[np.ndarray, np.ndarray]]):
        self.model, self.splits = model, splits

    def trainee(self) -> Any:
        """The model that ``fit`` trains."""
        return self.model

    def inputs(self, split: str, batch_size: int) -> np.ndarray | list[np.ndarray]:
        """What the trainee reads of a split: its images (or, cached, the views of their activations)."""
        return self.splits[split][0]

    def batches(self, split: str, batch_size: int):
        """Labelled batches of a split, in order (scoring)."""
        from tinyopt.train.batches import make_dataset

        return make_dataset(self.inputs(split, batch_size), self.splits[split][1], batch_size=batch_size)

    def training(self, batch_size: int, seed: int, first_epoch: int = 0) -> tuple[Any, int | None]:
        """The shuffled train batches from ``first_epoch`` on, and ``fit``'s ``steps_per_epoch`` for them."""
        from tinyopt.train.batches import training_batches

        return training_batches(self.inputs("train", batch_size), self.splits["train"][1], batch_size=batch_size,
                                seed=seed, first_epoch=first_epoch)

    def predict(self, split: str, batch_size: int) -> np.ndarray:
        """The model's output on a split, float32 (N, classes)."""
        from tinyopt.train.batches import make_dataset

        x = self.splits[split][0]
        return np.asarray(self.model.predict(make_dataset(x, batch_size=batch_size), verbose=0), dtype=np.float32)


class CachedFeed(ImageFeed):
    """Activations at a model's frozen boundary, computed once per key and shared (``Store``).

    Args:
        model: the trial's whole model.
        splits: split name -> (images, labels).
        cut: the model cut at its boundary.
        store: where activations are kept.
        key: what the activations depend on besides the data and the view (see ``Store.views``).
        needs: split name -> how many views of it the trial reads (training a flip reads two).
        data_key: split name -> a digest of its images and labels.
        finish: for a model whose ``cut`` has no suffix, its output from the views' activations.
    """

    def __init__(self, model: Any, splits: dict[str, tuple[np.ndarray, np.ndarray]], cut: Split, store: Store,
                 key: dict[str, Any], needs: dict[str, int], data_key: Callable[[str], str],
                 finish: Callable[[list[np.ndarray]], np.ndarray] | None = None):
        super().__init__(model, splits)
        self.cut, self.store, self.key, self.needs, self.data_key = cut, store, key, needs, data_key
        self.finish = finish
        self.reused: list[bool] = []  # per read: whether every view was cached already

    def _key(self, split: str) -> dict[str, Any]:
        return {**self.key, "data": self.data_key(split)}

    def check_room(self) -> None:
        """Raise ``CacheUnavailable`` unless the store can hold what this trial would add to it."""
        self.store.check_room(sum(self.store.missing_bytes(self._key(split), self.cut, len(self.splits[split][1]),
                                                           count) for split, count in self.needs.items()))

    def inputs(self, split: str, batch_size: int) -> list[np.ndarray]:
        """The activations of the views of a split the trial reads."""
        views, reused = self.store.views(self._key(split), self.cut, self.splits[split][0], batch_size,
                                         count=self.needs[split])
        self.reused.append(reused)
        return views

    def trainee(self) -> Any:
        return self.cut.suffix

    def predict(self, split: str, batch_size: int) -> np.ndarray:
        from tinyopt.train.batches import make_dataset

        if self.cut.suffix is None:
            return np.asarray(self.finish(self.inputs(split, batch_size)), dtype=np.float32)
        views = self.inputs(split, batch_size)
        return np.asarray(self.cut.suffix.predict(make_dataset(views, batch_size=batch_size), verbose=0),
                          dtype=np.float32)

    def note(self) -> str:
        """How the trial used the cache, for its run's tag."""
        return "reused" if all(self.reused) else "built"
