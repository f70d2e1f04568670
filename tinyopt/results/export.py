"""Self-contained model bundles: a folder a person can ship, loadable without tinyopt.

A bundle holds ``model.keras`` (raw uint8 images in, class probabilities out, preprocessing
inside), ``classes.tsv`` (index, wnid, name in output order), ``params.json``, ``metrics.json``,
``provenance.json`` (where it came from, and the Keras version and backend that wrote it) and
``MODEL.md``. ``model.keras`` holds no backend-specific code: it loads on TensorFlow or JAX alike.
Keras is imported inside the functions that need it.
"""

from __future__ import annotations

import csv
import json
import secrets
import shutil
import stat
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tinyopt.core import record
from tinyopt.core.damage import MLFLOW_FIX, damage_message
from tinyopt.core.errors import StudyError, TinyoptError
from tinyopt.core.urls import first_line, redact

if TYPE_CHECKING:
    from tinyopt.results.refit import Refit
    from tinyopt.results.report import StudySummary

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


def ensemble_model(member_models: Sequence[Any], weights: Sequence[float],
                   temperatures: Sequence[float | None] | None = None) -> Any:
    """One Keras model computing the weighted soft vote of its (calibrated) members.

    A member with a temperature ``T`` votes with ``softmax(log(p) / T)``, ``p`` floored at
    ``tinyopt.objectives.voting.PROBABILITY_FLOOR``, as ``tinyopt.objectives.voting.calibrate`` computes it; one
    without (None: an ensemble trial recorded before calibration) votes with ``p``. Each vote is
    scaled by its normalised weight (a ``Rescaling`` layer) and summed (``Add``). Built-in layers and
    ``keras.ops`` only, in float32 (so that a mixed-precision policy cannot round the probabilities
    to float16): the saved model loads without tinyopt. Members with weight 0 are left out. The
    members are renamed ``member_<i>`` so their names are unique.

    Args:
        member_models: Keras models taking the same uint8 image input and giving the same classes.
        weights: one non-negative weight per member; normalised to sum 1.
        temperatures: one temperature (or None) per member; None: no member is calibrated.

    Raises:
        TinyoptError: the members disagree on their input or output shape.
    """
    import keras

    from tinyopt.objectives.voting import PROBABILITY_FLOOR, normalise_weights

    temperatures = [None] * len(member_models) if temperatures is None else list(temperatures)
    if not len(member_models) == len(weights) == len(temperatures):
        raise ValueError(f"{len(member_models)} member models but {len(weights)} weights "
                         f"and {len(temperatures)} temperatures")
    shapes = {(tuple(m.inputs[0].shape[1:]), tuple(m.outputs[0].shape[1:])) for m in member_models}
    if len(shapes) != 1:
        raise TinyoptError(f"ensemble members disagree on input/output shapes {sorted(shapes)}; "
                           "they must be trained on the same images and classes")
    (input_shape, _), = shapes
    image = keras.Input(input_shape, dtype="uint8", name="image")
    votes = []
    for i, (model, weight, temperature) in enumerate(zip(member_models, normalise_weights(weights), temperatures,
                                                         strict=True)):
        if weight == 0:
            continue
        model.name = f"member_{i}"
        probs = keras.ops.cast(model(image), "float32")
        if temperature is not None:
            probs = keras.ops.softmax(keras.ops.log(keras.ops.maximum(probs, PROBABILITY_FLOOR)) / float(temperature))
        votes.append(keras.layers.Rescaling(float(weight), dtype="float32", name=f"weight_{i}")(probs))
    output = votes[0] if len(votes) == 1 else keras.layers.Add(dtype="float32", name="soft_vote")(votes)
    return keras.Model(image, output, name="soft_vote_ensemble")


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
    from tinyopt.train import backend

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


_WHAT = {
    "pretrained": "An ImageNet-pretrained backbone used as-is on Tiny ImageNet, without training; its "
                  "searched settings are the input resize method and size, test-time flip and the class mapping.",
    "finetune": "An ImageNet-pretrained backbone fine-tuned on the Tiny ImageNet training split.",
    "scratch": "A convolutional network trained from scratch on the Tiny ImageNet training split.",
}


