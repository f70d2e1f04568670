"""Top-k classes of image files under an exported bundle (``tinyopt predict``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tinyopt.errors import TinyoptError
from tinyopt.export import CLASSES_FILE, MODEL_FILE, read_classes


@dataclass
class Prediction:
    """The ``top`` classes of one image, most probable first: ``(wnid, name, probability)``."""

    path: Path
    top: list[tuple[str, str, float]]

    def to_dict(self) -> dict[str, Any]:
        return {"image": str(self.path),
                "top": [{"wnid": wnid, "name": name, "probability": p} for wnid, name, p in self.top]}


def load_bundle(bundle_dir: str | Path) -> tuple[Any, list[tuple[int, str, str]]]:
    """The Keras model and the classes of a bundle written by ``tinyopt.export.write_bundle``.

    Raises:
        TinyoptError: the folder is not a bundle.
    """
    bundle = Path(bundle_dir)
    if not (bundle / MODEL_FILE).is_file():
        raise TinyoptError(f"{bundle} is not a model bundle (no {MODEL_FILE}); "
                           "export one with `tinyopt best --export DIR`")
    from tinyopt import backend

    backend.load()
    import keras

    return keras.models.load_model(bundle / MODEL_FILE, compile=False), read_classes(bundle / CLASSES_FILE)


def read_image(path: Path, size: tuple[int, int]) -> np.ndarray:
    """An image file as uint8 RGB ``(height, width, 3)``; other sizes resized bilinearly.

    Raises:
        TinyoptError: the file is not an image PIL can read.
    """
    from PIL import Image, UnidentifiedImageError

    height, width = size
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise TinyoptError(f"cannot read image {path} ({err}); pass a JPEG or PNG file") from err
    if rgb.size != (width, height):
        rgb = rgb.resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8)


def predict_images(bundle_dir: str | Path, image_paths: Sequence[str | Path], top: int = 5) -> list[Prediction]:
    """Classify image files with a bundle's model.

    Args:
        bundle_dir: a folder written by ``tinyopt best --export``.
        image_paths: image files of any size and mode; converted to RGB and resized to the model's input.
        top: how many classes to return per image.

    Returns:
        One ``Prediction`` per image, in the given order.

    Raises:
        TinyoptError: a missing bundle or unreadable image.
    """
    paths = [Path(p) for p in image_paths]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise TinyoptError(f"image file(s) not found: {', '.join(missing)}")
    model, classes = load_bundle(bundle_dir)
    size = tuple(model.inputs[0].shape[1:3])
    batch = np.stack([read_image(path, size) for path in paths])
    probs = np.asarray(model.predict(batch, verbose=0))
    results = []
    for path, row in zip(paths, probs, strict=True):
        best = np.argsort(row)[::-1][:top]
        results.append(Prediction(path, [(classes[i][1], classes[i][2], float(row[i])) for i in best]))
    return results
