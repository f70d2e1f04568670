"""Model bundles: all-or-nothing writes, and an ensemble model that loads without tinyopt."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import keras
import numpy as np
import pytest

from tinyopt.core.errors import TinyoptError
from tinyopt.objectives import voting
from tinyopt.results import bundle as bundles
from tinyopt.results import export

pytestmark = pytest.mark.backend  # CI runs these under JAX as well as TensorFlow

CLASSES = [(0, "n01443537", "goldfish, Carassius auratus"), (1, "n01629819", "European fire salamander"),
           (2, "n01641577", "bullfrog, Rana catesbeiana")]
DESCRIPTION = {"title": "Test model", "what": "A tiny dense classifier.", "how_chosen": "Best of 3 trials.",
               "provenance": {"study": "finetune", "trial": 2}}


def _member(seed: int) -> keras.Model:
    """uint8 image -> Rescaling -> Flatten -> Dense softmax; same layer names in every member."""
    keras.utils.set_random_seed(seed)
    image = keras.Input((64, 64, 3), dtype="uint8")
    x = keras.layers.Flatten(name="flatten")(keras.layers.Rescaling(1 / 255, name="scale")(image))
    return keras.Model(image, keras.layers.Dense(len(CLASSES), activation="softmax", name="dense")(x))


@pytest.fixture(scope="module")
def members():
    return [_member(1), _member(2)]


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).integers(0, 256, (6, 64, 64, 3), dtype=np.uint8)


def _write(dst, model, **kwargs):
    return bundles.write_bundle(dst, model=model, classes=CLASSES, params={"lr": 0.01, "optimizer": "adam"},
                               metrics={"selection_top1": 0.5, "test_top1": 0.25}, description=DESCRIPTION,
                               **kwargs)


def test_ensemble_bundle_loads_and_predicts_without_tinyopt(tmp_path, members, images):
    weights, temperatures = [0.3, 0.9], [0.5, 2.0]  # one member sharpened, one flattened
    bundle = _write(tmp_path / "bundle", export.ensemble_model(members, weights, temperatures))
    assert sorted(p.name for p in bundle.iterdir()) == ["MODEL.md", "classes.tsv", "metrics.json",
                                                        "model.keras", "params.json", "provenance.json"]
    provenance = json.loads((bundle / "provenance.json").read_text())
    assert provenance == {**DESCRIPTION["provenance"], "Keras": keras.__version__,
                          "Keras backend of the export": keras.backend.backend()}
    np.save(tmp_path / "images.npy", images)
    # tinyopt is made unimportable in the child, and the child runs outside the repository.
    script = ("import sys; sys.modules['tinyopt'] = None\n"
              "import keras, numpy as np\n"
              "model = keras.models.load_model('bundle/model.keras')\n"
              "np.save('probs.npy', model.predict(np.load('images.npy'), verbose=0))\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    # The vote WeightSearch scores: the calibrated members' probabilities, weighted.
    expected = voting.soft_vote([voting.calibrate(m.predict(images, verbose=0), t)
                                   for m, t in zip(members, temperatures, strict=True)], weights)
    uncalibrated = voting.soft_vote([m.predict(images, verbose=0) for m in members], weights)
    assert np.abs(expected - uncalibrated).max() > 1e-3, "fixture: the temperatures must change the vote"
    np.testing.assert_allclose(np.load(tmp_path / "probs.npy"), expected, rtol=1e-5, atol=1e-7)

    assert bundles.read_classes(bundle / "classes.tsv") == CLASSES
    assert json.loads((bundle / "params.json").read_text()) == {"lr": 0.01, "optimizer": "adam"}
    assert json.loads((bundle / "metrics.json").read_text()) == {"selection_top1": 0.5, "test_top1": 0.25}
    readme = (bundle / "MODEL.md").read_text()
    for text in ("# Test model", "Best of 3 trials.", "| test_top1 | 0.2500 |", "- study: finetune",
                 "keras.models.load_model", "3 probabilities", "64x64"):
        assert text in readme


def test_zero_weight_member_is_left_out(members, images):
    model = export.ensemble_model(members, [0.0, 2.0])
    assert [layer.name for layer in model.layers if isinstance(layer, keras.Model)] == ["member_1"]
    np.testing.assert_allclose(model.predict(images, verbose=0), members[1].predict(images, verbose=0),
                               rtol=1e-6)


def test_members_recorded_before_calibration_vote_as_saved(members, images):
    """An ensemble trial without temperatures (None) exports the vote it recorded, of the probabilities as saved."""
    old = export.ensemble_model(members, [0.3, 0.9], [None, None])
    expected = voting.soft_vote([m.predict(images, verbose=0) for m in members], [0.3, 0.9])
    np.testing.assert_allclose(old.predict(images, verbose=0), expected, rtol=1e-6, atol=1e-8)
    mixed = export.ensemble_model(members, [0.3, 0.9], [None, 3.0])
    expected = voting.soft_vote([members[0].predict(images, verbose=0),
                                   voting.calibrate(members[1].predict(images, verbose=0), 3.0)], [0.3, 0.9])
    np.testing.assert_allclose(mixed.predict(images, verbose=0), expected, rtol=1e-5, atol=1e-7)


def test_members_with_different_outputs_are_rejected(members):
    image = keras.Input((64, 64, 3), dtype="uint8")
    other = keras.Model(image, keras.layers.Dense(5, activation="softmax")(keras.layers.Flatten()(image)))
    with pytest.raises(TinyoptError, match="disagree on input/output shapes"):
        export.ensemble_model([members[0], other], [1, 1])


def test_existing_bundle_is_replaced_only_when_asked(tmp_path, members):
    dst = _write(tmp_path / "out", members[0])
    before = (dst / "model.keras").read_bytes()
    with pytest.raises(TinyoptError, match="already holds a bundle; pass --force"):
        _write(dst, members[1])
    assert (dst / "model.keras").read_bytes() == before
    _write(dst, members[1], overwrite=True)
    assert (dst / "model.keras").read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "no staging folder left behind"


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_folder_holding_other_files_is_never_replaced(tmp_path, members, overwrite):
    dst = tmp_path / "out"
    (dst / "sub").mkdir(parents=True)
    (dst / "notes.txt").write_text("mine")
    with pytest.raises(TinyoptError, match=r"holds notes.txt, sub/, which no bundle holds; choose a new or empty"):
        _write(dst, members[0], overwrite=overwrite)
    assert sorted(p.name for p in dst.iterdir()) == ["notes.txt", "sub"]


def test_a_folder_with_a_keras_model_but_no_provenance_is_not_a_bundle(tmp_path, members):
    dst = tmp_path / "out"
    dst.mkdir()
    members[0].save(dst / "model.keras")
    with pytest.raises(TinyoptError, match="has no provenance.json, so it is not a bundle tinyopt wrote"):
        bundles.check_destination(dst, overwrite=True)


def test_a_bundle_missing_some_files_is_still_replaced(tmp_path, members):
    """A bundle whose classes.tsv was lost is fixed the way `tinyopt predict` says: export it again with --force."""
    dst = _write(tmp_path / "out", members[0])
    (dst / "classes.tsv").unlink()
    _write(dst, members[0], overwrite=True)
    assert (dst / "classes.tsv").is_file()


def test_the_bundle_folder_gets_the_mode_mkdir_gives(tmp_path, members):
    """Not the 700 of a temporary folder: the bundle is for others to read."""
    previous = os.umask(0o027)
    try:
        (tmp_path / "plain").mkdir()
        dst = _write(tmp_path / "out", members[0])
    finally:
        os.umask(previous)
    assert stat.S_IMODE(dst.stat().st_mode) == stat.S_IMODE((tmp_path / "plain").stat().st_mode) == 0o750
    dst.chmod(0o775)
    _write(dst, members[1], overwrite=True)
    assert stat.S_IMODE(dst.stat().st_mode) == 0o775, "a replaced bundle keeps its folder's mode"


def test_empty_existing_folder_is_used(tmp_path, members):
    (tmp_path / "out").mkdir()
    assert (_write(tmp_path / "out", members[0]) / "MODEL.md").is_file()


def test_failed_write_leaves_nothing(tmp_path, members):
    class Unsaveable:
        outputs = members[0].outputs
        inputs = members[0].inputs
        layers = members[0].layers

        def save(self, path):
            path.write_text("half")
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        _write(tmp_path / "out", Unsaveable())
    assert list(tmp_path.iterdir()) == []


def test_classes_must_match_the_model_output(tmp_path, members):
    with pytest.raises(TinyoptError, match="outputs 3 probabilities but 2 classes"):
        bundles.write_bundle(tmp_path / "out", model=members[0], classes=CLASSES[:2], params={}, metrics={},
                            description=DESCRIPTION)


@pytest.mark.parametrize("text, problem", [("index\twnid\tname\n0\tn1\tone\n2\tn2\ttwo\n", "indices 0..1"),
                                           ("0\tn1\n", "not index<TAB>wnid<TAB>name"),
                                           ("index\twnid\tname\n", "lists no classes")])
def test_read_classes_rejects_malformed_files(tmp_path, text, problem):
    path = tmp_path / "classes.tsv"
    path.write_text(text)
    with pytest.raises(TinyoptError, match=problem):
        bundles.read_classes(path)


def test_read_classes_without_header(tmp_path):
    path = tmp_path / "classes.tsv"
    path.write_text("0\tn01443537\tgoldfish\n1\tn01629819\tsalamander\n")
    assert bundles.read_classes(path) == [(0, "n01443537", "goldfish"), (1, "n01629819", "salamander")]
