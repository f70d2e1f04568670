"""Tiny ImageNet as a verified, memory-mappable uint8 cache: prepare once, load fast.

A cache folder holds::

    prepared/       the dataset, swapped in whole by a rename once it is complete
      meta.json     source, fingerprint, options, split sizes, skipped images, and the byte
                    size and crc32 of every other file here
      classes.tsv   index, wnid, name (from words.txt); class indices follow sorted wnids
      {train,selection,test}_x.npy   uint8 (N, 64, 64, 3)
      {train,selection,test}_y.npy   int64 (N,) class indices
    downloads/      the archive (and its .part while downloading)

``selection`` is a stratified, seeded slice of the official train set and ``train`` the rest;
``test`` is the official val set in val_0, val_1, ... order. Images stay uint8 all the way to
the model, whose first layers cast, resize and augment them on the accelerator.

Every read checks the files against meta.json (``verify``): a truncated, overwritten or missing
file is a one-line ``DataError`` naming it and the command that rebuilds the cache, never a crash
deep in numpy or TensorFlow, and ``prepare`` rebuilds a damaged cache instead of keeping it.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import DTypeLike

from tinyopt.core.errors import ConfigError, DataError
from tinyopt.core.urls import first_line, redact
from tinyopt.data import fetch
from tinyopt.data.fetch import DEFAULT_URL, OFFICIAL_MD5, SourceTree

__all__ = ["DEFAULT_URL", "OFFICIAL_MD5", "SPLITS", "ClassInfo", "default_cache_dir", "info",
           "is_prepared", "verify", "rebuild_command", "npy_problem", "load_split", "load_classes",
           "stratified_subset"]

SPLITS = ("train", "selection", "test")
IMAGE_SHAPE = (64, 64, 3)
# meta.json's "files" (sizes and checksums) came later, and is optional: format 1 caches prepared
# without it still load, checked by what can be checked (the .npy headers against the file sizes
# and meta.json's split sizes). The format is part of the fingerprint, so bumping it would rebuild them.
CACHE_FORMAT = 1
FILES = (*(f"{split}_{part}.npy" for split in SPLITS for part in "xy"), "classes.tsv")
META_KEYS = ("source", "fingerprint", "options", "splits", "classes", "skipped", "created")
CLASSES_HEADER = "index\twnid\tname"
_CHECKSUM_CHUNK = 1 << 20
# Where each split's images come from in the source, for error messages.
SOURCE_FOLDERS = {"train": "train/", "selection": "train/", "test": "val/images/"}
PREPARED = "prepared"


@dataclass(frozen=True)
class ClassInfo:
    """One class: its integer label, WordNet id and human-readable name from words.txt."""

    index: int
    wnid: str
    name: str


def default_cache_dir() -> Path:
    """``$TINYOPT_CACHE`` if set, else ``~/.cache/tinyopt``."""
    return Path(os.environ.get("TINYOPT_CACHE") or "~/.cache/tinyopt").expanduser()


def cache_folder(cache_dir: str | os.PathLike | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


def is_prepared(cache_dir: str | os.PathLike | None = None) -> bool:
    """Whether the cache holds a prepared dataset, intact or not (``verify`` says which)."""
    # prepared/ only ever appears whole, renamed into place by a prepare that completed.
    return (cache_folder(cache_dir) / PREPARED).is_dir()


def verify(cache_dir: str | os.PathLike | None = None, *, checksums: bool = True) -> dict:
    """Check the prepared dataset against its meta.json, and return that meta.

    Checked every time (about a millisecond): meta.json is valid JSON with every key; each file is
    there, with its recorded byte size; each .npy header gives the dtype and shape that meta.json's
    split sizes call for, and a file size that holds them; classes.tsv lists meta.json's classes.
    With ``checksums``, the crc32 of every file is compared with the one recorded when it was
    prepared: that reads every byte, about 0.3 s a GB from the page cache and 1 s a GB from disk
    (0.1 s for the 0.3 GB of the dev subset, 0.45 s for the 1.35 GB of the full dataset), so it is
    done once where a sweep (``tinyopt.data.splits.load_sweep_data``), ``prepare`` or
    ``tinyopt data info`` starts, and ``load_split`` leaves it out. A cache prepared before sizes
    and checksums were recorded gets the other checks.

    Args:
        cache_dir: cache folder; defaults to ``default_cache_dir()``.
        checksums: also compare every file's crc32 with the recorded one.

    Returns:
        The contents of meta.json.

    Raises:
        DataError: no prepared dataset in the cache, or one naming the damaged file, what is wrong
            with it and the command that rebuilds the cache.
    """
    folder = _prepared(cache_dir)
    try:
        return verified_meta(folder, checksums)
    except Damaged as damage:
        raise DataError(f"{damage}; rebuild the cache with `{rebuild_command(cache_dir)}`") from None


def rebuild_command(cache_dir: str | os.PathLike | None = None) -> str:
    """The ``tinyopt data prepare --force`` command that rebuilds the cache from its recorded source.

    The source's secrets are hidden; it reads ``SOURCE`` when meta.json no longer says it.
    """
    cache = cache_folder(cache_dir)
    try:
        source = redact(str(json.loads((cache / PREPARED / "meta.json").read_text())["source"]))
    except (OSError, ValueError, KeyError, TypeError):
        source = "SOURCE"
    return shlex.join(["tinyopt", "data", "prepare", "--force", "--data", source, "--cache", str(cache)])


def npy_problem(path: Path, shape: tuple[int, ...], dtype: DTypeLike) -> str | None:
    """What keeps the .npy file at ``path`` from holding a C-order ``dtype`` array of ``shape``, or None.

    Reads the header and the file size only, so it is cheap enough for every load: it catches a
    missing, truncated or overwritten file, and one written for another shape or dtype.
    """
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    try:
        with open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            if version not in readers:
                raise ValueError(f"format version {version[0]}.{version[1]} is not one np.save writes")
            found_shape, fortran, found_dtype = readers[version](handle)
            data_offset = handle.tell()
    except FileNotFoundError:
        return "is missing"
    # How numpy reports a bad magic string or header, and a file cut inside its header.
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        return f"is not a valid .npy file ({first_line(err)})"
    expected_dtype = np.dtype(dtype)
    if (tuple(found_shape), found_dtype, fortran) != (tuple(shape), expected_dtype, False):
        order = " in Fortran order" if fortran else ""
        return f"holds {found_dtype} {tuple(found_shape)}{order}, expected {expected_dtype} {tuple(shape)}"
    return _size_problem(path.stat().st_size, data_offset + math.prod(shape) * expected_dtype.itemsize)


class Damaged(Exception):
    """A prepared dataset disagrees with its meta.json; the message names the file and what is wrong."""


def verified_meta(folder: Path, checksums: bool) -> dict:
    """``verify`` on a prepared folder, raising ``Damaged`` (``prepare`` rebuilds rather than fails)."""
    meta = _read_meta(folder / "meta.json")
    recorded = meta.get("files", {})
    for name in FILES:
        path = folder / name
        if not path.is_file():
            raise Damaged(f"{path} is missing")
        problem = _size_problem(path.stat().st_size, recorded[name]["bytes"]) if name in recorded else None
        if problem:
            raise Damaged(f"{path} {problem}")
    for split in SPLITS:
        count = meta["splits"][split]
        for path, shape, dtype in ((folder / f"{split}_x.npy", (count, *IMAGE_SHAPE), np.uint8),
                                   (folder / f"{split}_y.npy", (count,), np.int64)):
            problem = npy_problem(path, shape, dtype)
            if problem:
                raise Damaged(f"{path} {problem}")
    _read_classes(folder / "classes.tsv", meta["classes"])
    for name, record in recorded.items() if checksums else ():
        actual = crc32(folder / name)
        if actual != record["crc32"]:
            raise Damaged(f"{folder / name} fails its checksum (crc32 {actual}, meta.json records "
                           f"{record['crc32']}): its bytes changed after it was prepared")
    return meta


def _read_meta(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise Damaged(f"{path} is missing") from None
    except (OSError, ValueError) as err:  # ValueError: bad JSON, or bytes that are not UTF-8
        raise Damaged(f"{path} is not valid JSON ({first_line(err)})") from None
    missing = [key for key in META_KEYS if key not in meta] if isinstance(meta, dict) else list(META_KEYS)
    if missing:
        raise Damaged(f"{path} lacks {', '.join(missing)}")
    files = meta.get("files", {})
    well_formed = (isinstance(meta["source"], str) and isinstance(meta["fingerprint"], str)
                   and isinstance(meta["splits"], dict) and all(_is_count(meta["splits"].get(s)) for s in SPLITS)
                   and _is_count(meta["classes"]) and isinstance(files, dict) and set(files) <= set(FILES)
                   and all(isinstance(r, dict) and _is_count(r.get("bytes")) and isinstance(r.get("crc32"), str)
                           for r in files.values()))
    if not well_formed:
        raise Damaged(f"{path} has a malformed source, fingerprint, splits, classes or files entry")
    return meta


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _read_classes(path: Path, count: int) -> list[ClassInfo]:
    try:
        lines = path.read_text().splitlines()
        if not lines or lines[0] != CLASSES_HEADER:
            raise ValueError("its first line is not index<TAB>wnid<TAB>name")
        classes = [ClassInfo(int(index), wnid, name) for index, wnid, name in (line.split("\t") for line in lines[1:])]
    except (OSError, ValueError) as err:  # ValueError: not UTF-8, a row without 3 fields, a bad index
        raise Damaged(f"{path} is unreadable ({first_line(err)})") from None
    if [c.index for c in classes] != list(range(count)):
        raise Damaged(f"{path} does not list classes 0 to {count - 1} in order, as meta.json records")
    return classes


def _size_problem(size: int, expected: int) -> str | None:
    if size < expected:
        return f"is truncated: {size} bytes, expected {expected}"
    if size > expected:
        return f"has {size} bytes, expected {expected}"
    return None


def crc32(path: Path) -> str:
    # crc32, not a cryptographic hash: it is there to catch accidental damage (truncation, a flipped
    # or overwritten block), and zlib's runs at ~2.5 GB/s where blake2b manages ~0.6 GB/s.
    crc = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHECKSUM_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def _prepared(cache_dir: str | os.PathLike | None) -> Path:
    cache = cache_folder(cache_dir)
    if not is_prepared(cache):
        raise DataError(f"{cache} holds no prepared dataset; run `tinyopt data prepare --cache {cache}` first")
    return cache / PREPARED


def load_split(split: str, cache_dir: str | os.PathLike | None = None, *, mmap: bool = True
               ) -> tuple[np.ndarray, np.ndarray]:
    """Load one split of the prepared dataset.

    Args:
        split: ``train``, ``selection`` or ``test``.
        cache_dir: cache folder; defaults to ``default_cache_dir()``.
        mmap: memory-map the images (instant, shared between processes) instead of reading them.

    Returns:
        ``(x, y)``: uint8 images (N, 64, 64, 3) and int64 class indices (N,). ``test`` keeps the
        official val order val_0, val_1, ...

    Raises:
        DataError: unknown split, no prepared dataset in the cache, or a damaged one (see ``verify``,
            whose checks but the checksums this runs).
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    verify(cache_dir, checksums=False)
    folder = _prepared(cache_dir)
    images = np.load(folder / f"{split}_x.npy", mmap_mode="r" if mmap else None)
    return images, np.load(folder / f"{split}_y.npy")


