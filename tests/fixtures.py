"""Generated Tiny ImageNet look-alikes in the official layout, for fast tests.

Each class gets its own colour and stripe orientation under noise, so a small CNN learns it
above chance in a couple of epochs, while the files exercise the same code paths as the real
archive: wnids.txt, words.txt, train/<wnid>/images, val/val_annotations.txt, test/images, and a
grayscale and a CMYK JPEG among the RGB ones.

Below them, the helpers that test files of several folders share: small model configs, random images
and default params for the approaches' models, damage done to a prepared cache, a dead process, and
synthetic ensemble members.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
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


def small_mobilenet(**values):
    """The ``[model]`` section of a MobileNet (alpha 0.25, 128 px weights), random weights unless ``values`` say.

    It builds in a fraction of a second, where ResNet50 takes seconds.
    """
    return model_config(**{"backbone": "mobilenet", "alpha": 0.25, "weights_resolution": 128, "weights": "none",
                           **values})


def random_images(n: int = 4, seed: int = 0) -> np.ndarray:
    """``n`` uint8 images of the dataset's size, random pixels."""
    return np.random.default_rng(seed).integers(0, 256, (n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)


def default_params(approach: str, **override) -> dict:
    """The defaults of ``approach``'s search space (``tinyopt.core.space.defaults``) with ``override`` changed."""
    from tinyopt.core import config, space

    params = space.defaults(config.load_config(approach).space)
    params.update(override)
    return params


def check_probabilities(model, *, sums_to_one: bool = True) -> np.ndarray:
    """A model's output on ``random_images()``: float32 probabilities of the fixture's classes (rows sum to 1,
    or at most 1 for the columns of a wider softmax)."""
    probs = model.predict(random_images(), verbose=0)
    assert probs.shape == (4, len(FIXTURE_WNIDS)) and probs.dtype == np.float32
    assert np.all(probs >= 0)
    sums = probs.sum(axis=1)
    if sums_to_one:
        np.testing.assert_allclose(sums, 1.0, atol=1e-5)
    else:
        assert np.all(sums <= 1.0 + 1e-5)
    return probs


def dead_pid() -> int:
    """The pid of a process that has ended (until the kernel reuses it)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def copy_cache(cache: Path, tmp_path: Path) -> Path:
    """A copy of a prepared cache (``tiny_cache`` is read-only for tests) at ``tmp_path / "cache"``."""
    return Path(shutil.copytree(cache, tmp_path / "cache"))


def edit_meta(prepared: Path, **changes) -> None:
    """Set keys of a prepared cache's meta.json (a None value removes the key)."""
    meta = json.loads((prepared / "meta.json").read_text())
    (prepared / "meta.json").write_text(json.dumps({key: value for key, value in (meta | changes).items()
                                                    if value is not None}))


def flip_last_byte(path: Path) -> None:
    payload = bytearray(path.read_bytes())
    payload[-1] ^= 0xFF
    path.write_bytes(bytes(payload))


MEMBER_CLASSES = 10  # classes of the synthetic ensemble members below


def _member_probs(labels: np.ndarray, accuracy: float, sharpness: float, seed: int) -> np.ndarray:
    """Probabilities that put their peak on the true label for about ``accuracy`` of the samples."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(len(labels), MEMBER_CLASSES))
    right = rng.random(len(labels)) < accuracy
    peak = np.where(right, labels, rng.integers(0, MEMBER_CLASSES, len(labels)))
    logits[np.arange(len(labels)), peak] += 3.0
    exp = np.exp(sharpness * (logits - logits.max(axis=1, keepdims=True)))
    return (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)


def member_predictions(accuracy: float, sharpness: float, seed: int, n: int = 300) -> dict[str, np.ndarray]:
    """What an approach trial logs (``predictions.npz``): selection and test probabilities and labels."""
    labels = {split: np.arange(n, dtype=np.int64) % MEMBER_CLASSES for split in ("selection", "test")}
    return {
        "selection_probs": _member_probs(labels["selection"], accuracy, sharpness, seed),
        "selection_labels": labels["selection"],
        "test_probs": _member_probs(labels["test"], accuracy, sharpness, seed + 100),
        "test_labels": labels["test"],
    }


def drawn_logits(n: int, seed: int, scale: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """True logits ``(n, MEMBER_CLASSES)`` and labels drawn from their softmax: ``softmax(logits)`` is calibrated."""
    from scipy.special import softmax

    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=scale, size=(n, MEMBER_CLASSES))
    labels = (rng.random(n)[:, None] < softmax(logits, axis=1).cumsum(axis=1)).argmax(axis=1)
    return logits, labels


def flat_member(n: int, seed: int) -> np.ndarray:
    """A chance-level member: near-uniform probabilities whose top class is noise."""
    probs = 1 / MEMBER_CLASSES + np.random.default_rng(seed).normal(scale=1e-4, size=(n, MEMBER_CLASSES))
    return probs / probs.sum(axis=1, keepdims=True)
