"""Prepare the cache: download or open the source, verify it, decode every image once, swap the result in whole.

``prepare`` builds what ``tinyopt.data.cache`` reads: images are decoded with all cores, in chunks,
straight into memory-mapped .npy files; the new dataset is written beside the old one and renamed
into place once complete, so an interrupted prepare never leaves a cache that loads wrong.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import shutil
import uuid
import zipfile
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from tinyopt.core.errors import ConfigError, DataError
from tinyopt.core.locks import file_lock
from tinyopt.data import fetch
from tinyopt.data.cache import (
    CACHE_FORMAT,
    CLASSES_HEADER,
    FILES,
    IMAGE_SHAPE,
    PREPARED,
    SOURCE_FOLDERS,
    SPLITS,
    Damaged,
    Plan,
    cache_folder,
    crc32,
    is_prepared,
    plan_splits,
    verified_meta,
)
from tinyopt.data.fetch import DEFAULT_URL, OFFICIAL_MD5, SourceTree

_PARTIAL = ".prepared.partial-"
_OLD = ".prepared.old-"
_CHUNK_IMAGES = 500
# Below this many images per worker, starting processes costs more than it saves.
_MIN_IMAGES_PER_WORKER = 1500
# Set while decoding workers start: a spawned worker re-imports the caller's __main__, and an
# unguarded top-level prepare() there would wait for the lock its parent holds, forever.
_WORKER_ENV = "TINYOPT_DECODE_WORKER"


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
    cache = cache_folder(cache_dir)
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
    plan = plan_splits(tree, options["selection_fraction"], options["seed"])
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
                 "files": {name: {"bytes": (partial / name).stat().st_size, "crc32": crc32(partial / name)}
                           for name in FILES}}
        (partial / "meta.json").write_text(json.dumps(meta, indent=1))
        _swap_in(cache, partial)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def _check_md5(path: Path, md5: str) -> None:
    actual = fetch.file_digest(path)
    if actual != md5.lower():
        raise DataError(f"{path} has md5 {actual}, expected {md5}; download the archive again or drop --md5")


def _check_usable(tree: SourceTree, plan: Plan, labels: dict[str, np.ndarray]) -> None:
    """Refuse a dataset a sweep cannot use: a split with no image, or a class with no train image.

    Args:
        labels: each split's labels, as planned or as kept once undecodable images were skipped.
    """
    for split in SPLITS:
        if not len(labels[split]):
            raise DataError(f"{tree.describe(SOURCE_FOLDERS[split])} leaves the {split} split empty: "
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
        return verified_meta(cache / PREPARED, checksums=True)["fingerprint"]
    except Damaged as damage:
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
        if (cache / PREPARED).exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.rename(cache / PREPARED)


def _swap_in(cache: Path, partial: Path) -> None:
    final, old = cache / PREPARED, cache / f"{_OLD}{partial.name[len(_PARTIAL):]}"
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


def _write_arrays(tree: SourceTree, plan: Plan, folder: Path, skip_bad: bool, progress: bool) -> list[str]:
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
    (folder / "classes.tsv").write_text(f"{CLASSES_HEADER}\n" + "".join(
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


