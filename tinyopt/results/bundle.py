"""Self-contained model bundles: a folder a person can ship, loadable without tinyopt.

A bundle holds ``model.keras`` (raw uint8 images in, class probabilities out, preprocessing
inside), ``classes.tsv`` (index, wnid, name in output order), ``params.json``, ``metrics.json``,
``provenance.json`` (where it came from, and the Keras version and backend that wrote it) and
``MODEL.md``. ``model.keras`` holds no backend-specific code: it loads on TensorFlow or JAX alike.
This module writes and reads the folder; ``export`` (a study's best trial or ensemble) and ``refit``
say what goes in it. Keras is imported inside the functions that need it.
"""

from __future__ import annotations

import csv
import json
import secrets
import shutil
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tinyopt.core import record
from tinyopt.core.damage import damage_message
from tinyopt.core.errors import TinyoptError
from tinyopt.core.urls import first_line
from tinyopt.train import backend

MODEL_FILE = "model.keras"
CLASSES_FILE = record.CLASSES_FILE
PARAMS_FILE = "params.json"
METRICS_FILE = "metrics.json"
README_FILE = "MODEL.md"
PROVENANCE_FILE = "provenance.json"
BUNDLE_FILES = (MODEL_FILE, CLASSES_FILE, PARAMS_FILE, METRICS_FILE, README_FILE, PROVENANCE_FILE)
# What makes a folder a bundle tinyopt wrote, which --force may delete: model.keras makes it a model, and
# provenance.json, which no other tool writes, says tinyopt wrote it (a folder holding a person's own Keras model
# has the one, not the other). The other files may be missing: a bundle someone damaged is replaced by --force,
# which is the fix `tinyopt predict` gives for it.
_BUNDLE_MARKS = (MODEL_FILE, PROVENANCE_FILE)
BUNDLE_FIX = "export the bundle again with `tinyopt best --export DIR --force`, or restore it from a copy"


def read_classes(path: Path, *, label: str | None = None, fix: str = BUNDLE_FIX) -> list[tuple[int, str, str]]:
    """Read a ``classes.tsv``: ``(index, wnid, name)`` rows, header line optional, in index order.

    Args:
        path: the file.
        label: how errors name it (default: its path).
        fix: how errors say to repair it (default: a bundle's fix).

    Raises:
        TinyoptError: the file is missing, is not UTF-8 text, or its rows are not
            ``index<TAB>wnid<TAB>name`` with indices 0..C-1.
    """
    label = label or str(path)
    if not path.is_file():
        raise TinyoptError(f"{label} is {'a folder, not a file' if path.is_dir() else 'missing'}; {fix}")
    try:
        with path.open(newline="", encoding="utf-8") as source:
            rows = [row for row in csv.reader(source, delimiter="\t") if row]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise TinyoptError(f"{label} is damaged: it is not UTF-8 text ({first_line(err)}); {fix}") from err
    if rows and tuple(rows[0]) == record.CLASSES_COLUMNS:
        rows = rows[1:]
    try:
        classes = [(int(index), wnid, name) for index, wnid, name in rows]
    except ValueError as err:
        raise TinyoptError(f"{label} is damaged: not index<TAB>wnid<TAB>name rows ({err}); {fix}") from err
    if not classes:
        raise TinyoptError(f"{label} is damaged: it lists no classes; {fix}")
    if [c[0] for c in classes] != list(range(len(classes))):
        raise TinyoptError(f"{label} is damaged: it must list class indices 0..{len(classes) - 1} in order; {fix}")
    return classes


def load_model_file(path: Path, *, label: str | None = None, fix: str = BUNDLE_FIX) -> Any:
    """Load a ``.keras`` file, uncompiled, any failure one line naming it.

    Args:
        path: the file.
        label: how errors name it (default: its path).
        fix: how errors say to repair it (default: a bundle's fix).

    Raises:
        TinyoptError: Keras cannot load the file (truncated, empty, garbage, a folder, a zip that is not a model).
    """
    import keras

    try:
        return keras.models.load_model(path, compile=False)
    except Exception as err:  # noqa: BLE001 - a damaged file raises BadZipFile, ValueError, OSError, KeyError...
        raise TinyoptError(damage_message(label or str(path), path, err, fix)) from err



