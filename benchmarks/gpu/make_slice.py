"""Write a small, deterministic slice of Tiny ImageNet in the layout of the official zip.

The slice is what ``run.sh`` sweeps on: small enough to carry to an offline GPU machine (200 classes
x 25 train + 4 val images is about 11.6 MB), read by tinyopt through the same code path as the real
archive. The source is read and checked with tinyopt's own reader (``tinyopt.data.fetch``), so a slice
always holds what ``tinyopt data prepare`` needs:

    tiny-imagenet-200/wnids.txt, words.txt (only the kept classes' lines)
    tiny-imagenet-200/train/<wnid>/images/*.JPEG and <wnid>_boxes.txt (the kept images' lines)
    tiny-imagenet-200/val/images/*.JPEG and val/val_annotations.txt

Images are copied byte for byte; the unlabelled test images are left out (nothing reads them).

    python benchmarks/gpu/make_slice.py [--source ZIP|FOLDER|URL] [--out ZIP] [--classes 200]
        [--train-per-class 25] [--val-per-class 4]
"""

from __future__ import annotations

import argparse
import tempfile
import zipfile
from collections import defaultdict
from pathlib import Path

from tinyopt.data import fetch

REPO = Path(__file__).resolve().parents[2]
DEV_ZIP = REPO.parent / "shared" / "data" / "tiny-imagenet-200-dev.zip"
ROOT = "tiny-imagenet-200/"
# A fixed timestamp for every member: the same source and options give the same bytes.
_EPOCH = (1980, 1, 1, 0, 0, 0)


def default_source() -> str:
    """The dev zip beside the repository when it is there, else the official archive's URL."""
    return str(DEV_ZIP) if DEV_ZIP.is_file() else fetch.DEFAULT_URL


def _open(source: str, download_dir: Path) -> fetch.SourceTree:
    if fetch.is_url(source):
        source = fetch.download(source, download_dir / "tiny-imagenet-200.zip",
                                md5=fetch.OFFICIAL_MD5 if source == fetch.DEFAULT_URL else None)
    return fetch.open_tree(Path(source))


def _lines_for(text: str, keep: set[str]) -> str:
    """The lines of a tab-separated file whose first field is in ``keep``, in their order."""
    return "".join(line for line in text.splitlines(keepends=True) if line.split("\t", 1)[0] in keep)


def _per_class(files: list[str], labels, count: int) -> list[tuple[str, int]]:
    """The first ``count`` files of each label, keeping the (natural) order of ``files``."""
    taken: dict[int, int] = defaultdict(int)
    kept = []
    for name, label in zip(files, labels.tolist(), strict=True):
        if taken[label] < count:
            taken[label] += 1
            kept.append((name, label))
    return kept


def make_slice(tree: fetch.SourceTree, out: Path, *, classes: int, train_per_class: int,
               val_per_class: int) -> dict[str, int]:
    """Write the slice of ``tree`` to ``out``; return its counts (classes, train, val, bytes)."""
    layout = fetch.read_layout(tree)
    wnids = layout.wnids[:classes]  # sorted wnids: the first N are the same N on every machine
    train = [(n, lab) for n, lab in _per_class(layout.train_files, layout.train_labels, train_per_class)
             if lab < len(wnids)]
    val = [(n, lab) for n, lab in _per_class(layout.test_files, layout.test_labels, val_per_class)
           if lab < len(wnids)]
    if not train or not val:
        raise SystemExit(f"{tree.describe()} gave no train or val image for these options")
    kept_val = {name.rpartition("/")[2] for name, _ in val}
    texts = {
        "wnids.txt": "".join(f"{wnid}\n" for wnid in wnids),
        "words.txt": _lines_for(tree.read("words.txt").decode(), set(wnids)),
        "val/val_annotations.txt": _lines_for(tree.read("val/val_annotations.txt").decode(), kept_val),
    }
    by_class: dict[str, list[str]] = defaultdict(list)
    for name, label in train:
        by_class[wnids[label]].append(name)
    present = set(tree.files)
    for wnid, names in by_class.items():
        boxes = f"train/{wnid}/{wnid}_boxes.txt"
        if boxes in present:
            texts[boxes] = _lines_for(tree.read(boxes).decode(), {n.rpartition("/")[2] for n in names})

    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".part")
    with zipfile.ZipFile(partial, "w") as archive:
        for name, text in texts.items():
            _write(archive, name, text.encode())
        for name, _ in train + val:
            _write(archive, name, tree.read(name))
    partial.replace(out)
    return {"classes": len(wnids), "train": len(train), "val": len(val), "bytes": out.stat().st_size}


def _write(archive: zipfile.ZipFile, name: str, payload: bytes) -> None:
    info = zipfile.ZipInfo(ROOT + name, date_time=_EPOCH)
    # Deflate even the JPEGs: their headers and tables shrink by about 7%, which keeps the slice small to carry.
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = 0o644 << 16
    archive.writestr(info, payload)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default=default_source(),
                        help="Tiny ImageNet zip, extracted folder or URL (default: the dev zip in ../shared/data "
                             "when present, else the official URL, downloaded once into --out's folder)")
    parser.add_argument("--out", type=Path, default=REPO / ".gpucheck" / "tiny-imagenet-slice.zip")
    parser.add_argument("--classes", type=int, default=200, help="keep the first N classes (sorted wnids)")
    parser.add_argument("--train-per-class", type=int, default=25)
    parser.add_argument("--val-per-class", type=int, default=4)
    args = parser.parse_args(argv)
    if min(args.classes, args.train_per_class, args.val_per_class) < 1:
        parser.error("--classes, --train-per-class and --val-per-class must be at least 1")
    with tempfile.TemporaryDirectory() as scratch:
        download_dir = args.out.parent if fetch.is_url(args.source) else Path(scratch)
        tree = _open(args.source, download_dir)
        try:
            counts = make_slice(tree, args.out, classes=args.classes, train_per_class=args.train_per_class,
                                val_per_class=args.val_per_class)
        finally:
            tree.close()
    print(f"{args.out}: {counts['classes']} classes, {counts['train']} train and {counts['val']} val images, "
          f"{counts['bytes'] / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