def export_best(summary: StudySummary, dst: str | Path, *, storage_url: str, tracking_uri: str,
                overwrite: bool = False) -> Path:
    """Write the bundle of a study's best trial from the model(s) its MLflow run(s) kept.

    For an ensemble study, the kept models of the members with a weight above 0 are combined by
    ``ensemble_model`` with the best trial's weights and temperatures. Nothing is retrained.

    Args:
        summary: the study (``tinyopt.results.report.summarize_studies``).
        dst: the bundle folder (see ``write_bundle``).
        storage_url: the Optuna storage (read for ensemble members' params).
        tracking_uri: the MLflow store holding the runs.
        overwrite: replace a non-empty ``dst``.

    Raises:
        StudyError: no complete trial, or a model that was not kept.
    """
    from tinyopt.objectives.ensemble import weights_of
    from tinyopt.train import backend

    best = summary.best
    if best is None:
        raise StudyError(f"study {summary.name!r} has no complete trial to export")
    check_destination(dst, overwrite)  # before the models are read from MLflow
    backend.load()
    where = f"trial {best.number} of study {summary.name!r}"
    with tempfile.TemporaryDirectory(prefix="tinyopt-export-") as tmp:
        if best.members:
            members, weights, temperatures = weights_of(best.members)
            # A member of weight 0 is left out of the model, so only the voting members need theirs.
            voting = [i for i, weight in enumerate(weights) if weight > 0]
            lost = [f"{members[i].study} trial {members[i].trial_number}" for i in voting if not members[i].model_kept]
            if lost:
                raise StudyError(f"{where} votes with {', '.join(lost)}, whose model was not kept (only a trial "
                                 "among its study's best study.keep_models when it finished keeps its model); "
                                 "export cannot rebuild it: sweep the approach with study.keep_models at least "
                                 "ensemble.top_k, or the ensemble with ensemble.top_k=1")
            run_ids = [members[i].run_id for i in voting]
            classes = _run_classes(run_ids, tracking_uri, Path(tmp))
            model = ensemble_model([_run_model(run_id, tracking_uri, Path(tmp)) for run_id in run_ids],
                                   [weights[i] for i in voting], [temperatures[i] for i in voting])
            params = {"members": _member_params(best.members, storage_url)}
            calibrated = all(temperatures[i] is not None for i in voting)
            what = (f"A weighted soft vote of {len(voting)} models, each taking the same images"
                    + (", each calibrated first by temperature scaling (its probabilities p become "
                       "softmax(log(p) / T), T fitted on the selection split)" if calibrated else "")
                    + ": " + "; ".join(_member_text(best.members[i]) for i in voting) + ".")
        else:
            if not best.model_kept or not best.run_id:
                raise StudyError(f"{where} did not keep its model (MLflow run {best.run_id}); only a trial that "
                                 "was its study's best when it finished keeps one. Retrain it by sweeping "
                                 "again, or export another study")
            run_ids = [best.run_id]
            classes = _run_classes(run_ids, tracking_uri, Path(tmp))
            model = _run_model(best.run_id, tracking_uri, Path(tmp))
            params = best.params
            what = _WHAT.get(summary.approach, f"A model of the {summary.approach} approach.")
        counts = summary.counts
        description = {
            "title": f"tinyopt {summary.approach}: study {summary.name}, trial {best.number}",
            "what": what,
            "how_chosen": (f"The best of {counts['COMPLETE']} complete trials ({counts['PRUNED']} pruned, "
                           f"{counts['FAIL']} failed) of an Optuna study, ranked on the selection split: a "
                           "stratified slice of the training images held out from training."),
            "provenance": {"Optuna storage": redact(storage_url), "study": summary.name, "trial": best.number,
                           "objective value": f"{best.value:.4f}", "MLflow tracking URI": redact(tracking_uri),
                           "MLflow run": best.run_id,
                           "Keras backend of the training": _trained_with(run_ids, tracking_uri)},
        }
        return write_bundle(dst, model=model, classes=classes, params=params, metrics=best.scores,
                            description=description, overwrite=overwrite)


