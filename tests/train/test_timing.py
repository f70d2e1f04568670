"""Timing one configuration: real batches of the model a trial would build, through the cache where it would."""

from __future__ import annotations

import numpy as np
import pytest

from tinyopt.core.config import load_config
from tinyopt.models import approaches
from tinyopt.train.feeds import cache_refusal
from tinyopt.train.timing import time_config

pytestmark = pytest.mark.backend

WNIDS = [f"n{n:08d}" for n in range(5)]


def _images(count: int = 40):
    rng = np.random.default_rng(0)
    return rng.integers(0, 255, (count, 64, 64, 3), dtype=np.uint8), rng.integers(0, 5, count)


def test_a_scratch_configuration_times_its_training_evaluation_and_setup():
    config = load_config("scratch", overrides=("space.stages=2", "space.width=8", "space.blocks=1",
                                               "space.batch_size=16", "train.eval_batch_size=32"))
    params = {**{k: v for k, v in config.space.items() if not isinstance(v, dict)}, "dropout": 0.1,
              "augment": "flip", "optimizer": "adam", "learning_rate": 0.01, "epochs": 2, "label_smoothing": 0.0,
              "weight_decay": 1e-4, "momentum": 0.9, "decay": "cosine", "warmup_epochs": 0, "stem_stride": 1,
              "batch_norm": True, "residual": False, "convs": 1, "initializer": "he_normal"}
    images, labels = _images(10)  # fewer than a batch: repeated to fill it
    timing = time_config(approaches.get_approach("scratch"), params, config, images, labels, WNIDS, "cpu")
    assert timing.setup_s > 0 and timing.train_step_s > 0 and timing.eval_step_s > 0
    assert not timing.cached and timing.prefix_image_s == 0 and timing.cache_image_bytes == 0
    assert timing.batch_size == 16 and timing.eval_batch == 32 and timing.model_params > 0
    assert timing.model_bytes == 4 * timing.model_params and timing.peak_memory > 0
    assert timing.epoch_s(100, 64) == pytest.approx(7 * timing.train_step_s + 2 * timing.eval_step_s)
    assert cache_refusal(approaches.get_approach("scratch"), params, config) == "the approach has no frozen layers"


def test_a_finetune_configuration_on_frozen_stages_times_the_cache_it_builds(random_mobilenet_file):
    config = load_config("finetune", overrides=("model.backbone=mobilenet", "model.alpha=0.25",
                                                f"model.weights={random_mobilenet_file}",
                                                "model.weights_resolution=128", "train.eval_batch_size=16"))
    params = {"trainable_stages": 1, "head_init": "random", "head_width": 0, "dropout": 0.1, "resize": "bilinear",
              "input_size": 64, "augment": "flip", "optimizer": "adam", "learning_rate": 1e-3, "weight_decay": 1e-4,
              "decay": "cosine", "warmup_epochs": 0, "batch_size": 8, "label_smoothing": 0.0, "epochs": 1}
    module = approaches.get_approach("finetune")
    images, labels = _images(16)
    timing = time_config(module, params, config, images, labels, WNIDS, "cpu")
    assert timing.cached and timing.views == 2 and timing.prefix_image_s > 0 and timing.train_step_s > 0
    assert timing.cache_image_bytes > 0 and timing.cache_image_bytes % 2 == 0  # float16 activations
    assert timing.cache_build_s(100) == pytest.approx(timing.prefix_trace_s + 100 * timing.prefix_image_s)
    everything = {**params, "trainable_stages": 5}
    assert "nothing is frozen" in cache_refusal(module, everything, config)
    off = load_config("finetune", overrides=("train.activation_cache=false",))
    assert cache_refusal(module, params, off) == "train.activation_cache = false"
