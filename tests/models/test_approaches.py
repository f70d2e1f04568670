"""The approaches as a package: the registry, and what every approach's model does alike (build, precision, save)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from fixtures import FIXTURE_WNIDS, check_probabilities, default_params, model_config, random_images, small_mobilenet

from tinyopt.core import config
from tinyopt.core.errors import ConfigError, TrialError
from tinyopt.models import backbones
from tinyopt.models.approaches import get_approach

pytestmark = pytest.mark.backend  # CI runs these under JAX as well as TensorFlow

WNIDS = sorted(FIXTURE_WNIDS)
# MobileNet at alpha 0.25 builds in a fraction of a second; ResNet50 only where it matters.
SMALL = small_mobilenet()
SCRATCH = model_config("scratch")


def test_get_approach():
    assert {get_approach(name).TRAINS for name in ("finetune", "scratch")} == {True}
    assert get_approach("pretrained").TRAINS is False
    with pytest.raises(ConfigError, match="ensemble"):
        get_approach("ensemble")


@pytest.mark.parametrize("approach", ["pretrained", "finetune"])
def test_defaults_resnet50(approach):
    """Every default of the sweep file, the ResNet50 backbone included; only the weights are random."""
    model_cfg = dataclasses.replace(config.load_config(approach).model, weights="none")
    check_probabilities(get_approach(approach).build(default_params(approach), model=model_cfg, wnids=WNIDS))


@pytest.mark.parametrize("approach, override, sums_to_one", [
    ("pretrained", {"resize": "zeropad", "input_size": 96, "flip_tta": True, "restrict_200": False}, False),
    ("finetune", {"head_init": "random", "head_width": 16, "resize": "area", "input_size": 64,
                  "augment": "flip_crop", "trainable_stages": 5}, True),
    ("scratch", {"stages": 2, "width": 8, "blocks": 1, "residual": False, "batch_norm": False,
                 "initializer": "glorot_uniform", "augment": "none"}, True),
])
def test_one_override(approach, override, sums_to_one):
    model = get_approach(approach).build(default_params(approach, **override), model=SMALL, wnids=WNIDS)
    check_probabilities(model, sums_to_one=sums_to_one)


@pytest.fixture
def mixed_precision():
    keras.mixed_precision.set_global_policy("mixed_float16")
    yield
    keras.mixed_precision.set_global_policy("float32")


@pytest.mark.parametrize("approach, override", [
    ("pretrained", {"input_size": 32, "flip_tta": True}),
    ("finetune", {"input_size": 32}),
    ("scratch", {"stages": 2, "width": 8, "blocks": 1}),
])
def test_mixed_precision_outputs_float32(mixed_precision, approach, override):
    model = get_approach(approach).build(default_params(approach, **override), model=SMALL, wnids=WNIDS)
    assert model.outputs[0].dtype == "float32"
    assert any(layer.compute_dtype == "float16" for layer in model.layers)
    check_probabilities(model)


@pytest.mark.parametrize("approach, params, match", [
    ("finetune", {"head_init": "pretrained", "head_width": 256}, TrialError),
    ("finetune", {"trainable_stages": 6}, ConfigError),
    ("finetune", {"augment": "mixup"}, ConfigError),
    ("finetune", {"head_init": "zeros"}, ConfigError),
    ("pretrained", {"resize": "zeropad", "input_size": 32}, TrialError),
    ("pretrained", {"resize": "nearest"}, ConfigError),
])
def test_invalid_params(approach, params, match):
    with pytest.raises(match):
        get_approach(approach).build(default_params(approach, **{"input_size": 64, **params}), model=SMALL, wnids=WNIDS)


_RELOAD = textwrap.dedent("""
    import json, sys
    sys.modules["tinyopt"] = None  # any import of tinyopt now fails: loading must not need it
    import keras, numpy as np
    images = np.load(sys.argv[1])
    for path, expected in json.loads(sys.argv[2]).items():
        got = keras.models.load_model(path).predict(images, verbose=0)
        np.testing.assert_allclose(got, np.load(expected), atol=1e-6)
    print("reloaded", len(json.loads(sys.argv[2])))
