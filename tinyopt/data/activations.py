"""Activations of a frozen model prefix, computed once and reused across epochs, trials and workers.

A finetune trial that freezes its backbone up to some stage pushes the same images through the same
frozen layers in every epoch, and so does every other trial with the same backbone, weights, resize,
input size and boundary; a pretrained trial computes ImageNet logits that an earlier trial with the
same resize and size already computed. ``Store.views`` computes such activations once per key and
hands out the array, one per view (the image, and its mirror image when a flip is wanted).

Arrays live in memory-mapped ``.npy`` files under ``<data cache>/activations/``, written under a file
lock and a temporary name, so parallel workers (and the fresh processes of ``--trials-per-process``)
share one copy and an interrupted build leaves nothing half-written. A file damaged since (truncated,
overwritten, or of another shape or dtype than its key calls for) is found by its header and size
each time it is read, and built again: it is derived data. Up to ``train.activation_cache_gb``
of them are also held in this process' memory, where reading a batch costs nothing; the rest are read
through the memory map. Without a data cache folder (library use), they are kept in memory only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tinyopt.core.locks import file_lock
from tinyopt.data.cache import npy_problem

# Bumped when what a key means changes, so older files are never read as newer ones.
FORMAT = 1
# train.activation_cache_gb = "auto": this share of the memory available when the sweep starts.
AUTO_RAM_SHARE = 0.25
_DISK_MARGIN = 1 << 30  # left free on the disk after a build
_CHUNK = 4096  # rows hashed at a time: a digest of a memory-mapped split never copies it whole


@dataclass(frozen=True)
class Split:
    """A model cut where its frozen layers end.

    Attributes:
        prefix: uint8 images (N, 64, 64, 3) -> the activations at the boundary; its layers never train.
        suffix: activations -> the model's output, sharing the model's layers (None when nothing follows).
        boundary: where the cut is, for people (e.g. ``stage 4 output``); part of the cache key.
        views: 1 (the images) or 2 (the images and their mirror images).
        dtype: how the activations are stored: float16 halves the memory of feature maps; logits
            that become probabilities keep float32.
    """

    prefix: Any
    suffix: Any
    boundary: str
    views: int
    dtype: str = "float16"


class CacheUnavailable(Exception):
    """The activations cannot be cached for this trial (e.g. no disk space); it runs without them."""


def digest(*arrays: np.ndarray) -> str:
    """A digest of arrays' contents (a split's images and labels, a model's weights), read in chunks."""
    hasher = hashlib.blake2b(digest_size=16)
    for array in arrays:
        hasher.update(str((array.shape, array.dtype.str)).encode())
        for start in range(0, len(array), _CHUNK):
            hasher.update(np.ascontiguousarray(array[start:start + _CHUNK]).data)
    return hasher.hexdigest()


def mirrored(images: np.ndarray) -> np.ndarray:
    """Images flipped left to right, as ``RandomFlip("horizontal")`` flips them."""
    return images[:, :, ::-1]


