"""Learning-rate schedules and the batch normalisation of the scratch CNN."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from tinyopt.models.blocks import FusedBatchNormalization, plain_keras
from tinyopt.train.training import early_stopping_start, lr_at_epoch


def _rates(epochs: int, **params) -> list[float]:
    schedule = lr_at_epoch({"learning_rate": 1.0, "epochs": epochs, **params})
    return [schedule(epoch) for epoch in range(epochs)]


def test_cooldown_holds_the_rate_then_falls_linearly_over_the_last_quarter():
    np.testing.assert_allclose(_rates(8, decay="cooldown"), [1, 1, 1, 1, 1, 1, 2 / 3, 1 / 3])
    np.testing.assert_allclose(_rates(1, decay="cooldown"), [0.5])  # one epoch: it is the cooldown
    # After a warmup, the cooldown is a quarter of the epochs that follow it (8 here: 2 epochs).
    np.testing.assert_allclose(_rates(10, decay="cooldown", warmup_epochs=2),
                               [1 / 3, 2 / 3, 1, 1, 1, 1, 1, 1, 2 / 3, 1 / 3])


def test_until_its_cooldown_a_trial_s_rate_does_not_depend_on_its_length():
    """What lets a pruner compare trials of 8 and 32 epochs at epoch 6; a cosine decay does not."""
    short, long = _rates(8, decay="cooldown"), _rates(32, decay="cooldown")
    assert short[:6] == long[:6] == [1.0] * 6
    assert long[23] == 1.0 and long[24] < 1.0 and long[-1] > 0
    assert _rates(8, decay="cosine")[5] < 0.35 < 0.9 < _rates(32, decay="cosine")[5]


def test_early_stopping_watches_a_cooldown_trial_from_its_cooldown_only():
    assert early_stopping_start({"epochs": 32, "decay": "cooldown"}) == 24
    assert early_stopping_start({"epochs": 10, "decay": "cooldown", "warmup_epochs": 2}) == 8
    assert early_stopping_start({"epochs": 32, "decay": "cosine"}) == 0


def _twin_models(fused: bool) -> keras.Model:
    keras.utils.set_random_seed(3)
    image = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(6, 3, padding="same", use_bias=False)(image)
    x = (FusedBatchNormalization if fused else keras.layers.BatchNormalization)(momentum=0.5)(x)
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.ReLU()(x))
    model = keras.Model(image, keras.layers.Dense(4, activation="softmax")(x))
    model.compile(keras.optimizers.SGD(0.5), "sparse_categorical_crossentropy")
    return model


@pytest.mark.backend
@pytest.mark.parametrize("policy, tolerance", [("float32", 1e-5), ("mixed_bfloat16", 3e-2)])
def test_fused_batch_norm_trains_and_predicts_as_keras_batch_norm(policy, tolerance):
    """Outputs, gradients and moving statistics alike: after 3 epochs every weight and prediction agrees."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(2.0, 3.0, (64, 8, 8, 3)).astype("float32"), rng.integers(0, 4, 64)
    keras.mixed_precision.set_global_policy(policy)
    try:
        models = [_twin_models(fused) for fused in (False, True)]
        for model in models:
            model.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0)
        keras_bn, fused_bn = models
        assert any(isinstance(layer, FusedBatchNormalization) for layer in fused_bn.layers)
        for mine, theirs in zip(fused_bn.get_weights(), keras_bn.get_weights(), strict=True):
            np.testing.assert_allclose(mine, theirs, atol=tolerance, rtol=tolerance)
        assert not np.allclose(fused_bn.get_layer(index=2).moving_variance, 1.0)  # the statistics did move
        np.testing.assert_allclose(fused_bn.predict(x, verbose=0), keras_bn.predict(x, verbose=0), atol=tolerance)
    finally:
        keras.mixed_precision.set_global_policy("float32")


@pytest.mark.backend
def test_plain_keras_swaps_fused_batch_norm_for_keras_own_with_its_weights():
    model = _twin_models(fused=True)
    x = np.random.default_rng(1).normal(size=(16, 8, 8, 3)).astype("float32")
    model.fit(x, np.arange(16) % 4, epochs=1, verbose=0)
    plain = plain_keras(model)
    assert [type(layer).__name__ for layer in plain.layers].count("BatchNormalization") == 1
    assert not any(isinstance(layer, FusedBatchNormalization) for layer in plain.layers)
    np.testing.assert_allclose(plain.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)
    unchanged = _twin_models(fused=False)
    assert plain_keras(unchanged) is unchanged