def export_refit(summary: StudySummary, refit: Refit, dst: str | Path, *, model: Any,
                 classes: Sequence[Sequence[Any]], storage_url: str, tracking_uri: str,
                 overwrite: bool = False) -> Path:
    """Write the bundle of a refit of a study's best trial (``tinyopt.results.refit``).

    ``params.json`` holds the trial's params with ``refit_epochs`` and ``train_images``,
    ``metrics.json`` the refit's test scores, and MODEL.md says how it was trained and what the
    trial it repeats scored.

    Args:
        summary: the study (``tinyopt.results.report.summarize_studies``).
        refit: what the refit did (``tinyopt.results.refit.refit_best``).
        dst: the bundle folder (see ``write_bundle``).
        model: the refit model, uncompiled.
        classes: ``(index, wnid, name)`` per output column, in index order.
        storage_url: the Optuna storage of the study.
        tracking_uri: the MLflow store holding the refit's run.
        overwrite: replace a non-empty ``dst``.
    """
    from tinyopt.train import backend

    counts = summary.counts
    trial_scores = ", ".join(f"{key.replace('_', ' ')} {value:.4f}" for key, value in refit.trial_scores.items())
    description = {
        "title": f"tinyopt {summary.approach}: study {summary.name}, trial {refit.trial}, refit",
        "what": (f"{_WHAT.get(summary.approach, f'A model of the {summary.approach} approach.')} Refit on the "
                 f"train and selection splits together ({refit.train_images} images) for {refit.epochs_text}, as "
                 f"early stopping chose for trial {refit.trial}: no images were held out to stop it."),
        "how_chosen": (f"The configuration of the best of {counts['COMPLETE']} complete trials "
                       f"({counts['PRUNED']} pruned, {counts['FAIL']} failed) of an Optuna study, ranked on the "
                       "selection split: a stratified slice of the training images held out from training. That "
                       f"trial, trained on the train split alone, scored {trial_scores}; this model trained on "
                       "the selection split too, so only its test scores are reported."),
        "provenance": {"Optuna storage": redact(storage_url), "study": summary.name, "trial": refit.trial,
                       "MLflow tracking URI": redact(tracking_uri), "MLflow run": refit.run_id,
                       "MLflow run of the trial": refit.trial_run_id, "seed": refit.seed,
                       "Keras backend of the training": backend.name()},
    }
    params = {**refit.params, record.REFIT_EPOCHS: refit.epochs, record.TRAIN_IMAGES: refit.train_images}
    return write_bundle(dst, model=model, classes=classes, params=params, metrics=refit.scores,
                        description=description, overwrite=overwrite)


def _trained_with(run_ids: Sequence[str], tracking_uri: str) -> str:
    """The Keras backend(s) the runs' models were trained with, from their tags."""
    from tinyopt.track import tracking

    found = {tracking.get_run(r, tracking_uri).data.tags.get(record.TAG_BACKEND, "unknown") for r in run_ids}
    return ", ".join(sorted(found))


def _run_model(run_id: str, tracking_uri: str, tmp: Path) -> Any:
    from tinyopt.track import tracking

    return load_model_file(tracking.download_model(run_id, tracking_uri, tmp / run_id),
                           label=f"{MODEL_FILE} of the model MLflow run {run_id} kept", fix=MLFLOW_FIX)


def _run_classes(run_ids: Sequence[str], tracking_uri: str, tmp: Path) -> list[tuple[int, str, str]]:
    """The classes of the runs, which must agree: the models' output columns are summed by index."""
    from tinyopt.track import tracking

    found = [read_classes(tracking.download_artifact(r, record.CLASSES_FILE, tracking_uri, tmp / f"{r}-classes"),
                          label=f"{record.CLASSES_FILE} of MLflow run {r}", fix=MLFLOW_FIX)
             for r in run_ids]
    if any(classes != found[0] for classes in found):
        raise StudyError(f"the runs {', '.join(run_ids)} were trained on different classes; "
                         "sweep every member on the same data cache")
    return found[0]


def _member_text(member: Mapping[str, Any]) -> str:
    temperature = member.get("temperature")
    return f"{member['label']} (weight {member['weight']:.3f}" + (
        f", temperature {temperature:.3g})" if temperature is not None else ")")


def _member_params(members: Sequence[Mapping[str, Any]], storage_url: str) -> list[dict[str, Any]]:
    from tinyopt.stores import storage

    rows = []
    for member in members:
        trial = storage.load_study(member["study"], storage_url).get_trials(deepcopy=False)[member["trial_number"]]
        rows.append({**{k: member[k] for k in ("label", "study", "trial_number", "run_id", "weight", "temperature")
                        if k in member},
                     "params": trial.user_attrs.get(record.PARAMS, trial.params)})
    return rows