def write_bundle(dst: str | Path, *, model: Any, classes: Sequence[Sequence[Any]], params: Mapping[str, Any],
                 metrics: Mapping[str, float], description: Mapping[str, Any], overwrite: bool = False) -> Path:
    """Write a model bundle to ``dst``, all or nothing.

    The files are written to a temporary folder beside ``dst`` and renamed into place, so a
    failure leaves no half bundle and an existing bundle is only replaced when asked to. A new
    bundle folder gets the mode ``mkdir`` gives (the umask's); a replaced one keeps its mode.

    Args:
        dst: the bundle folder; must not exist, or be empty, or (with ``overwrite``) hold a bundle.
        model: a Keras model taking uint8 ``(H, W, 3)`` images and giving ``len(classes)`` probabilities.
        classes: ``(index, wnid, name)`` per output column, in index order.
        params: the hyperparameters of the trial that produced the model.
        metrics: its scores, e.g. ``selection_top1``, ``test_top1``.
        description: ``title``, ``what`` (what the model is) and ``how_chosen`` for MODEL.md, and
            optionally ``provenance`` (a mapping, e.g. study, trial, MLflow run id), to which the
            Keras version and backend of this export are added.
        overwrite: replace an earlier bundle in ``dst``.

    Returns:
        The bundle folder.

    Raises:
        TinyoptError: ``dst`` is a file, holds anything but a bundle, or holds a bundle without
            ``overwrite``; or the model's output does not match the classes.
    """
    dst = Path(dst).resolve()  # "." has no name and no parent to stage beside
    _check_destination(dst, overwrite)
    n_outputs = model.outputs[0].shape[-1]
    if n_outputs != len(classes):
        raise TinyoptError(f"the model outputs {n_outputs} probabilities but {len(classes)} classes were given")
    import keras

    from tinyopt.models.blocks import plain_keras

    provenance = {**(description.get("provenance") or {}), "Keras": keras.__version__,
                  "Keras backend of the export": backend.name()}
    description = {**description, "provenance": provenance}
    dst.parent.mkdir(parents=True, exist_ok=True)
    # mkdir, not tempfile.mkdtemp: the staging folder becomes the bundle, and mkdtemp's mode 700 would lock
    # others out of it. The random name keeps two exports to the same folder apart.
    staging = dst.with_name(f".{dst.name}.partial-{secrets.token_hex(8)}")
    staging.mkdir()
    try:
        plain_keras(model).save(staging / MODEL_FILE)  # loads without tinyopt
        (staging / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
        (staging / CLASSES_FILE).write_text(record.classes_tsv(classes))
        (staging / PARAMS_FILE).write_text(json.dumps(dict(params), indent=2, sort_keys=True) + "\n")
        (staging / METRICS_FILE).write_text(json.dumps(dict(metrics), indent=2, sort_keys=True) + "\n")
        (staging / README_FILE).write_text(_model_md(model, classes, params, metrics, description))
        _move_into_place(staging, dst, overwrite)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dst


def check_destination(dst: str | Path, overwrite: bool = False) -> None:
    """Check, before the work that makes a bundle, that ``write_bundle`` may write it to ``dst``.

    Raises:
        TinyoptError: ``dst`` is a file, holds anything but a bundle, or holds a bundle without ``overwrite``.
    """
    _check_destination(Path(dst).resolve(), overwrite)


def _check_destination(dst: Path, overwrite: bool) -> None:
    if dst.exists() and not dst.is_dir():
        raise TinyoptError(f"{dst} is a file; pass a folder for the bundle")
    if not dst.is_dir() or not any(dst.iterdir()):
        return
    foreign, missing = _not_bundle_entries(dst)
    if foreign or missing:
        what = (f"holds {', '.join(foreign)}, which no bundle holds" if foreign
                else f"has no {' or '.join(missing)}, so it is not a bundle tinyopt wrote")
        # --force would not help: it only ever deletes what tinyopt wrote.
        raise TinyoptError(f"{dst} {what}; choose a new or empty folder, or move those files out of it "
                           "(pass --force only to replace an earlier bundle)")
    if not overwrite:
        raise TinyoptError(f"{dst} already holds a bundle; pass --force to replace it or choose another folder")


def _not_bundle_entries(folder: Path) -> tuple[list[str], list[str]]:
    """The entries of a folder that are not a bundle's (folders end in "/"), and the bundle marks it lacks."""
    foreign, found = [], set()
    for entry in sorted(folder.iterdir()):
        # A folder or a link under a bundle file's name is not what write_bundle wrote either.
        if entry.name in BUNDLE_FILES and entry.is_file() and not entry.is_symlink():
            found.add(entry.name)
        else:
            foreign.append(entry.name + ("/" if entry.is_dir() and not entry.is_symlink() else ""))
    return foreign, [name for name in _BUNDLE_MARKS if name not in found]


def _move_into_place(staging: Path, dst: Path, overwrite: bool) -> None:
    # Checked again because another process may have written dst while the model was saving.
    _check_destination(dst, overwrite)
    if dst.is_dir():
        # The bundle takes the folder's place, so it keeps the folder's mode (staging has the umask's).
        staging.chmod(stat.S_IMODE(dst.stat().st_mode))
        if not any(dst.iterdir()):
            dst.rmdir()
    if not dst.exists():
        staging.rename(dst)
        return
    # Move the old bundle aside first so that dst is never a mix of old and new files.
    old = staging.with_name(f"{staging.name}.old")
    dst.rename(old)
    try:
        staging.rename(dst)
    except OSError:
        old.rename(dst)
        raise
    shutil.rmtree(old)


def _model_md(model: Any, classes: Sequence[Sequence[Any]], params: Mapping[str, Any],
              metrics: Mapping[str, float], description: Mapping[str, Any]) -> str:
    height, width, _ = model.inputs[0].shape[1:]
    lines = [f"# {description['title']}", "", description["what"], "",
             "## How it was chosen", "", description["how_chosen"], ""]
    provenance = description.get("provenance") or {}
    lines += [f"- {key}: {value}" for key, value in provenance.items()]
    lines += ["", "## Scores", "", "| metric | value |", "| --- | --- |"]
    lines += [f"| {key} | {value:.4f} |" for key, value in metrics.items()]
    lines += ["", "Selection scores chose the model; test scores (the official validation set) were only "
              "reported.", "", "## Parameters", "", "```json", json.dumps(dict(params), indent=2, sort_keys=True),
              "```"]
    lines += [
        "", "## How to load it", "",
        f"`{MODEL_FILE}` takes raw uint8 RGB images of {height}x{width} pixels (its preprocessing is inside) "
        f"and returns {len(classes)} probabilities, column i being class i of `{CLASSES_FILE}` "
        "(index, wnid, name). It needs Keras 3, not tinyopt:", "",
        "```python",
        "import keras, numpy as np",
        "from PIL import Image",
        "",
        f'model = keras.models.load_model("{MODEL_FILE}")',
        f'image = Image.open("photo.jpg").convert("RGB").resize(({width}, {height}), Image.BILINEAR)',
        'probs = model.predict(np.asarray(image, dtype="uint8")[None])[0]',
        "```", "",
        "With tinyopt installed: `tinyopt predict THIS_FOLDER photo.jpg`.", "",
    ]
    return "\n".join(lines)


WHAT = {
    "pretrained": "An ImageNet-pretrained backbone used as-is on Tiny ImageNet, without training; its "
                  "searched settings are the input resize method and size, test-time flip and the class mapping.",
    "finetune": "An ImageNet-pretrained backbone fine-tuned on the Tiny ImageNet training split.",
    "scratch": "A convolutional network trained from scratch on the Tiny ImageNet training split.",
}


