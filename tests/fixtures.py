"""Generated Tiny ImageNet look-alikes in the official layout, for fast tests.

Each class gets its own colour and stripe orientation under noise, so a small CNN learns it
above chance in a couple of epochs, while the files exercise the same code paths as the real
archive: wnids.txt, words.txt, train/<wnid>/images, val/val_annotations.txt, test/images, and a
grayscale and a CMYK JPEG among the RGB ones.
"""

from __future__ import annotations

import dataclasses
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

# Real Tiny ImageNet wnids (all in tinyopt/imagenet1k_wnids.txt), deliberately not in sorted order,
# as in the official wnids.txt: class indices follow sorted wnids, not file order.
FIXTURE_WNIDS = ("n09246464", "n01443537", "n07873807", "n02124075", "n04067472")
FIXTURE_NAMES = {
    "n01443537": "goldfish, Carassius auratus",
    "n02124075": "Egyptian cat",
    "n04067472": "reel",
    "n07873807": "pizza, pizza pie",
    "n09246464": "cliff, drop, drop-off",
}
# words.txt covers ~82k synsets, most of them not Tiny ImageNet classes.
_OTHER_WORDS = {"n00001740": "entity", "n00001930": "physical entity", "n02084071": "dog, domestic dog"}
IMAGE_SIZE = 64
ROOT_NAME = "tiny-imagenet-200"


def class_image(class_pos: int, n_classes: int, rng: np.random.Generator) -> np.ndarray:
    """A noisy 64x64 RGB image whose colour and stripe angle identify its class."""
    hue = class_pos / n_classes
    base = 255 * np.array([0.5 + 0.5 * np.cos(2 * np.pi * (hue + k / 3)) for k in range(3)])
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE]
    angle = np.pi * class_pos / n_classes
    stripes = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 0.5 + rng.uniform(0, 2 * np.pi))
    image = base * (0.75 + 0.25 * stripes[..., None]) + rng.normal(0, 18, (IMAGE_SIZE, IMAGE_SIZE, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def _save_jpeg(pixels: np.ndarray, path: Path, mode: str = "RGB") -> None:
    image = Image.fromarray(pixels)
    if mode != "RGB":
        image = image.convert(mode)
    image.save(path, format="JPEG", quality=92)


def make_tiny_imagenet(root: Path, *, wnids: tuple[str, ...] | list[str] = FIXTURE_WNIDS,
                       train_per_class: int = 30, val_per_class: int = 6, test_images: int = 3,
                       grayscale: int = 1, cmyk: int = 1, seed: int = 0) -> Path:
    """Write a small dataset in the layout of the official ``tiny-imagenet-200.zip``.

    Args:
        root: folder to write into; ``root/tiny-imagenet-200`` is created.
        wnids: class wnids, written to wnids.txt in this order.
        train_per_class: images per class in ``train/<wnid>/images``.
        val_per_class: images per class in ``val/images``, interleaved in a seeded random order.
        test_images: unlabelled images in ``test/images``.
        grayscale: how many train images (image 0 of the first classes) are saved as grayscale JPEGs.
        cmyk: how many train images (image 1 of the first classes) are saved as CMYK JPEGs.
        seed: seed of the pixel noise and of the val order.

    Returns:
        The ``tiny-imagenet-200`` folder.
    """
    rng = np.random.default_rng(seed)
    top = Path(root) / ROOT_NAME
    top.mkdir(parents=True, exist_ok=True)
    (top / "wnids.txt").write_text("".join(f"{w}\n" for w in wnids))
    words = {**_OTHER_WORDS, **{w: FIXTURE_NAMES.get(w, f"synset {w}") for w in wnids}}
    (top / "words.txt").write_text("".join(f"{w}\t{name}\n" for w, name in sorted(words.items())))
    for pos, wnid in enumerate(wnids):
        images = top / "train" / wnid / "images"
        images.mkdir(parents=True, exist_ok=True)
        boxes = []
        for i in range(train_per_class):
            mode = "L" if i == 0 and pos < grayscale else "CMYK" if i == 1 and pos < cmyk else "RGB"
            _save_jpeg(class_image(pos, len(wnids), rng), images / f"{wnid}_{i}.JPEG", mode)
            boxes.append(f"{wnid}_{i}.JPEG\t0\t0\t63\t63\n")
        (top / "train" / wnid / f"{wnid}_boxes.txt").write_text("".join(boxes))
    val_images = top / "val" / "images"
    val_images.mkdir(parents=True, exist_ok=True)
    val_classes = rng.permutation(np.repeat(np.arange(len(wnids)), val_per_class))
    lines = []
    for i, pos in enumerate(val_classes):
        _save_jpeg(class_image(int(pos), len(wnids), rng), val_images / f"val_{i}.JPEG")
        lines.append(f"val_{i}.JPEG\t{wnids[pos]}\t0\t0\t63\t63\n")
    (top / "val" / "val_annotations.txt").write_text("".join(lines))
    test_dir = top / "test" / "images"
    test_dir.mkdir(parents=True, exist_ok=True)
    for i in range(test_images):
        _save_jpeg(class_image(i % len(wnids), len(wnids), rng), test_dir / f"test_{i}.JPEG")
    return top


def zip_folder(folder: Path, zip_path: Path, *, extra: dict[str, bytes] | None = None,
               skip: tuple[str, ...] = ()) -> Path:
    """Zip a ``tiny-imagenet-200`` folder the way the official archive is laid out.

    Args:
        folder: the ``tiny-imagenet-200`` folder.
        zip_path: the archive to write.
        extra: additional raw entries (name -> bytes), e.g. a hostile ``../evil`` entry.
        skip: entry names (relative to the archive root, e.g. ``tiny-imagenet-200/wnids.txt``) to leave out.

    Returns:
        ``zip_path``.
    """
    folder = Path(folder)
    with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_STORED) as archive:
        for path in sorted(folder.rglob("*")):
            name = f"{folder.name}/{path.relative_to(folder).as_posix()}"
            if path.is_file() and name not in skip:
                archive.write(path, name)
        for name, payload in (extra or {}).items():
            archive.writestr(name, payload)
    return Path(zip_path)


def model_config(approach: str = "finetune", **values):
    """The ``[model]`` section of ``approach``'s defaults (``sweeps/<approach>.toml``) with ``values`` changed."""
    from tinyopt.core.config import load_config

    return dataclasses.replace(load_config(approach).model, **values)
