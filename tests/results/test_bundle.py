"""Bundles and the files export reads back, damaged or in the way: one line each, nothing of the user's lost.

`tinyopt predict` runs on copies of a real bundle damaged in one way each; `tinyopt best --export`
runs against a real study (an Optuna trial whose MLflow run kept a tiny model, made directly as
tests/results/test_report.py does) into folders holding other things. Each CLI call is a real process;
the ones that stop before Keras starts cost a second or two, the others about ten.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import zipfile
from pathlib import Path

import keras
import numpy as np
import optuna
import pytest
from fault_helpers import one_error_line, snapshot, tinyopt
from mlflow import MlflowClient
from PIL import Image

from tinyopt.core import record
from tinyopt.core.config import load_config
from tinyopt.core.errors import StudyError, TinyoptError
from tinyopt.results import bundle as bundles
from tinyopt.results import export
from tinyopt.results.predict import load_bundle
from tinyopt.track import store as mlflow_store
from tinyopt.track import tracking

pytestmark = pytest.mark.backend  # CI runs these under JAX as well as TensorFlow

CLASSES = [(0, "n01443537", "goldfish"), (1, "n01629819", "European fire salamander"), (2, "n01641577", "bullfrog")]
DESCRIPTION = {"title": "Test model", "what": "A tiny dense classifier.", "how_chosen": "Best of 1 trial."}
SCORES = {"selection_top1": 0.5, "selection_top5": 1.0, "test_top1": 0.25, "test_top5": 1.0}
ARRAYS = {"selection_probs": np.full((4, 3), 1 / 3, dtype=np.float32), "selection_labels": np.arange(4) % 3}


def _model(seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    image = keras.Input((64, 64, 3), dtype="uint8")
    x = keras.layers.Flatten()(keras.layers.Rescaling(1 / 255)(image))
    return keras.Model(image, keras.layers.Dense(len(CLASSES), activation="softmax")(x))


def _write(dst: Path, seed: int = 0) -> Path:
    return bundles.write_bundle(dst, model=_model(seed), classes=CLASSES, params={"width": 8}, metrics=SCORES,
                               description=DESCRIPTION)


def _umask_022(write):
    previous = os.umask(0o022)
    try:
        return write()
    finally:
        os.umask(previous)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return _write(tmp_path_factory.mktemp("bundle") / "bundle")


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("images") / "img.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def copy(bundle, tmp_path) -> Path:
    return Path(shutil.copytree(bundle, tmp_path / "bundle"))


def _stored_run(tracking_uri: str, study: str, model: keras.Model) -> str:
    """An MLflow trial run as the runner leaves it: predictions, classes and the kept model."""
    tracker = tracking.Tracker(tracking_uri, study, "scratch")
    tracker.start_sweep({"approach": "scratch"}, {}, tags={})
    run = tracker.start_trial(0, {"width": 8}, load_config("scratch"),
                              tags={record.TAG_BACKEND: keras.backend.backend()})
    run.log_predictions(ARRAYS)
    run.log_text(record.classes_tsv(CLASSES), record.CLASSES_FILE)
    run.log_model(model, tracker.experiment_id, f"{study}-trial-0")
    run.end("COMPLETE")
    tracker.end_sweep()
    return run.run_id


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict:
    """A scratch study whose one complete trial kept its model, and a run of another study to damage."""
    root = tmp_path_factory.mktemp("stores")
    stores = {"storage": f"sqlite:///{root / 'studies.db'}", "tracking_uri": f"sqlite:///{root / 'mlflow.db'}"}
    run_id = _stored_run(stores["tracking_uri"], "scratch", _model(1))
    study = optuna.create_study(study_name="scratch", storage=stores["storage"], direction="maximize")
    study.set_user_attr(record.APPROACH, "scratch")
    study.add_trial(optuna.trial.create_trial(
        value=0.5, params={"width": 8}, distributions={"width": optuna.distributions.IntDistribution(8, 64)},
        user_attrs={record.RUN_ID: run_id, record.MODEL_KEPT: True, record.PARAMS: {"width": 8}, **SCORES}))
    return {**stores, "root": root, "run_id": run_id,
            "damaged_run_id": _stored_run(stores["tracking_uri"], "damaged", _model(2))}


def _export(dst, stores, *args, **popen):
    return tinyopt("best", "--export", dst, *args, "--storage", stores["storage"],
                   "--tracking-uri", stores["tracking_uri"], cwd=stores["root"], **popen)


# `tinyopt predict` on damaged bundles

def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGES = {
    "truncated model.keras": ("model.keras", _truncate, "is damaged: it is not a whole zip archive"),
    "zero-byte model.keras": ("model.keras", lambda path: path.write_bytes(b""), "is damaged: it is empty (0 bytes)"),
    "garbage model.keras": ("model.keras", lambda path: path.write_bytes(np.random.default_rng(0).bytes(4096)),
                            "is damaged: it is not a whole zip archive"),
    "garbage classes.tsv": ("classes.tsv", lambda path: path.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00\x80"),
                            "is damaged: it is not UTF-8 text"),
    "classes.tsv one row short": ("classes.tsv", lambda path: path.write_text(record.classes_tsv(CLASSES[:2])),
                                  "lists 2 classes, one per output column"),
    "missing classes.tsv": ("classes.tsv", Path.unlink, "is missing"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_predict_on_a_damaged_bundle_is_one_line_naming_the_file(copy, image, damage):
    name, spoil, problem = DAMAGES[damage]
    spoil(copy / name)
    before = snapshot(copy)
    line = one_error_line(tinyopt("predict", copy, image, cwd=copy.parent), f"{copy / name}", problem,
                          "export the bundle again with `tinyopt best --export DIR --force`, or restore it")
    assert "File not found" not in line  # what Keras says of a truncated file that exists
    assert snapshot(copy) == before


def _folder_in_place(path: Path) -> None:
    path.unlink()
    path.mkdir()


def _zip_of_notes(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("notes.txt", "not a model")


def _weights_not_hdf5(path: Path) -> None:
    whole = path.with_name("whole.keras")
    path.rename(whole)
    with zipfile.ZipFile(whole) as source, zipfile.ZipFile(path, "w") as archive:
        for name in source.namelist():
            archive.writestr(name, b"not HDF5" if name.endswith(".h5") else source.read(name))
    whole.unlink()


def _model_of_vectors(path: Path) -> None:
    vector = keras.Input((12,))
    keras.Model(vector, keras.layers.Dense(len(CLASSES), activation="softmax")(vector)).save(path)


MORE_DAMAGES = {
    "a folder in place of model.keras": ("model.keras", _folder_in_place, "is damaged: it is a folder, not a file"),
    "a zip that is not a Keras file": ("model.keras", _zip_of_notes,
                                       "is damaged: its content cannot be read (KeyError"),
    "weights that are not HDF5": ("model.keras", _weights_not_hdf5, "is damaged: its content cannot be read"),
    "a model taking vectors": ("model.keras", _model_of_vectors,
                               "takes inputs of shape (None, 12), not (H, W, 3) images"),
    "classes.tsv of two columns": ("classes.tsv", lambda path: path.write_text("index\twnid\n0\tn01443537\n"),
                                   "is damaged: not index<TAB>wnid<TAB>name rows"),
    "a folder in place of classes.tsv": ("classes.tsv", _folder_in_place, "is a folder, not a file"),
}


@pytest.mark.parametrize("damage", MORE_DAMAGES)
def test_load_bundle_names_the_file_and_what_is_wrong(copy, damage):
    name, spoil, problem = MORE_DAMAGES[damage]
    spoil(copy / name)
    with pytest.raises(TinyoptError) as raised:
        load_bundle(copy)
    message = str(raised.value)
    assert "\n" not in message, message
    assert f"{copy / name}" in message and problem in message and bundles.BUNDLE_FIX in message, message


def test_load_bundle_loads_the_bundle_it_checks(bundle):
    """The checks let a bundle write_bundle wrote through (the damaged copies above fail for their damage)."""
    model, classes = load_bundle(bundle)
    assert classes == CLASSES and tuple(model.outputs[0].shape) == (None, 3)


# `tinyopt best --export DIR [--force]` into folders holding other things

def _notes_and_sub(dst: Path) -> None:
    (dst / "sub").mkdir(parents=True)
    (dst / "sub" / "data.bin").write_bytes(b"\x00mine\xff")
    (dst / "notes.txt").write_text("x\n")


def _bundle_and_notes(dst: Path) -> None:
    _write(dst)
    (dst / "notes.txt").write_text("my notes on this model\n")


def _a_file(dst: Path) -> None:
    dst.write_text("a file where the bundle would go\n")


REFUSED = {
    # fault 1: --force deleted notes.txt and sub/
    "notes.txt and sub/, --force": (_notes_and_sub, ["--force"], "holds notes.txt, sub/, which no bundle holds; "
                                    "choose a new or empty folder, or move those files out of it"),
    "a bundle and notes.txt, --force": (_bundle_and_notes, ["--force"], "holds notes.txt, which no bundle holds"),
    "a bundle, no --force": (_write, [], "already holds a bundle; pass --force to replace it"),
    "a file in its place, --force": (_a_file, ["--force"], "is a file"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_export_refuses_a_folder_holding_what_it_did_not_write(stores, tmp_path, case):
    make, args, problem = REFUSED[case]
    dst = tmp_path / "f"
    make(dst)
    before = snapshot(tmp_path)
    assert before, "fixture: the folder holds something"
    one_error_line(_export(dst, stores, *args), problem)
    assert snapshot(tmp_path) == before, "nothing in the folder or beside it changed"


def test_force_replaces_an_earlier_bundle_keeping_its_mode(stores, tmp_path):
    dst = _umask_022(lambda: _write(tmp_path / "f", seed=5))
    earlier = (dst / "model.keras").read_bytes()
    done = _umask_022(lambda: _export(dst, stores, "--force"))  # inherited: no preexec_fn, which forks under JAX
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads((dst / "provenance.json").read_text())["MLflow run"] == stores["run_id"]
    assert (dst / "model.keras").read_bytes() != earlier
    assert stat.S_IMODE(dst.stat().st_mode) == 0o755
    assert [p.name for p in tmp_path.iterdir()] == ["f"], "no staging folder left beside it"


def test_export_to_an_empty_folder_keeps_its_mode_and_to_a_new_one_gets_mkdirs(stores, tmp_path):
    (tmp_path / "empty").mkdir(mode=0o750)
    for dst in (tmp_path / "empty", tmp_path / "new"):
        done = _umask_022(lambda dst=dst: _export(dst, stores))
        assert done.returncode == 0, done.stdout + done.stderr
        assert (dst / "model.keras").is_file()
    assert stat.S_IMODE((tmp_path / "empty").stat().st_mode) == 0o750
    assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o755


# What export and the ensemble read back from MLflow, damaged

def _stored_files(stores) -> dict[str, Path]:
    client = MlflowClient(stores["tracking_uri"])
    run = client.get_run(stores["damaged_run_id"])
    model = client.get_logged_model(run.data.tags[record.TAG_MODEL_URI].removeprefix("models:/"))

    def local(uri: str) -> Path:
        return Path(uri.removeprefix("file://"))

    return {"predictions": local(run.info.artifact_uri) / record.PREDICTIONS,
            "model": local(model.artifact_location) / "data" / "model.keras"}


def _read_back(what: str, stores, tmp_path):
    if what == "predictions":
        return mlflow_store.load_predictions(stores["damaged_run_id"], stores["tracking_uri"])
    return export._run_model(stores["damaged_run_id"], stores["tracking_uri"], tmp_path)


@pytest.mark.parametrize("damage, problem", [("truncated", "it is not a whole zip archive"),
                                             ("zero-byte", "it is empty (0 bytes)"),
                                             ("garbage", "it is not a whole zip archive")])
@pytest.mark.parametrize("what, artifact, error", [("predictions", "predictions.npz of MLflow run", StudyError),
                                                   ("model", "model.keras of the model MLflow run", TinyoptError)])
def test_a_damaged_artifact_is_one_line_naming_the_run(stores, tmp_path, damage, problem, what, artifact, error):
    stored = _stored_files(stores)[what]
    _read_back(what, stores, tmp_path / "before")  # the artifact is whole until it is damaged
    whole = stored.read_bytes()
    try:
        {"truncated": _truncate, "zero-byte": lambda path: path.write_bytes(b""),
         "garbage": lambda path: path.write_bytes(b"\x93NUMPY garbage" * 100)}[damage](stored)
        with pytest.raises(error) as raised:
            _read_back(what, stores, tmp_path / "after")
    finally:
        stored.write_bytes(whole)
    message = str(raised.value)
    assert "\n" not in message, message
    assert f"{artifact} {stores['damaged_run_id']}" in message and problem in message, message
    assert export.MLFLOW_FIX in message, message
