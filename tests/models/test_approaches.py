"""The approaches' model builders, on random or generated weights at small input sizes."""

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
from fixtures import FIXTURE_WNIDS, model_config

from tinyopt.core import config, space
from tinyopt.core.errors import ConfigError, DataError, TrialError, WeightsError
from tinyopt.data.imagenet import imagenet_indices
from tinyopt.models import backbones
from tinyopt.models.approaches import get_approach

pytestmark = pytest.mark.backend  # CI runs these under JAX as well as TensorFlow

WNIDS = sorted(FIXTURE_WNIDS)
# MobileNet at alpha 0.25 builds in a fraction of a second; ResNet50 only where it matters.
SMALL = model_config(backbone="mobilenet", alpha=0.25, weights_resolution=128, weights="none")
RESNET = model_config(backbone="resnet50", weights="none")
SCRATCH = model_config("scratch")


def _images(n: int = 4, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 64, 64, 3), dtype=np.uint8)


def _params(approach: str, **override) -> dict:
    params = space.defaults(config.load_config(approach).space)
    params.update(override)
    return params


def _check_probabilities(model: keras.Model, *, sums_to_one: bool = True) -> np.ndarray:
    probs = model.predict(_images(), verbose=0)
    assert probs.shape == (4, len(WNIDS)) and probs.dtype == np.float32
    assert np.all(probs >= 0)
    sums = probs.sum(axis=1)
    if sums_to_one:
        np.testing.assert_allclose(sums, 1.0, atol=1e-5)
    else:
        assert np.all(sums <= 1.0 + 1e-5)
    return probs


@pytest.fixture(scope="module")
def random_mobilenet_file(tmp_path_factory):
    """A weights file of a random MobileNet (alpha 0.25) whose predictions differ between images.

    Straight from its initializers, a MobileNet in inference mode shrinks activations towards 0 (every
    BN assumes variance 1), so every image would get uniform probabilities and the equivalence tests
    below would hold trivially. One training-mode pass with BN momentum 0 gives each BN the
    statistics of the activations it really sees.
    """
    keras.utils.set_random_seed(0)
    net = keras.applications.MobileNet(alpha=0.25, input_shape=(128, 128, 3), weights=None)
    for layer in net.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.0
    pixels = np.random.default_rng(1).uniform(-1, 1, (32, 128, 128, 3)).astype(np.float32)
    net(pixels, training=True)
    assert len(set(net.predict(pixels, verbose=0).argmax(axis=1))) > 5
    path = tmp_path_factory.mktemp("weights") / "mobilenet_random.weights.h5"
    net.save_weights(path)
    return path


@pytest.fixture
def shared(random_mobilenet_file):
    """The [model] section of the MobileNet whose weights ``random_mobilenet_file`` holds."""
    return dataclasses.replace(SMALL, weights=str(random_mobilenet_file))


def test_get_approach():
    assert {get_approach(name).TRAINS for name in ("finetune", "scratch")} == {True}
    assert get_approach("pretrained").TRAINS is False
    with pytest.raises(ConfigError, match="ensemble"):
        get_approach("ensemble")


@pytest.mark.parametrize("approach", ["pretrained", "finetune"])
def test_defaults_resnet50(approach):
    """Every default of the sweep file, the ResNet50 backbone included; only the weights are random."""
    model_cfg = dataclasses.replace(config.load_config(approach).model, weights="none")
    _check_probabilities(get_approach(approach).build(_params(approach), model=model_cfg, wnids=WNIDS))


def test_defaults_scratch():
    _check_probabilities(get_approach("scratch").build(_params("scratch"), model=SCRATCH, wnids=WNIDS))


@pytest.mark.parametrize("approach, override, sums_to_one", [
    ("pretrained", {"resize": "zeropad", "input_size": 96, "flip_tta": True, "restrict_200": False}, False),
    ("finetune", {"head_init": "random", "head_width": 16, "resize": "area", "input_size": 64,
                  "augment": "flip_crop", "trainable_stages": 5}, True),
    ("scratch", {"stages": 2, "width": 8, "blocks": 1, "residual": False, "batch_norm": False,
                 "initializer": "glorot_uniform", "augment": "none"}, True),
])
def test_one_override(approach, override, sums_to_one):
    model = get_approach(approach).build(_params(approach, **override), model=SMALL, wnids=WNIDS)
    _check_probabilities(model, sums_to_one=sums_to_one)


