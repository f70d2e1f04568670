"""finetune: an ImageNet backbone with a new head, trained from a chosen stage; where its frozen stages are cut off."""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
import pytest
from fixtures import FIXTURE_WNIDS, default_params, model_config, random_images, small_mobilenet

from tinyopt.core import config, space
from tinyopt.core.errors import WeightsError
from tinyopt.models.approaches import get_approach

WNIDS = sorted(FIXTURE_WNIDS)
SMALL = small_mobilenet()
RESNET = model_config(backbone="resnet50", weights="none")


@pytest.mark.backend
def test_head_init_pretrained_starts_from_the_pretrained_predictions(random_mobilenet):
    params = {"input_size": 64, "resize": "bilinear"}
    as_is = get_approach("pretrained").build(dict(params, flip_tta=False, restrict_200=True), model=random_mobilenet,
                                             wnids=WNIDS)
    tuned = get_approach("finetune").build(default_params("finetune", head_init="pretrained", dropout=0.5,
                                                          augment="flip_crop", **params),
                                           model=random_mobilenet, wnids=WNIDS)
    images = random_images(16)
    expected, got = as_is.predict(images, verbose=0), tuned.predict(images, verbose=0)
    # float32 sums in another order (XLA picks its threads by load) differ by ~1e-6 at these magnitudes.
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got.argmax(1), expected.argmax(1))


# Trainable weights per freeze depth, counted by hand from the architectures: ResNet50 has a stem of
# conv + BN (4 weights) and bottleneck blocks of 3 conv + 3 BN (12), +4 for each stage's projection
# shortcut, in stages of 3, 4, 6, 3 blocks; MobileNet has a stem conv (no bias) + BN (3) and
# depthwise blocks of 2 convs + 2 BNs (6): stage 1 = stem + block 1, then 2, 2, 6, 2 blocks.
_STAGE_WEIGHTS = {"resnet50": [4, 3 * 12 + 4, 4 * 12 + 4, 6 * 12 + 4, 3 * 12 + 4],
                  "mobilenet": [3 + 6, 2 * 6, 2 * 6, 6 * 6, 2 * 6]}


@pytest.mark.backend
@pytest.mark.parametrize("backbone", ["mobilenet", "resnet50"])
@pytest.mark.parametrize("stages", range(6))
def test_trainable_weights_follow_freeze_depth(backbone, stages):
    model_cfg = SMALL if backbone == "mobilenet" else RESNET
    params = default_params("finetune", trainable_stages=stages, head_init="random", head_width=0, input_size=32)
    model = get_approach("finetune").build(params, model=model_cfg, wnids=WNIDS)
    expected = sum(_STAGE_WEIGHTS[backbone][5 - stages:]) + 2  # + the head's kernel and bias
    assert len(model.trainable_weights) == expected


@pytest.mark.backend
def test_frozen_batch_norm_keeps_its_statistics():
    # Stage 1 frozen, stages 2-5 train. (Deeper frozen stages would do, but a randomly initialised
    # MobileNet run with inference-mode BN shrinks activations towards 0 after a few blocks, which
    # leaves the later kernels' updates below float32 resolution.)
    params = default_params("finetune", trainable_stages=4, head_init="random", head_width=0, augment="none",
                            input_size=32)
    model = get_approach("finetune").build(params, model=SMALL, wnids=WNIDS)
    backbone = model.get_layer("backbone")
    watched = ["conv1_bn", "conv_pw_1_bn", "conv_pw_1", "conv_pw_2_bn", "conv_pw_2"]
    before = {name: [w.copy() for w in backbone.get_layer(name).get_weights()] for name in watched}
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy")
    model.train_on_batch(random_images(8), np.arange(8) % len(WNIDS))

    def changed(name):
        return [not np.array_equal(a, b) for a, b in zip(before[name], backbone.get_layer(name).get_weights(),
                                                         strict=True)]

    # BN weights: gamma, beta, moving mean, moving variance.
    assert changed("conv1_bn") == [False] * 4
    assert changed("conv_pw_1_bn") == [False] * 4
    assert changed("conv_pw_1") == [False]
    assert changed("conv_pw_2_bn") == [True] * 4
    assert changed("conv_pw_2") == [True]


@pytest.mark.backend
# Keras warns about every layer it cannot fill before it raises.
@pytest.mark.filterwarnings("ignore:Skipping nested container")
@pytest.mark.parametrize("backbone, match", [("resnet50", "resnet50"), ("mobilenet", r"mobilenet \(alpha 0.5\)")])
def test_weights_file_of_another_model(random_mobilenet_file, backbone, match):
    model_cfg = model_config(backbone=backbone, alpha=0.5, weights=str(random_mobilenet_file))
    with pytest.raises(WeightsError, match=match) as info:
        get_approach("finetune").build(default_params("finetune", input_size=32), model=model_cfg, wnids=WNIDS)
    assert random_mobilenet_file.name in str(info.value)


@pytest.mark.backend
@pytest.mark.parametrize("trainable_stages", [0, 1, 2, 3, 4])
def test_finetune_cut_gives_the_models_output(random_mobilenet, trainable_stages):
    """suffix(prefix(x)) is the model, with activations stored in float16; training the suffix trains the model."""
    finetune = get_approach("finetune")
    params = dict(space.defaults(config.load_config("finetune").space), trainable_stages=trainable_stages,
                  input_size=96, resize="bilinear", augment="flip", head_init="random", head_width=16)
    assert finetune.uncached(params, random_mobilenet) is None
    model = finetune.build(params, model=random_mobilenet, wnids=WNIDS)
    cut = finetune.split(model, params, model=random_mobilenet)
    assert cut.views == 2 and cut.boundary == f"stage {5 - trainable_stages} output"
    assert not any(layer.trainable_weights for layer in cut.prefix.layers)
    images = random_images(6)
    activations = cut.prefix.predict(images, verbose=0)
    stored = activations.astype(np.float16)
    np.testing.assert_allclose(stored, activations, rtol=1e-3, atol=1e-3)
    expected = model.predict(images, verbose=0)
    np.testing.assert_allclose(cut.suffix.predict(stored, verbose=0), expected, atol=2e-3)
    trainable = {id(v) for v in model.trainable_weights}
    assert {id(v) for v in cut.suffix.trainable_weights} == trainable


@pytest.mark.parametrize("override, reason", [
    ({"trainable_stages": 5}, "nothing is frozen"),
    ({"augment": "flip_translate"}, "augment = flip_translate"),
    ({"augment": "flip_crop"}, "augment = flip_crop"),
])
def test_finetune_says_why_it_cannot_cache(override, reason):
    finetune = get_approach("finetune")
    params = {**space.defaults(config.load_config("finetune").space), "augment": "none", **override}
    assert reason in finetune.uncached(params, dataclasses.replace(SMALL, weights="some.h5"))
    assert "random" in finetune.uncached(dict(params, trainable_stages=1, augment="none"), SMALL)