""")


def _caffe_preprocessing() -> keras.Model:
    """ResNet50's preprocessing alone: its export matters, its 100 MB of weights do not."""
    inputs = keras.Input((64, 64, 3), dtype="uint8")
    return keras.Model(inputs, backbones.get("resnet50").preprocess(keras.ops.cast(inputs, "float32")))


def test_saved_models_reload_without_tinyopt(tmp_path, random_mobilenet):
    """Export needs nothing but Keras: every layer and op of these models, as tinyopt saves them, is built in."""
    from tinyopt.train.training import inference_model

    models = {
        # zeropad, mirror TTA and the 1000-way column gather
        "pretrained": get_approach("pretrained").build(
            default_params("pretrained", resize="zeropad", input_size=96, flip_tta=True, restrict_200=False),
            model=random_mobilenet, wnids=WNIDS),
        # the matrix resize, augmentation layers and a hidden head layer
        "finetune": get_approach("finetune").build(
            default_params("finetune", resize="bicubic", input_size=32, augment="flip_crop", head_init="random",
                    head_width=16), model=SMALL, wnids=WNIDS),
        "scratch": get_approach("scratch").build(default_params("scratch", stages=2, width=8, blocks=1), model=SCRATCH,
                                                 wnids=WNIDS),
        "caffe": _caffe_preprocessing(),
    }
    images = random_images()
    np.save(tmp_path / "images.npy", images)
    outputs = {}
    for name, model in models.items():
        inference_model(model).save(tmp_path / f"{name}.keras")  # what a trial's run keeps
        np.save(tmp_path / f"{name}.npy", model.predict(images, verbose=0))
        outputs[str(tmp_path / f"{name}.keras")] = str(tmp_path / f"{name}.npy")
    result = subprocess.run([sys.executable, "-c", _RELOAD, str(tmp_path / "images.npy"), json.dumps(outputs)],
                            capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"reloaded {len(models)}" in result.stdout


CROSS_BACKEND = {
    "pretrained": {"resize": "bicubic", "input_size": 96, "flip_tta": True, "restrict_200": True},
    "finetune": {"head_init": "random", "head_width": 16, "resize": "area", "input_size": 80, "augment": "flip_crop",
                 "trainable_stages": 2},
    "scratch": {"stages": 3, "width": 8, "blocks": 1, "residual": True, "batch_norm": True, "dropout": 0.3,
                "augment": "flip_translate"},
}


def test_a_bundle_predicts_the_same_on_the_other_backend(tmp_path):
    """Every approach's model, exported on this backend, loads and predicts within 1e-4 on the other one."""
    from tinyopt.results import bundle as bundles

    this = keras.backend.backend()
    other = "jax" if this == "tensorflow" else "tensorflow"
    pytest.importorskip(other, reason=f"the {other} backend is not installed (pip install -e '.[jax]')")
    images = random_images(6, seed=3)
    np.save(tmp_path / "images.npy", images)
    expected = {}
    for approach, override in CROSS_BACKEND.items():
        keras.utils.set_random_seed(1)
        model = get_approach(approach).build(default_params(approach, **override), model=SMALL, wnids=WNIDS)
        expected[approach] = model.predict(images, verbose=0)
        bundles.write_bundle(tmp_path / approach, model=model, classes=[(i, w, w) for i, w in enumerate(WNIDS)],
                            params=override, metrics={}, description={"title": approach, "what": "", "how_chosen": ""})
    script = textwrap.dedent(f"""
        import json, keras, numpy as np
        from tinyopt.results.predict import load_bundle
        assert keras.backend.backend() == {other!r}
        for approach in {list(CROSS_BACKEND)!r}:
            model, _ = load_bundle(approach)
            np.save(approach + ".npy", model.predict(np.load("images.npy"), verbose=0))
            print(json.load(open(approach + "/provenance.json"))["Keras backend of the export"])
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "KERAS_BACKEND": other})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == [this] * len(CROSS_BACKEND)
    for approach, probs in expected.items():
        np.testing.assert_allclose(np.load(tmp_path / f"{approach}.npy"), probs, atol=1e-4, err_msg=approach)
