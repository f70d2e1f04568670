"""Getting the Tiny ImageNet files: resumable verified download, safe reading, layout check.

The archive is never extracted: ``SourceTree`` reads members straight from the zip (or files
from a folder), which is faster and leaves no half-extracted tree behind. Every member name of a
zip is checked first, so an archive with an entry that would land outside the dataset folder
(``../``, an absolute path) is refused as a whole. ``read_layout`` then checks that wnids.txt,
words.txt, the train folders and the val annotations agree, and lists every labelled image.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tinyopt.core.errors import DataError

DEFAULT_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
OFFICIAL_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
ROOT_MARKER = "wnids.txt"
_IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
_ANNOTATIONS = "val/val_annotations.txt"
_CHUNK_BYTES = 1 << 20


def is_url(source: str | os.PathLike) -> bool:
    """Whether ``source`` names an http(s) URL rather than a local path."""
    return str(source).startswith(("http://", "https://"))


def file_digest(path: Path, algorithm: str = "md5") -> str:
    """Hex digest of a file's content."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, algorithm).hexdigest()


def _progress_bar(enabled: bool):
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                    TimeRemainingColumn(), console=Console(stderr=True), disable=not enabled)


def download(url: str, dest: Path, *, md5: str | None = None, progress: bool = True,
             attempts: int = 3, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest``, resuming an interrupted download, and verify its md5.

    Bytes go to ``dest`` + ``.part`` first. A cut connection is resumed with an HTTP Range
    request, up to ``attempts`` times in this call, and a later call resumes from the ``.part``
    file too. ``dest`` only ever holds a complete, verified file.

    Args:
        url: an http(s) URL.
        dest: where the finished file goes; an existing ``dest`` is trusted and returned as is.
        md5: expected hex md5 of the whole file, or None to skip the check.
        progress: show a rich progress bar (bytes, rate, ETA) on stderr.
        attempts: connections to try in this call before giving up.
        timeout: seconds a connection may stall.

    Returns:
        ``dest``.

    Raises:
        DataError: the server cannot be reached after ``attempts`` tries, or the md5 differs (the
            bad file is removed).
    """
    dest = Path(dest)
    if dest.is_file():
        return dest
    part = dest.with_name(dest.name + ".part")
    bar = _progress_bar(progress)
    task = bar.add_task(f"download {dest.name}", total=None)
    try:
        for attempt in range(1, attempts + 1):
            try:
                _fetch_into(url, part, bar, task, timeout)
                break
            except (OSError, http.client.HTTPException) as err:
                if isinstance(err, urllib.error.HTTPError) or attempt == attempts:
                    again = f"run again to resume {part.name}" if part.exists() else "run again"
                    raise DataError(f"downloading {url} failed after {attempt} attempt(s) ({err}); "
                                    f"check the URL and network, then {again}, or pass a local zip with --data"
                                    ) from err
    finally:
        bar.stop()
    if md5 is not None:
        actual = file_digest(part)
        if actual != md5.lower():
            part.unlink()
            raise DataError(f"{url} downloaded with md5 {actual}, expected {md5}; the bad file was "
                            f"removed, run again to download it afresh (or check the expected md5)")
    part.replace(dest)
    return dest


def _fetch_into(url: str, part: Path, bar, task, timeout: float) -> None:
    """One connection: append what the server sends to ``part``; raise if it stops short."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416:  # our .part already holds every byte the server has
            return
        raise
    with response:
        if response.status != 206:  # the server ignored the Range header: start over
            have = 0
        bar.start()  # only once a server answers: a refused connection leaves no empty bar behind
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        bar.update(task, total=total, completed=have)
        part.parent.mkdir(parents=True, exist_ok=True)  # only now: a refused connection leaves no folder
        with open(part, "ab" if have else "wb") as out:
            while chunk := response.read(_CHUNK_BYTES):
                out.write(chunk)
                have += len(chunk)
                bar.update(task, completed=have)
    if total is not None and have < total:
        raise http.client.IncompleteRead(b"", total - have)


def _unsafe_member(name: str) -> bool:
    # Backslashes count as separators too: that is how the name would land on Windows.
    parts = name.replace("\\", "/").split("/")
    return name.startswith(("/", "\\")) or ".." in parts or name[1:2] == ":"


@dataclass
class SourceTree:
    """The files of one ``tiny-imagenet-200`` tree, in a zip or a folder, by path relative to its root.

    A tree built from ``location``, ``is_zip`` and ``prefix`` alone (as in a worker process)
    opens its zip on the first ``read``; ``close`` releases it.

    Attributes:
        location: the zip file, or the folder that holds ``wnids.txt``.
        is_zip: whether ``location`` is a zip.
        prefix: inside a zip, the member-name prefix of the root (``"tiny-imagenet-200/"``); else ``""``.
        files: relative posix paths of every file in the tree.
    """

    location: Path
    is_zip: bool
    prefix: str = ""
    files: list[str] = field(default_factory=list)
    _zip: zipfile.ZipFile | None = field(default=None, repr=False, compare=False)

    def read(self, name: str) -> bytes:
        """The bytes of the file ``name`` (relative to the root)."""
        if not self.is_zip:
            return (self.location / name).read_bytes()
        if self._zip is None:
            self._zip = _open_zip(self.location)
        return self._zip.read(self.prefix + name)

    def describe(self, name: str = "") -> str:
        """A path a person can find: ``archive.zip:tiny-imagenet-200/name`` or ``folder/name``."""
        return f"{self.location}:{self.prefix}{name}" if self.is_zip else f"{self.location}/{name}"

    def close(self) -> None:
        """Release the open zip, if any."""
        if self._zip is not None:
            self._zip.close()
            self._zip = None


def _open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as err:
        raise DataError(f"{path} is not a readable zip archive ({err}); it may be truncated: "
                        f"delete it and download it again") from err


def open_tree(location: Path) -> SourceTree:
    """Find the dataset root (the folder holding ``wnids.txt``) in a zip or folder and list its files.

    The returned tree holds the zip open; ``close`` it when done. A folder may be the
    ``tiny-imagenet-200`` folder itself or its parent; in a zip the root is
    the shallowest folder holding ``wnids.txt``.

    Raises:
        DataError: ``location`` does not exist, is neither zip nor folder, is a broken zip, holds an
            entry that would land outside the dataset folder, or has no ``wnids.txt``.
    """
    location = Path(location).expanduser()
    if location.is_dir():
        for root in (location, location / "tiny-imagenet-200"):
            if (root / ROOT_MARKER).is_file():
                return SourceTree(root.resolve(), False, "", _walk_files(root))
        raise DataError(f"{location / ROOT_MARKER} does not exist; pass the extracted tiny-imagenet-200 "
                        f"folder (or its parent), the official zip, or its URL to --data")
    if not location.is_file():
        raise DataError(f"data source {location} does not exist; pass an existing zip or folder to --data, "
                        f"or leave --data out to download {DEFAULT_URL}")
    archive = _open_zip(location)
    names = archive.namelist()
    for name in names:
        if _unsafe_member(name):
            archive.close()
            raise DataError(f"{location} has entry {name!r}, which would land outside the dataset folder; "
                            f"refusing this archive, download the official one again")
    markers = [n for n in names if n.rpartition("/")[2] == ROOT_MARKER]
    if not markers:
        archive.close()
        raise DataError(f"{location} has no {ROOT_MARKER} (expected tiny-imagenet-200/{ROOT_MARKER}); "
                        f"pass the official tiny-imagenet-200.zip")
    prefix = min(markers, key=lambda n: n.count("/"))[: -len(ROOT_MARKER)]
    files = [n[len(prefix):] for n in names if n.startswith(prefix) and not n.endswith("/")]
    return SourceTree(location.resolve(), True, prefix, files, archive)


def _walk_files(root: Path) -> list[str]:
    files = []
    for folder, _, names in os.walk(root):
        relative = Path(folder).relative_to(root).as_posix()
        files.extend(name if relative == "." else f"{relative}/{name}" for name in names)
    return files


def natural_key(name: str) -> list:
    """Sort key putting val_2 before val_10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _is_image(name: str) -> bool:
    return name.lower().endswith(_IMAGE_SUFFIXES)


def _read_text(tree: SourceTree, files: set[str], name: str) -> str:
    if name not in files:
        raise DataError(f"{tree.describe(name)} does not exist; pass a complete tiny-imagenet-200 tree "
                        f"(the official zip or its extracted folder)")
    try:
        return tree.read(name).decode("utf-8")
    except (OSError, UnicodeDecodeError, zipfile.BadZipFile) as err:
        raise DataError(f"{tree.describe(name)} cannot be read ({err}); download the archive again") from err


@dataclass
class Layout:
    """The labelled images of a checked tree; classes are indexed in sorted wnid order.

    Attributes:
        wnids: class wnids, sorted; a label is an index into this list.
        names: human-readable class names from words.txt, in the same order.
        train_files: train images, grouped by class, in natural order within a class.
        train_labels: int64 label of each train image.
        test_files: the official val images in val_0, val_1, ... order.
        test_labels: int64 label of each, from val_annotations.txt.
    """

    wnids: list[str]
    names: list[str]
    train_files: list[str]
    train_labels: np.ndarray
    test_files: list[str]
    test_labels: np.ndarray


def read_layout(tree: SourceTree) -> Layout:
    """Check that wnids.txt, words.txt, train/<wnid>/images/ and the val annotations agree.

    Raises:
        DataError: naming the first file that is missing or disagrees, and how to fix it.
    """
    files = set(tree.files)
    wnids = _read_text(tree, files, "wnids.txt").split()
    if not wnids or len(set(wnids)) != len(wnids):
        raise DataError(f"{tree.describe('wnids.txt')} must list distinct wnids, one a line; "
                        f"use the file from the official archive")
    names = dict(line.split("\t", 1) for line in _read_text(tree, files, "words.txt").splitlines()
                 if "\t" in line)
    unnamed = [w for w in wnids if w not in names]
    if unnamed:
        raise DataError(f"{tree.describe('words.txt')} has no name for {unnamed[0]} (listed in wnids.txt); "
                        f"use the words.txt of the same archive")
    wnids = sorted(wnids)
    index = {wnid: i for i, wnid in enumerate(wnids)}

    train: dict[str, list[str]] = {}
    for name in files:
        parts = name.split("/")
        if len(parts) == 4 and parts[0] == "train" and parts[2] == "images" and _is_image(name):
            train.setdefault(parts[1], []).append(name)
    unlisted = sorted(set(train) - set(index))
    if unlisted:
        raise DataError(f"{tree.describe(f'train/{unlisted[0]}/')} is not listed in wnids.txt; "
                        f"use the wnids.txt of the same archive")
    for wnid in wnids:
        if wnid not in train:
            raise DataError(f"{tree.describe(f'train/{wnid}/images/')} has no images but {wnid} is in "
                            f"wnids.txt; pass a complete tiny-imagenet-200 tree")
    train_files = [name for wnid in wnids for name in sorted(train[wnid], key=natural_key)]
    train_labels = np.repeat(np.arange(len(wnids), dtype=np.int64), [len(train[wnid]) for wnid in wnids])

    val_images = {name for name in files if name.startswith("val/images/") and _is_image(name)}
    labelled: dict[str, int] = {}
    for number, line in enumerate(_read_text(tree, files, _ANNOTATIONS).splitlines(), 1):
        fields = line.split("\t")
        where = f"{tree.describe(_ANNOTATIONS)} line {number}"
        if not line.strip():
            continue
        if len(fields) < 2:
            raise DataError(f"{where} is {line!r}, expected file<TAB>wnid<TAB>box; use the official file")
        image, wnid = f"val/images/{fields[0]}", fields[1]
        if wnid not in index:
            raise DataError(f"{where} names wnid {wnid}, which is not in wnids.txt; "
                            f"use the annotations and wnids.txt of the same archive")
        if image not in val_images:
            raise DataError(f"{tree.describe(image)} does not exist but is listed in {where}; "
                            f"pass a complete tiny-imagenet-200 tree")
        if image in labelled:
            raise DataError(f"{where} repeats {fields[0]}; use the official annotations file")
        labelled[image] = index[wnid]
    unlabelled = sorted(val_images - labelled.keys(), key=natural_key)
    if unlabelled:
        raise DataError(f"{tree.describe(unlabelled[0])} has no line in {_ANNOTATIONS} "
                        f"({len(unlabelled)} such images); use the annotations of the same archive")
    test_files = sorted(labelled, key=natural_key)
    return Layout(wnids, [names[wnid].strip() for wnid in wnids], train_files, train_labels, test_files,
                  np.array([labelled[name] for name in test_files], dtype=np.int64))
