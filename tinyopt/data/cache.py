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

import hashlib
import io
import json
import math
import multiprocessing
import os
import shlex
import shutil
import uuid
import zipfile
import zlib
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
from numpy.typing import DTypeLike

from tinyopt.core.errors import ConfigError, DataError
from tinyopt.core.locks import file_lock
from tinyopt.core.urls import first_line, redact
from tinyopt.data import fetch
from tinyopt.data.fetch import DEFAULT_URL, OFFICIAL_MD5, SourceTree

__all__ = ["DEFAULT_URL", "OFFICIAL_MD5", "SPLITS", "ClassInfo", "default_cache_dir", "prepare", "info",
           "is_prepared", "verify", "rebuild_command", "npy_problem", "load_split", "load_classes",
           "stratified_subset"]

SPLITS = ("train", "selection", "test")
IMAGE_SHAPE = (64, 64, 3)
# meta.json's "files" (sizes and checksums) came later, and is optional: format 1 caches prepared
# without it still load, checked by what can be checked (the .npy headers against the file sizes
# and meta.json's split sizes). The format is part of the fingerprint, so bumping it would rebuild them.
CACHE_FORMAT = 1
_FILES = (*(f"{split}_{part}.npy" for split in SPLITS for part in "xy"), "classes.tsv")
_META_KEYS = ("source", "fingerprint", "options", "splits", "classes", "skipped", "created")
_CLASSES_HEADER = "index\twnid\tname"
_CHECKSUM_CHUNK = 1 << 20
# Where each split's images come from in the source, for error messages.
_SOURCE_FOLDERS = {"train": "train/", "selection": "train/", "test": "val/images/"}
_PREPARED = "prepared"
_PARTIAL = ".prepared.partial-"
_OLD = ".prepared.old-"
_CHUNK_IMAGES = 500
# Below this many images per worker, starting processes costs more than it saves.
_MIN_IMAGES_PER_WORKER = 1500
# Set while decoding workers start: a spawned worker re-imports the caller's __main__, and an
# unguarded top-level prepare() there would wait for the lock its parent holds, forever.
_WORKER_ENV = "TINYOPT_DECODE_WORKER"


@dataclass(frozen=True)
class ClassInfo:
    """One class: its integer label, WordNet id and human-readable name from words.txt."""

    index: int
    wnid: str
    name: str


def default_cache_dir() -> Path:
    """``$TINYOPT_CACHE`` if set, else ``~/.cache/tinyopt``."""
    return Path(os.environ.get("TINYOPT_CACHE") or "~/.cache/tinyopt").expanduser()


