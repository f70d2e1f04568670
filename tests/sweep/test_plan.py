"""The forecast's arithmetic: which configurations are timed, epochs under each pruner, caches, the sweep's sums."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest

from tinyopt.core import space as search_space
from tinyopt.core.config import load_config
from tinyopt.data.splits import SweepData
from tinyopt.sweep import plan
from tinyopt.train.timing import Timing

SCRATCH = ("space.stages=2", "space.width=8", "space.blocks=1", "space.batch_size=16", "train.eval_batch_size=32")


def test_representatives_are_the_defaults_the_most_expensive_corner_and_distinct_draws():
    space = load_config("finetune", preset="cpu").space
    chosen = plan.representatives(space, seed=0)
    labels = [label for label, _ in chosen]
    assert labels == ["defaults", "most expensive", *[f"sample {n}" for n in range(1, plan.SAMPLES + 1)]]
    defaults, corner = chosen[0][1], chosen[1][1]
    assert defaults["input_size"] == 128 and defaults["trainable_stages"] == 1  # sweeps/cpu/finetune.toml
    assert corner["input_size"] == 160 and corner["trainable_stages"] == 3 and corner["batch_size"] == 64
    assert corner["resize"] == defaults["resize"] and corner["optimizer"] == defaults["optimizer"]
    params = [p for _, p in chosen]
    assert all(a != b for i, a in enumerate(params) for b in params[i + 1:])


def test_a_corner_follows_the_conditions_of_the_space():
    # head_width exists only with a random head: the corner of a pretrained head has none.
    space = load_config("finetune").space
    corner = plan.representatives(space, seed=0)[1][1]
    assert "head_width" not in corner and corner["trainable_stages"] == 5 and corner["input_size"] == 224
    random_head = load_config("finetune", overrides=("space.head_init=random",)).space
    assert plan.representatives(random_head, seed=0)[1][1]["head_width"] == 512


def test_a_space_of_fixed_values_is_timed_once():
    fixed = search_space.defaults(load_config("scratch").space)  # every param fixed at its default
    assert [label for label, _ in plan.representatives(fixed, seed=0)] == ["defaults"]


@pytest.mark.parametrize("pruner, extra", [("none", ()), ("median", ("study.n_startup_trials=2",)),
                                           ("halving", ("study.pruner_reduction_factor=3",)), ("hyperband", ())])
def test_expected_epochs_follow_the_pruner(pruner, extra):
    config = load_config("scratch", overrides=(*SCRATCH, f"study.pruner={pruner}", "study.pruner_warmup_epochs=0",
                                               *extra))
    epochs = [8] * 20
    expected = plan.expected_epochs(config, epochs, seed=0)
    if pruner == "none":
        assert expected == 8.0
    else:
        assert 1.0 <= expected < 8.0, expected
    assert plan.expected_epochs(config, [], seed=0) == 0.0


SIZES = {"train": 100, "selection": 20, "test": 10}


def _caches(draws, trials, trains=True):
    timing = dataclasses.replace(_timing(0.1), cached=True, prefix_image_s=0.01, prefix_trace_s=1.0,
                                 cache_image_bytes=64)
    return plan._cache_cost(draws, trials, [({"input_size": 64}, timing)], SIZES, trains, seed=0)


def test_a_cache_is_built_once_per_key_and_view_at_a_cost_that_grows_with_its_pixels():
    one = {"input_size": 64, "resize": "bilinear", "trainable_stages": 1, "augment": "none"}
    caches = _caches([one], 5)  # every trial reads the one key: train, selection and test, one view each
    assert caches.keys == 1 and caches.seconds == pytest.approx(1.0 + 130 * 0.01)
    assert caches.bytes == pytest.approx(130 * 64)
    assert _caches([{**one, "augment": "flip"}], 5).seconds == pytest.approx(1.0 + 230 * 0.01)  # a mirrored view
    assert _caches([{**one, "input_size": 128}], 5).seconds == pytest.approx(1.0 + 130 * 0.01 * 4)
    assert _caches([None], 5).keys == 0  # a draw that reads no cache builds none
    # Scoring reads every view of selection and test.
    assert _caches([{"input_size": 64, "resize": "area", "flip_tta": True}], 3, trains=False).seconds \
        == pytest.approx(1.0 + 60 * 0.01)
    # At the images' own size every resize is the same cache.
    assert _caches([{**one, "resize": method} for method in ("area", "bicubic")], 50).keys == 1
    many = [{**one, "input_size": size} for size in (96, 128, 160)]
    assert _caches(many, 1).keys == 1 and _caches(many, 500).keys == 3


def _timing(epoch_step: float) -> Timing:
    return Timing(setup_s=2.0, train_step_s=epoch_step, eval_step_s=0.5, prefix_image_s=0.0, prefix_trace_s=0.0,
                  views=1, cached=False,
                  cache_image_bytes=0, batch_size=16, eval_batch=32, model_params=100, model_bytes=400,
                  peak_memory=2**20)


def test_the_forecast_adds_up_its_configurations(monkeypatch):
    config = load_config("scratch", overrides=(*SCRATCH, "study.pruner=none", "space.epochs=3"))
    rng = np.random.default_rng(0)
    splits = {split: (rng.integers(0, 255, (n, 64, 64, 3), dtype=np.uint8), np.zeros(n, np.int64))
              for split, n in (("train", 160), ("selection", 64), ("test", 32))}
    data = SweepData(splits, classes=[SimpleNamespace(wnid=f"n{n:08d}") for n in range(3)])
    steps = iter([0.1, 0.3, 0.2, 0.2][:plan.SAMPLES + 1])

    def fake(approach, params, config, images, labels, wnids, device):
        return _timing(next(steps))

    monkeypatch.setattr(plan, "time_config", fake)
    forecast = plan.forecast("scratch", config, data, "cpu", trials=4, timeout=None, workers=2, devices=2,
                             startup_s=10.0)
    # Nothing costly is searched here: the corner is the defaults, timed once.
    assert [c.label for c in forecast.configs] == ["defaults", *[f"sample {n}" for n in range(1, plan.SAMPLES + 1)]]
    defaults = forecast.configs[0]
    # 160 train images in batches of 16, then 64 selection images in batches of 32; scoring 96 in 3 batches.
    assert defaults.epoch_s == pytest.approx(10 * 0.1 + 2 * 0.5)
    assert defaults.trial_s == pytest.approx(2.0 + 3 * defaults.epoch_s + 3 * 0.5 + plan.TRIAL_OVERHEAD_S)
    samples = forecast.configs[1:]
    later = np.mean([c.setup_s + c.score_s for c in samples]) + plan.TRIAL_OVERHEAD_S \
        + 3 * np.mean([c.epoch_s for c in samples])
    expected_trial = (defaults.trial_s + 3 * later) / 4  # the defaults first, then the draws
    assert forecast.epochs_per_trial == 3.0 and forecast.trial_s == pytest.approx(expected_trial)
    assert forecast.wall_s == pytest.approx(10.0 + 4 * expected_trial / 2)
    steps = iter([0.1, 0.3, 0.2, 0.2][:plan.SAMPLES + 1])
    shared = plan.forecast("scratch", config, data, "cpu", trials=4, timeout=None, workers=2, startup_s=10.0)
    assert shared.parallel == 1 and shared.wall_s == pytest.approx(10.0 + 4 * expected_trial)  # one device
    assert forecast.disk["predictions"] == 4 * 96 * 3 * 4 and forecast.fits is None  # float32 of 3 classes
    monkeypatch.setattr(plan, "time_config", lambda *args: _timing(0.1))
    timed = plan.forecast("scratch", config, data, "cpu", trials=None, timeout=100.0, workers=1, startup_s=10.0)
    assert timed.fits == int(90 // timed.trial_s) and timed.wall_s == 100.0