def load_classes(cache_dir: str | os.PathLike | None = None) -> list[ClassInfo]:
    """The class table of the prepared dataset, in class-index order (sorted wnids).

    Raises:
        DataError: no prepared dataset in the cache, or a damaged one (see ``verify``, whose checks
            but the checksums this runs).
    """
    meta = verify(cache_dir, checksums=False)
    return _read_classes(_prepared(cache_dir) / "classes.tsv", meta["classes"])


def info(cache_dir: str | os.PathLike | None = None, *, checksums: bool = True) -> dict:
    """What the cache holds, for ``tinyopt data info``, once ``verify`` finds it intact.

    Args:
        cache_dir: cache folder; defaults to ``default_cache_dir()``.
        checksums: passed to ``verify``; a cache ``prepare`` has just checked or written can skip them.

    Returns:
        A dict with ``cache`` (path of the prepared dataset), ``source``, ``fingerprint``,
        ``created``, ``options``, ``classes`` (count), ``splits`` (images per split), ``skipped``
        (undecodable images left out) and ``bytes`` (on disk).

    Raises:
        DataError: no prepared dataset in the cache, or a damaged one.
    """
    meta = verify(cache_dir, checksums=checksums)
    folder = _prepared(cache_dir)
    return {"cache": str(folder), "source": meta["source"], "fingerprint": meta["fingerprint"],
            "created": meta["created"], "options": meta["options"], "classes": meta["classes"],
            "splits": meta["splits"], "skipped": len(meta["skipped"]),
            "bytes": sum(path.stat().st_size for path in folder.iterdir())}


