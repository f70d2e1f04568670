"""The three splits a sweep works on, as it loads them: train trains, selection chooses, test is only reported.

Loaded from the prepared cache (``tinyopt.data.cache``), each capped per class as the config's
``[data]`` says, once per sweep (and per refit).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tinyopt.core.config.sections import DataConfig
from tinyopt.core.errors import DataError
from tinyopt.data import build
from tinyopt.data import cache as data
from tinyopt.data.activations import digest


@dataclass
class SweepData:
    """The arrays a sweep trains and scores on; images uint8, labels integer class indices.

    ``cache_dir`` is the data cache they came from, where activations are cached beside them (None:
    activations are kept in memory only).
    """

    splits: dict[str, tuple[np.ndarray, np.ndarray]]
    classes: list[Any]
    cache_dir: Path | None = None
    wnids: list[str] = field(init=False)
    _digests: dict[str, str] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.wnids = [c.wnid for c in self.classes]

    def digest(self, split: str) -> str:
        """A digest of a split's images and labels (computed once): what cached activations were made of."""
        if split not in self._digests:
            self._digests[split] = digest(*self.splits[split])
        return self._digests[split]


def load_sweep_data(data_cfg: DataConfig, source: str | None, cache_dir: str | None, progress: bool) -> SweepData:
    """Prepare (once), verify and load the splits a model approach needs, sliced as ``[data]`` says.

    The cache is checked whole here, before any study or run exists, checksums included
    (``tinyopt.data.cache.verify``): reading every byte costs about 0.3 s a GB from the page cache and 1 s
    a GB from disk, about half a second for the full dataset, once per sweep, and the pages it reads
    are the ones training reads next. A damaged cache or an empty split is then one line, not a
    traceback from TensorFlow after the study and a FAILED MLflow run were made.

    Raises:
        DataError: the cache is damaged, or a split holds no images.
    """
    cache = _prepared_cache(cache_dir) if source is None else None
    if cache is None:
        cache = build.prepare(source, cache_dir, progress=progress)  # verifies an existing cache, checksums too
    splits = {}
    for split in ("train", "selection", "test"):
        x, y = data.load_split(split, cache)
        cap = data_cfg.per_class(split)
        if cap:
            keep = data.stratified_subset(y, per_class=cap, seed=data_cfg.seed)
            x, y = x[keep], y[keep]
        if not len(y):
            raise DataError(f"the {split} split of {cache} holds no images, so no trial could run; rebuild it "
                            f"from a source whose {split} images decode: `{data.rebuild_command(cache)}`")
        splits[split] = (x, y)
    return SweepData(splits=splits, classes=data.load_classes(cache), cache_dir=Path(cache).expanduser())


def _prepared_cache(cache_dir: str | None):
    """The cache when it holds a prepared dataset: a sweep without --data uses it as it is.

    Raises:
        DataError: the dataset there is damaged (rather than a download of the official one over it).
    """
    if not data.is_prepared(cache_dir):
        return None
    data.verify(cache_dir)
    return cache_dir if cache_dir is not None else data.default_cache_dir()