def test_restrict_200_false_is_the_columns_of_the_1000_way_softmax(shared):
    pretrained = get_approach("pretrained")
    params = _params("pretrained", input_size=64, restrict_200=False)
    columns = pretrained.build(params, model=shared, wnids=WNIDS).predict(_images(), verbose=0)
    full = pretrained.full_outputs(params, model=shared).predict(_images(), verbose=0)
    assert full.shape == (4, 1000)
    np.testing.assert_allclose(columns, full[:, imagenet_indices(WNIDS)], atol=1e-7)
    restricted = pretrained.build(dict(params, restrict_200=True), model=shared, wnids=WNIDS).predict(
        _images(), verbose=0)
    np.testing.assert_array_equal(restricted.argmax(1), columns.argmax(1))
    # A label scores under the 1000-way argmax only when its ImageNet output is the global argmax.
    labels = np.arange(4) % len(WNIDS)
    hits = full.argmax(1) == np.asarray(imagenet_indices(WNIDS))[labels]
    logits = pretrained.split(None, params, model=shared).prefix.predict(_images(), verbose=0)
    assert pretrained.full_top1([logits], wnids=WNIDS, labels=labels) == hits.mean()


@pytest.mark.parametrize("restrict_200", [True, False])
@pytest.mark.parametrize("flip_tta", [False, True])
def test_pretrained_outputs_from_logits_are_the_models_outputs(shared, restrict_200, flip_tta):
    """What a sweep computes from each view's cached 1000 logits is what the saved model outputs."""
    pretrained = get_approach("pretrained")
    params = _params("pretrained", input_size=96, resize="bicubic", restrict_200=restrict_200, flip_tta=flip_tta)
    cut = pretrained.split(None, params, model=shared)
    assert cut.views == (2 if flip_tta else 1) and cut.suffix is None
    images = _images(8)
    views = [cut.prefix.predict(view, verbose=0) for view in (images, images[:, :, ::-1])[:cut.views]]
    expected = pretrained.build(params, model=shared, wnids=WNIDS).predict(images, verbose=0)
    # float32 rounding in another order (numpy's softmax here, XLA's under JAX): within 1e-5.
    np.testing.assert_allclose(pretrained.outputs(params, views, wnids=WNIDS), expected, atol=2e-5)


def test_flip_tta_averages_an_image_and_its_mirror(shared):
    pretrained = get_approach("pretrained")
    params = _params("pretrained", input_size=64)
    plain = pretrained.build(params, model=shared, wnids=WNIDS)
    tta = pretrained.build(dict(params, flip_tta=True), model=shared, wnids=WNIDS)
    images = _images()
    mirrored = images[:, :, ::-1]
    expected = (plain.predict(images, verbose=0) + plain.predict(mirrored, verbose=0)) / 2
    np.testing.assert_allclose(tta.predict(images, verbose=0), expected, atol=1e-6)


def test_head_init_pretrained_starts_from_the_pretrained_predictions(shared):
    params = {"input_size": 64, "resize": "bilinear"}
    as_is = get_approach("pretrained").build(dict(params, flip_tta=False, restrict_200=True), model=shared,
                                             wnids=WNIDS)
    tuned = get_approach("finetune").build(_params("finetune", head_init="pretrained", dropout=0.5,
                                                   augment="flip_crop", **params), model=shared, wnids=WNIDS)
    images = _images(16)
    expected, got = as_is.predict(images, verbose=0), tuned.predict(images, verbose=0)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    np.testing.assert_array_equal(got.argmax(1), expected.argmax(1))


# Trainable weights per freeze depth, counted by hand from the architectures: ResNet50 has a stem of
# conv + BN (4 weights) and bottleneck blocks of 3 conv + 3 BN (12), +4 for each stage's projection
# shortcut, in stages of 3, 4, 6, 3 blocks; MobileNet has a stem conv (no bias) + BN (3) and
# depthwise blocks of 2 convs + 2 BNs (6): stage 1 = stem + block 1, then 2, 2, 6, 2 blocks.
_STAGE_WEIGHTS = {"resnet50": [4, 3 * 12 + 4, 4 * 12 + 4, 6 * 12 + 4, 3 * 12 + 4],
                  "mobilenet": [3 + 6, 2 * 6, 2 * 6, 6 * 6, 2 * 6]}