class Store:
    """Where activations are kept: memory-mapped files in ``folder``, and up to ``ram_bytes`` in memory.

    Args:
        folder: the folder of the files (created when needed), or None to keep everything in memory.
        ram_bytes: how much of the activations this process holds in memory, least recently used
            first out.
    """

    def __init__(self, folder: str | os.PathLike | None, ram_bytes: int):
        self.folder = None if folder is None else Path(folder)
        self.ram_bytes = int(ram_bytes)
        self._resident: OrderedDict[str, np.ndarray] = OrderedDict()

    def views(self, key: dict[str, Any], split: Split, images: np.ndarray, batch_size: int, *, count: int = 1
              ) -> tuple[list[np.ndarray], bool]:
        """The activations of ``split.prefix`` on ``images`` for the first ``count`` views, and whether all were cached.

        Args:
            key: everything the activations depend on besides the view (model, weights, resize, input
                size, boundary, data, precision); plain JSON values.
            split: the cut model.
            images: uint8 (N, 64, 64, 3).
            batch_size: images per forward pass when they must be computed.

        Raises:
            CacheUnavailable: they are not cached and the disk cannot hold them.
        """
        arrays, reused = [], True
        shape = _shape(split, len(images))
        for view in range(count):
            name = _name(key, split, view)
            array = self._get(name, shape, split.dtype)
            if array is None:
                reused = False
                array = self._build(name, split, mirrored(images) if view else images, batch_size)
            arrays.append(array)
        return arrays, reused

    def missing_bytes(self, key: dict[str, Any], split: Split, images: int, count: int = 1) -> int:
        """Bytes that ``views`` with these arguments would write (0 when all are cached)."""
        shape = _shape(split, images)
        size = int(np.prod(shape)) * np.dtype(split.dtype).itemsize
        return sum(size for view in range(count) if not self._has(_name(key, split, view), shape, split.dtype))

    def check_room(self, size: int) -> None:
        """Raise ``CacheUnavailable`` if writing ``size`` more bytes would nearly fill the disk."""
        if self.folder is None or not size:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.folder).free
        if free - size < _DISK_MARGIN:
            raise CacheUnavailable(f"{size / 2**30:.1f} GB of activations would leave {self.folder} with "
                                   f"{max(free - size, 0) / 2**30:.1f} GB free")

    def _has(self, name: str, shape: tuple[int, ...], dtype: str) -> bool:
        return name in self._resident or (self.folder is not None
                                          and npy_problem(self.folder / f"{name}.npy", shape, dtype) is None)

    def _get(self, name: str, shape: tuple[int, ...], dtype: str) -> np.ndarray | None:
        """The array of ``name``, or None when it is not cached or its file is damaged (``_build`` replaces it)."""
        if name in self._resident:
            self._resident.move_to_end(name)
            return self._resident[name]
        if not self._has(name, shape, dtype):
            return None
        return self._keep(name, np.load(self.folder / f"{name}.npy", mmap_mode="r"))

    def _keep(self, name: str, array: np.ndarray) -> np.ndarray:
        """Hold ``array`` in memory if the budget allows (evicting the least recently used), else its map."""
        if array.nbytes > self.ram_bytes:
            return array
        while self._resident and sum(a.nbytes for a in self._resident.values()) + array.nbytes > self.ram_bytes:
            self._resident.popitem(last=False)
        self._resident[name] = np.array(array)
        return self._resident[name]

    def _build(self, name: str, split: Split, images: np.ndarray, batch_size: int) -> np.ndarray:
        shape = _shape(split, len(images))
        if self.folder is None:
            array = np.empty(shape, split.dtype)
            _fill(array, split.prefix, images, batch_size)
            return self._keep(name, array)
        self.folder.mkdir(parents=True, exist_ok=True)
        final = self.folder / f"{name}.npy"
        with file_lock(self.folder / f"{name}.lock"):
            # Another worker may have built (or repaired) it while this one waited.
            if npy_problem(final, shape, split.dtype) is not None:
                with _partial(final) as partial:
                    array = np.lib.format.open_memmap(partial, mode="w+", dtype=split.dtype, shape=shape)
                    _fill(array, split.prefix, images, batch_size)
                    array.flush()
                    del array
                    os.replace(partial, final)
        return self._keep(name, np.load(final, mmap_mode="r"))


def ram_budget(setting: float | str) -> int:
    """Bytes of ``train.activation_cache_gb``: a number of GB, or ``auto``, a share of the available memory."""
    if setting != "auto":
        return int(float(setting) * 2**30)
    import psutil

    return int(psutil.virtual_memory().available * AUTO_RAM_SHARE)


def _shape(split: Split, images: int) -> tuple[int, ...]:
    return (images, *split.prefix.output.shape[1:])


def _name(key: dict[str, Any], split: Split, view: int) -> str:
    full = {**key, "boundary": split.boundary, "dtype": split.dtype, "view": view, "format": FORMAT}
    return hashlib.blake2b(json.dumps(full, sort_keys=True).encode(), digest_size=16).hexdigest()


def _fill(array: np.ndarray, prefix: Any, images: np.ndarray, batch_size: int) -> None:
    for start in range(0, len(images), batch_size):
        batch = np.ascontiguousarray(images[start:start + batch_size])
        array[start:start + len(batch)] = np.asarray(prefix.predict_on_batch(batch))


@contextlib.contextmanager
def _partial(final: Path) -> Iterator[Path]:
    """A temporary name beside ``final``, removed unless it was renamed into place."""
    partial = final.with_name(final.stem + ".partial.npy")
    partial.unlink(missing_ok=True)  # left by a process killed mid-build; the lock is ours now
    try:
        yield partial
    finally:
        partial.unlink(missing_ok=True)
