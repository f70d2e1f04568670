"""Top-k classes of image files under an exported bundle (``tinyopt predict``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tinyopt.core.errors import TinyoptError
from tinyopt.results.bundle import BUNDLE_FIX, CLASSES_FILE, MODEL_FILE, load_model_file, read_classes
from tinyopt.train import backend


@dataclass
class Prediction:
    """The ``top`` classes of one image, most probable first: ``(wnid, name, probability)``."""

    path: Path
    top: list[tuple[str, str, float]]

    def to_dict(self) -> dict[str, Any]:
        return {"image": str(self.path),
                "top": [{"wnid": wnid, "name": name, "probability": p} for wnid, name, p in self.top]}


def load_bundle(bundle_dir: str | Path) -> tuple[Any, list[tuple[int, str, str]]]:
    """The Keras model and the classes of a bundle written by ``tinyopt.results.bundle.write_bundle``.

    Raises:
        TinyoptError: the folder is not a bundle, or its model or classes cannot be loaded or do not fit
            each other (the model must take ``(H, W, 3)`` images and give one probability per class).
    """
    bundle = Path(bundle_dir)
    model_path, classes_path = bundle / MODEL_FILE, bundle / CLASSES_FILE
    if not model_path.exists():
        raise TinyoptError(f"{bundle} is not a model bundle (no {MODEL_FILE}); "
                           "export one with `tinyopt best --export DIR`")
    classes = read_classes(classes_path)  # before Keras starts: a damaged file is found in a second

    backend.load()
    model = load_model_file(model_path)
    inputs, outputs = _shapes(model, "inputs"), _shapes(model, "outputs")
    if len(inputs) != 1 or len(inputs[0]) != 4 or inputs[0][3] != 3 or None in inputs[0][1:3]:
        raise TinyoptError(f"{model_path} takes inputs of shape {_shapes_text(inputs)}, not (H, W, 3) images; "
                           f"{BUNDLE_FIX}")
    if len(outputs) != 1 or len(outputs[0]) != 2 or outputs[0][1] != len(classes):
        raise TinyoptError(f"{model_path} gives outputs of shape {_shapes_text(outputs)} but {classes_path} lists "
                           f"{len(classes)} classes, one per output column; {BUNDLE_FIX}")
    return model, classes


def _shapes(model: Any, side: str) -> list[tuple[int | None, ...]]:
    # A model that was never called has no inputs or outputs: Keras raises rather than give none.
    try:
        return [tuple(tensor.shape) for tensor in getattr(model, side)]
    except (AttributeError, TypeError, ValueError):
        return []


def _shapes_text(shapes: list[tuple[int | None, ...]]) -> str:
    return " and ".join(map(str, shapes)) or "none"


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