def _cache(cache_dir: str | os.PathLike | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


def prepare(source: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None, *,
            skip_bad: bool = False, selection_fraction: float = 0.1, seed: int = 0, progress: bool = True,
            md5: str | None = None, force: bool = False) -> Path:
    """Verify Tiny ImageNet and decode it once into the cache.

    A no-op when the cache already holds this source prepared with these options and passes
    ``verify`` (checksums included); a damaged one is rebuilt. A failed or interrupted run leaves
    any existing prepared dataset untouched; running again completes it (a cut download resumes
    from its ``.part`` file).

    Args:
        source: the official URL (default), another http(s) URL, a local zip, or an extracted
            ``tiny-imagenet-200`` folder (or its parent).
        cache_dir: cache folder; defaults to ``default_cache_dir()``.
        skip_bad: skip and count undecodable images instead of raising.
        selection_fraction: share of each train class held out as the ``selection`` split.
        seed: seed of the selection split.
        progress: show rich progress bars on stderr, and say why nothing is done or a damaged cache
            is rebuilt.
        md5: expected md5 of the archive; the official URL's is built in, None checks nothing else.
        force: rebuild even when the cache holds an intact dataset of this source and these options.

    Returns:
        The cache folder, to pass to ``load_split`` and ``load_classes``.

    Raises:
        DataError: the source cannot be had, is not a consistent Tiny ImageNet tree, holds an
            undecodable image (without ``skip_bad``), or would leave a split empty or a class without
            a train image.
        ConfigError: ``selection_fraction`` is not strictly between 0 and 1.
    """
    if os.environ.get(_WORKER_ENV):
        raise DataError("tinyopt.data.cache.prepare ran while a decoding worker imported the main script; put the "
                        "script's top-level code under `if __name__ == '__main__':`")
    if not 0 < selection_fraction < 1:
        raise ConfigError(f"selection fraction must be between 0 and 1 (exclusive), got {selection_fraction}")
    source = DEFAULT_URL if source is None else str(source)
    if md5 is None and source == DEFAULT_URL:
        md5 = OFFICIAL_MD5
    cache = _cache(cache_dir)
    options = {"selection_fraction": selection_fraction, "seed": seed, "skip_bad": skip_bad}
    remote = fetch.is_url(source)
    created = not cache.exists()
    cache.mkdir(parents=True, exist_ok=True)
    tree = None
    try:
        with file_lock(cache / ".lock"):
            _recover(cache)
            if remote:
                fingerprint = _fingerprint(f"{source} md5={md5}", options)
                if not force and _intact_fingerprint(cache, progress) == fingerprint:
                    return _already(cache, progress)
                tree = fetch.open_tree(fetch.download(source, _download_path(cache, source), md5=md5,
                                                      progress=progress))
            else:
                tree = fetch.open_tree(Path(source))
                if md5 is not None and tree.is_zip:
                    _check_md5(tree.location, md5)
                fingerprint = _fingerprint(_tree_key(tree), options)
                if not force and _intact_fingerprint(cache, progress) == fingerprint:
                    return _already(cache, progress)
            meta = {"format": CACHE_FORMAT, "fingerprint": fingerprint, "options": options,
                    "source": source if remote else str(tree.location)}
            _build(cache, tree, meta, progress)
    except BaseException:
        # A cache folder this call made holds nothing worth keeping, unless a download to resume.
        if created and not any(cache.glob("downloads/*.part")):
            shutil.rmtree(cache, ignore_errors=True)
        raise
    finally:
        if tree is not None:
            tree.close()
    return cache


def _build(cache: Path, tree: SourceTree, meta: dict, progress: bool) -> None:
    """Decode ``tree`` into a partial folder, then swap it in whole."""
    options = meta["options"]
    plan = _plan(tree, options["selection_fraction"], options["seed"])
    _check_usable(tree, plan, plan.labels)  # before decoding: a source without val images fails in a blink
    partial = cache / f"{_PARTIAL}{uuid.uuid4().hex[:8]}"
    partial.mkdir()
    try:
        skipped = _write_arrays(tree, plan, partial, options["skip_bad"], progress)
        labels = {split: np.load(partial / f"{split}_y.npy") for split in SPLITS}
        _check_usable(tree, plan, labels)
        meta |= {"splits": {split: len(labels[split]) for split in SPLITS},
                 "classes": len(plan.classes), "skipped": skipped,
                 "created": datetime.now(UTC).isoformat(timespec="seconds"),
                 "files": {name: {"bytes": (partial / name).stat().st_size, "crc32": _crc32(partial / name)}
                           for name in _FILES}}
        (partial / "meta.json").write_text(json.dumps(meta, indent=1))
        _swap_in(cache, partial)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def _check_md5(path: Path, md5: str) -> None:
    actual = fetch.file_digest(path)
    if actual != md5.lower():
        raise DataError(f"{path} has md5 {actual}, expected {md5}; download the archive again or drop --md5")


def _check_usable(tree: SourceTree, plan: _Plan, labels: dict[str, np.ndarray]) -> None:
    """Refuse a dataset a sweep cannot use: a split with no image, or a class with no train image.

    Args:
        labels: each split's labels, as planned or as kept once undecodable images were skipped.
    """
    for split in SPLITS:
        if not len(labels[split]):
            raise DataError(f"{tree.describe(_SOURCE_FOLDERS[split])} leaves the {split} split empty: "
                            f"{_why_none(split, len(plan.labels[split]))}")
    # A class the train split lacks is an error, not a gap to tolerate: no model can learn it, so every
    # one of its test images would count as a miss with nothing to say why. With 500 train images a
    # class in the official data, losing all of them means a broken source, not a few bad files.
    kept = np.bincount(labels["train"], minlength=len(plan.classes))
    planned = np.bincount(plan.labels["train"], minlength=len(plan.classes))
    lost = np.flatnonzero(kept == 0)
    if len(lost):
        wnid = plan.classes[lost[0]].wnid
        raise DataError(f"{tree.describe(f'train/{wnid}/images/')} leaves class {wnid} with no image in the train "
                        f"split: {_why_none('train', planned[lost[0]])}")


def _why_none(split: str, planned: int) -> str:
    """Why images of ``split`` (all of it, or one class of it) came to none, and the fix."""
    if planned:
        return (f"all {planned} of its images are undecodable; use a complete Tiny ImageNet "
                "(e.g. download the archive again)")
    if split == "train":  # read_layout saw train images for every class: the selection split took them
        return "the selection split takes all of its images; lower --selection-fraction"
    return "the source has none; use a complete Tiny ImageNet (e.g. download the archive again)"


def _intact_fingerprint(cache: Path, progress: bool) -> str | None:
    """The fingerprint of the prepared dataset when it passes ``verify``; None when there is none or it is damaged."""
    if not is_prepared(cache):
        return None
    try:
        return _verified_meta(cache / _PREPARED, checksums=True)["fingerprint"]
    except _Damaged as damage:
        _say(progress, f"{damage}; rebuilding the cache")
        return None


def _already(cache: Path, progress: bool) -> Path:
    _say(progress, f"{cache} already holds this source with these options; nothing to do")
    return cache


def _say(progress: bool, line: str) -> None:
    if progress:
        from rich.console import Console

        # Literal text on one line: paths and error reasons may hold brackets, which rich reads as markup.
        Console(stderr=True).print(line, markup=False, highlight=False, soft_wrap=True)


def _recover(cache: Path) -> None:
    """Clear what an interrupted prepare left; put back a dataset caught mid-swap."""
    for partial in cache.glob(f"{_PARTIAL}*"):
        shutil.rmtree(partial, ignore_errors=True)
    for old in cache.glob(f"{_OLD}*"):
        if (cache / _PREPARED).exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.rename(cache / _PREPARED)


def _swap_in(cache: Path, partial: Path) -> None:
    final, old = cache / _PREPARED, cache / f"{_OLD}{partial.name[len(_PARTIAL):]}"
    if final.exists():
        final.rename(old)
    partial.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def _download_path(cache: Path, url: str) -> Path:
    # The URL's hash in the name keeps two sources with the same file name apart.
    name = Path(urlparse(url).path).name or "download.zip"
    return cache / "downloads" / f"{hashlib.sha256(url.encode()).hexdigest()[:8]}-{name}"


def _tree_key(tree: SourceTree) -> str:
    if tree.is_zip:
        return f"zip sha256={fetch.file_digest(tree.location, 'sha256')}"
    listing = hashlib.sha256()
    for name in sorted(tree.files):
        stat = (tree.location / name).stat()
        listing.update(f"{name}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return f"folder {tree.location} listing={listing.hexdigest()}"


def _fingerprint(source_key: str, options: dict) -> str:
    blob = json.dumps({"source": source_key, "options": options, "format": CACHE_FORMAT}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class _Plan:
    classes: list[ClassInfo]
    files: dict[str, list[str]]  # split -> file names in row order
    labels: dict[str, np.ndarray]


def _plan(tree: SourceTree, selection_fraction: float, seed: int) -> _Plan:
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
    return _Plan(classes, {split: [files[split][i] for i in rows[split]] for split in SPLITS},
                 {split: labels[split][rows[split]] for split in SPLITS})


def _decode_image(payload: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(payload)) as image:
        # Tiny ImageNet has a few grayscale JPEGs (and CMYK is legal JPEG): the model wants RGB.
        pixels = np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
    if pixels.shape != IMAGE_SHAPE:
        raise ValueError(f"image is {pixels.shape[1]}x{pixels.shape[0]}, expected 64x64")
    return pixels


class _Decoder:
    """Decodes chunks of (split, row, file) into the split arrays, which are shared memory maps."""

    def __init__(self, location: Path, is_zip: bool, prefix: str, outputs: dict[str, Path]):
        self.tree = SourceTree(location, is_zip, prefix)
        self.outputs = {split: np.lib.format.open_memmap(path, mode="r+") for split, path in outputs.items()}

    def __call__(self, chunk: list[tuple[str, int, str]]) -> tuple[int, list[tuple[str, int, str, str]]]:
        bad = []
        for split, row, name in chunk:
            try:
                self.outputs[split][row] = _decode_image(self.tree.read(name))
            # The ways PIL and zipfile report a corrupt, truncated or odd-sized image.
            except (OSError, ValueError, SyntaxError, EOFError, zipfile.BadZipFile) as err:
                bad.append((split, row, name, f"{type(err).__name__}: {err}"))
        return len(chunk), bad

    def close(self) -> None:
        self.tree.close()
        self.outputs.clear()


_worker_decoder: _Decoder | None = None


def _start_worker(*args) -> None:
    global _worker_decoder
    _worker_decoder = _Decoder(*args)


def _decode_in_worker(chunk):
    return _worker_decoder(chunk)


def _decoded_chunks(args: tuple, chunks: list, workers: int) -> Iterator[tuple[int, list]]:
    done = 0
    if workers > 1:
        # spawn, not fork: the caller may hold TensorFlow's threads, which fork would copy half-locked.
        pool = ProcessPoolExecutor(workers, multiprocessing.get_context("spawn"), _start_worker, args)
        try:
            with pool:
                os.environ[_WORKER_ENV] = "1"
                try:
                    results = pool.map(_decode_in_worker, chunks)  # submits every chunk, starting every worker
                finally:
                    del os.environ[_WORKER_ENV]
                for result in results:
                    done += 1
                    yield result
            return
        except BrokenProcessPool:
            pass  # workers that could not start (an unguarded or stdin __main__) or died: finish here
    decoder = _Decoder(*args)
    try:
        yield from map(decoder, chunks[done:])
    finally:
        decoder.close()


def _write_arrays(tree: SourceTree, plan: _Plan, folder: Path, skip_bad: bool, progress: bool) -> list[str]:
    """Decode every image into ``folder``; return the names of the images skipped as undecodable."""
    outputs = {split: folder / f"{split}_x.npy" for split in SPLITS}
    for split, path in outputs.items():
        _new_images(path, len(plan.files[split]))  # sized files on disk, which the workers map and fill
    jobs = [(split, row, name) for split in SPLITS for row, name in enumerate(plan.files[split])]
    chunks = [jobs[i:i + _CHUNK_IMAGES] for i in range(0, len(jobs), _CHUNK_IMAGES)]
    workers = max(1, min(len(os.sched_getaffinity(0)), len(jobs) // _MIN_IMAGES_PER_WORKER))
    bad = []
    with _counting_bar(progress) as bar:
        task = bar.add_task(f"decode ({workers} process{'es' if workers > 1 else ''})", total=len(jobs))
        for count, chunk_bad in _decoded_chunks((tree.location, tree.is_zip, tree.prefix, outputs),
                                                chunks, workers):
            bad.extend(chunk_bad)
            bar.advance(task, count)
    if bad and not skip_bad:
        _, _, name, reason = min(bad, key=lambda item: fetch.natural_key(item[2]))
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise DataError(f"{tree.describe(name)} cannot be decoded ({reason}){more}; replace it, "
                        f"or pass --skip-bad to skip undecodable images")
    for split in SPLITS:
        drop = [row for s, row, _, _ in bad if s == split]
        keep = np.setdiff1d(np.arange(len(plan.files[split])), drop)
        if drop:
            _keep_rows(outputs[split], keep)
        np.save(folder / f"{split}_y.npy", plan.labels[split][keep].astype(np.int64))
    (folder / "classes.tsv").write_text(f"{_CLASSES_HEADER}\n" + "".join(
        f"{c.index}\t{c.wnid}\t{c.name}\n" for c in plan.classes))
    return sorted((name for _, _, name, _ in bad), key=fetch.natural_key)


def _keep_rows(path: Path, keep: np.ndarray) -> None:
    source = np.load(path, mmap_mode="r")
    kept = path.with_name(f"kept-{path.name}")
    _new_images(kept, len(keep))[:] = source[keep]
    del source
    kept.replace(path)


def _counting_bar(enabled: bool):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
    from rich.text import Text

    class _Rate(ProgressColumn):
        def render(self, task) -> Text:
            return Text(f"{task.finished_speed or task.speed or 0:,.0f} images/s")

    # Transient: what follows says it all (the summary table, or the one line of an error such as a
    # source whose every image was skipped), and a finished bar would be a second line before it.
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), _Rate(),
                    TimeRemainingColumn(), console=Console(stderr=True), disable=not enabled, transient=True)


def _new_images(path: Path, count: int) -> np.ndarray:
    return np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(count, *IMAGE_SHAPE))


def is_prepared(cache_dir: str | os.PathLike | None = None) -> bool:
    """Whether the cache holds a prepared dataset, intact or not (``verify`` says which)."""
    # prepared/ only ever appears whole, renamed into place by a prepare that completed.
    return (_cache(cache_dir) / _PREPARED).is_dir()


def verify(cache_dir: str | os.PathLike | None = None, *, checksums: bool = True) -> dict:
    """Check the prepared dataset against its meta.json, and return that meta.

    Checked every time (about a millisecond): meta.json is valid JSON with every key; each file is
    there, with its recorded byte size; each .npy header gives the dtype and shape that meta.json's
    split sizes call for, and a file size that holds them; classes.tsv lists meta.json's classes.
    With ``checksums``, the crc32 of every file is compared with the one recorded when it was
    prepared: that reads every byte, about 0.3 s a GB from the page cache and 1 s a GB from disk
    (0.1 s for the 0.3 GB of the dev subset, 0.45 s for the 1.35 GB of the full dataset), so it is
    done once where a sweep (``tinyopt.sweep.runner.load_sweep_data``), ``prepare`` or
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
        return _verified_meta(folder, checksums)
    except _Damaged as damage:
        raise DataError(f"{damage}; rebuild the cache with `{rebuild_command(cache_dir)}`") from None


def rebuild_command(cache_dir: str | os.PathLike | None = None) -> str:
    """The ``tinyopt data prepare --force`` command that rebuilds the cache from its recorded source.

    The source's secrets are hidden; it reads ``SOURCE`` when meta.json no longer says it.
    """
    cache = _cache(cache_dir)
    try:
        source = redact(str(json.loads((cache / _PREPARED / "meta.json").read_text())["source"]))
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


class _Damaged(Exception):
    """A prepared dataset disagrees with its meta.json; the message names the file and what is wrong."""


def _verified_meta(folder: Path, checksums: bool) -> dict:
    """``verify`` on a prepared folder, raising ``_Damaged`` (``prepare`` rebuilds rather than fails)."""
    meta = _read_meta(folder / "meta.json")
    recorded = meta.get("files", {})
    for name in _FILES:
        path = folder / name
        if not path.is_file():
            raise _Damaged(f"{path} is missing")
        problem = _size_problem(path.stat().st_size, recorded[name]["bytes"]) if name in recorded else None
        if problem:
            raise _Damaged(f"{path} {problem}")
    for split in SPLITS:
        count = meta["splits"][split]
        for path, shape, dtype in ((folder / f"{split}_x.npy", (count, *IMAGE_SHAPE), np.uint8),
                                   (folder / f"{split}_y.npy", (count,), np.int64)):
            problem = npy_problem(path, shape, dtype)
            if problem:
                raise _Damaged(f"{path} {problem}")
    _read_classes(folder / "classes.tsv", meta["classes"])
    for name, record in recorded.items() if checksums else ():
        actual = _crc32(folder / name)
        if actual != record["crc32"]:
            raise _Damaged(f"{folder / name} fails its checksum (crc32 {actual}, meta.json records "
                           f"{record['crc32']}): its bytes changed after it was prepared")
    return meta


def _read_meta(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise _Damaged(f"{path} is missing") from None
    except (OSError, ValueError) as err:  # ValueError: bad JSON, or bytes that are not UTF-8
        raise _Damaged(f"{path} is not valid JSON ({first_line(err)})") from None
    missing = [key for key in _META_KEYS if key not in meta] if isinstance(meta, dict) else list(_META_KEYS)
    if missing:
        raise _Damaged(f"{path} lacks {', '.join(missing)}")
    files = meta.get("files", {})
    well_formed = (isinstance(meta["source"], str) and isinstance(meta["fingerprint"], str)
                   and isinstance(meta["splits"], dict) and all(_is_count(meta["splits"].get(s)) for s in SPLITS)
                   and _is_count(meta["classes"]) and isinstance(files, dict) and set(files) <= set(_FILES)
                   and all(isinstance(r, dict) and _is_count(r.get("bytes")) and isinstance(r.get("crc32"), str)
                           for r in files.values()))
    if not well_formed:
        raise _Damaged(f"{path} has a malformed source, fingerprint, splits, classes or files entry")
    return meta


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _read_classes(path: Path, count: int) -> list[ClassInfo]:
    try:
        lines = path.read_text().splitlines()
        if not lines or lines[0] != _CLASSES_HEADER:
            raise ValueError("its first line is not index<TAB>wnid<TAB>name")
        classes = [ClassInfo(int(index), wnid, name) for index, wnid, name in (line.split("\t") for line in lines[1:])]
    except (OSError, ValueError) as err:  # ValueError: not UTF-8, a row without 3 fields, a bad index
        raise _Damaged(f"{path} is unreadable ({first_line(err)})") from None
    if [c.index for c in classes] != list(range(count)):
        raise _Damaged(f"{path} does not list classes 0 to {count - 1} in order, as meta.json records")
    return classes


def _size_problem(size: int, expected: int) -> str | None:
    if size < expected:
        return f"is truncated: {size} bytes, expected {expected}"
    if size > expected:
        return f"has {size} bytes, expected {expected}"
    return None


def _crc32(path: Path) -> str:
    # crc32, not a cryptographic hash: it is there to catch accidental damage (truncation, a flipped
    # or overwritten block), and zlib's runs at ~2.5 GB/s where blake2b manages ~0.6 GB/s.
    crc = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHECKSUM_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def _prepared(cache_dir: str | os.PathLike | None) -> Path:
    cache = _cache(cache_dir)
    if not is_prepared(cache):
        raise DataError(f"{cache} holds no prepared dataset; run `tinyopt data prepare --cache {cache}` first")
    return cache / _PREPARED


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