@pytest.mark.parametrize("backbone", ["mobilenet", "resnet50"])
@pytest.mark.parametrize("stages", range(6))
def test_trainable_weights_follow_freeze_depth(backbone, stages):
    model_cfg = SMALL if backbone == "mobilenet" else RESNET
    params = _params("finetune", trainable_stages=stages, head_init="random", head_width=0, input_size=32)
    model = get_approach("finetune").build(params, model=model_cfg, wnids=WNIDS)
    expected = sum(_STAGE_WEIGHTS[backbone][5 - stages:]) + 2  # + the head's kernel and bias
    assert len(model.trainable_weights) == expected


def test_frozen_batch_norm_keeps_its_statistics():
    # Stage 1 frozen, stages 2-5 train. (Deeper frozen stages would do, but a randomly initialised
    # MobileNet run with inference-mode BN shrinks activations towards 0 after a few blocks, which
    # leaves the later kernels' updates below float32 resolution.)
    params = _params("finetune", trainable_stages=4, head_init="random", head_width=0, augment="none",
                     input_size=32)
    model = get_approach("finetune").build(params, model=SMALL, wnids=WNIDS)
    backbone = model.get_layer("backbone")
    watched = ["conv1_bn", "conv_pw_1_bn", "conv_pw_1", "conv_pw_2_bn", "conv_pw_2"]
    before = {name: [w.copy() for w in backbone.get_layer(name).get_weights()] for name in watched}
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy")
    model.train_on_batch(_images(8), np.arange(8) % len(WNIDS))

    def changed(name):
        return [not np.array_equal(a, b) for a, b in zip(before[name], backbone.get_layer(name).get_weights(),
                                                         strict=True)]

    # BN weights: gamma, beta, moving mean, moving variance.
    assert changed("conv1_bn") == [False] * 4
    assert changed("conv_pw_1_bn") == [False] * 4
    assert changed("conv_pw_1") == [False]
    assert changed("conv_pw_2_bn") == [True] * 4
    assert changed("conv_pw_2") == [True]


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
    model = get_approach(approach).build(_params(approach, **override), model=SMALL, wnids=WNIDS)
    assert model.outputs[0].dtype == "float32"
    assert any(layer.compute_dtype == "float16" for layer in model.layers)
    _check_probabilities(model)


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
        get_approach(approach).build(_params(approach, **{"input_size": 64, **params}), model=SMALL, wnids=WNIDS)


def test_classes_outside_imagenet():
    with pytest.raises(DataError, match="n99999999"):
        get_approach("pretrained").build(_params("pretrained", input_size=32), model=SMALL,
                                         wnids=[*WNIDS, "n99999999"])


# Keras warns about every layer it cannot fill before it raises.
@pytest.mark.filterwarnings("ignore:Skipping nested container")
@pytest.mark.parametrize("backbone, match", [("resnet50", "resnet50"), ("mobilenet", r"mobilenet \(alpha 0.5\)")])
def test_weights_file_of_another_model(random_mobilenet_file, backbone, match):
    model_cfg = model_config(backbone=backbone, alpha=0.5, weights=str(random_mobilenet_file))
    with pytest.raises(WeightsError, match=match) as info:
        get_approach("finetune").build(_params("finetune", input_size=32), model=model_cfg, wnids=WNIDS)
    assert random_mobilenet_file.name in str(info.value)


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


def test_saved_models_reload_without_tinyopt(tmp_path, shared):
    """Export needs nothing but Keras: every layer and op of these models, as tinyopt saves them, is built in."""
    from tinyopt.train.training import inference_model

    models = {
        # zeropad, mirror TTA and the 1000-way column gather
        "pretrained": get_approach("pretrained").build(
            _params("pretrained", resize="zeropad", input_size=96, flip_tta=True, restrict_200=False),
            model=shared, wnids=WNIDS),
        # the matrix resize, augmentation layers and a hidden head layer
        "finetune": get_approach("finetune").build(
            _params("finetune", resize="bicubic", input_size=32, augment="flip_crop", head_init="random",
                    head_width=16), model=SMALL, wnids=WNIDS),
        "scratch": get_approach("scratch").build(_params("scratch", stages=2, width=8, blocks=1), model=SCRATCH,
                                                 wnids=WNIDS),
        "caffe": _caffe_preprocessing(),
    }
    images = _images()
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
    images = _images(6, seed=3)
    np.save(tmp_path / "images.npy", images)
    expected = {}
    for approach, override in CROSS_BACKEND.items():
        keras.utils.set_random_seed(1)
        model = get_approach(approach).build(_params(approach, **override), model=SMALL, wnids=WNIDS)
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