def stratified_subset(y: np.ndarray, *, per_class: int = 0, fraction: float = 1.0, seed: int = 0) -> np.ndarray:
    """Seeded subsample that keeps every class, e.g. for quick runs.

    Each class keeps ``round(fraction * n)`` of its ``n`` examples (at least one), capped at
    ``per_class`` when that is positive.

    Args:
        y: integer labels.
        per_class: most examples kept per class; 0 keeps all.
        fraction: share of each class kept, in (0, 1]; 1.0 keeps all.
        seed: seed of the random choice.

    Returns:
        Sorted int64 indices into ``y``.

    Raises:
        ConfigError: ``fraction`` outside (0, 1] or a negative ``per_class``.
    """
    if not 0 < fraction <= 1 or per_class < 0:
        raise ConfigError(f"subset needs 0 < fraction <= 1 and per_class >= 0, got fraction={fraction}, "
                          f"per_class={per_class}")
    y = np.asarray(y)
    rng = np.random.default_rng(seed)
    order = np.argsort(y, kind="stable")
    groups = np.split(order, np.flatnonzero(np.diff(y[order])) + 1) if len(y) else []
    chosen = []
    for members in groups:
        keep = max(1, int(fraction * len(members) + 0.5))
        if per_class:
            keep = min(keep, per_class)
        chosen.append(rng.choice(members, size=keep, replace=False))
    return np.sort(np.concatenate(chosen)).astype(np.int64) if chosen else np.zeros(0, np.int64)


@dataclass
class Plan:
    classes: list[ClassInfo]
    files: dict[str, list[str]]  # split -> file names in row order
    labels: dict[str, np.ndarray]


def plan_splits(tree: SourceTree, selection_fraction: float, seed: int) -> Plan:
    """Check the tree and decide every image's split and row."""
    layout = fetch.read_layout(tree)
    in_selection = np.zeros(len(layout.train_files), bool)
    in_selection[stratified_subset(layout.train_labels, fraction=selection_fraction, seed=seed)] = True
    rows = {"train": np.flatnonzero(~in_selection), "selection": np.flatnonzero(in_selection),
            "test": np.arange(len(layout.test_files))}
    files = {"train": layout.train_files, "selection": layout.train_files, "test": layout.test_files}
    labels = {"train": layout.train_labels, "selection": layout.train_labels, "test": layout.test_labels}
    classes = [ClassInfo(index, wnid, name)
               for index, (wnid, name) in enumerate(zip(layout.wnids, layout.names, strict=True))]
    return Plan(classes, {split: [files[split][i] for i in rows[split]] for split in SPLITS},
                 {split: labels[split][rows[split]] for split in SPLITS})
