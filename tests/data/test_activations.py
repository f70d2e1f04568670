"""The activation cache: its store (files, locks, memory budget), backbone boundaries, and the trials it feeds."""

from __future__ import annotations

import dataclasses
import multiprocessing
import time

import keras
import numpy as np
import optuna
import pytest
from fixtures import FIXTURE_WNIDS, model_config
from mlflow import MlflowClient

from tinyopt.core import config, space
from tinyopt.data import cache as data
from tinyopt.data.activations import CacheUnavailable, Split, Store, digest
from tinyopt.models import backbones
from tinyopt.models.approaches import get_approach
from tinyopt.sweep import runner

WNIDS = sorted(FIXTURE_WNIDS)
SMALL = model_config(backbone="mobilenet", alpha=0.25, weights_resolution=128, weights="none")


class _Prefix:
    """Stands for a Keras prefix: the mean of each image's pixels, counting its calls in a file."""

    class output:  # noqa: N801 - mimics keras.Model.output
        shape = (None, 3)

    def __init__(self, calls=None, fail_after: int | None = None, delay: float = 0.0):
        self.calls, self.fail_after, self.delay, self.done = calls, fail_after, delay, 0

    def predict_on_batch(self, batch):
        if self.fail_after is not None and self.done >= self.fail_after:
            raise KeyboardInterrupt("stopped mid-build")
        self.done += 1
        time.sleep(self.delay)
        if self.calls is not None:
            with open(self.calls, "a") as handle:
                handle.write("x")
        return batch.reshape(len(batch), -1, 3).mean(axis=1)


def _images(n: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 64, 64, 3), dtype=np.uint8)


def _expected(images):
    return images.reshape(len(images), -1, 3).mean(axis=1).astype(np.float16)


def test_store_builds_once_and_reuses_across_stores(tmp_path):
    images, calls = _images(), tmp_path / "calls"
    cut = Split(_Prefix(calls), None, boundary="test", views=2)
    first, reused = Store(tmp_path / "act", ram_bytes=2**20).views({"k": 1}, cut, images, 4, count=2)
    assert not reused and len(first) == 2
    np.testing.assert_array_equal(first[0], _expected(images))
    np.testing.assert_array_equal(first[1], _expected(images[:, :, ::-1]))
    assert calls.read_text() == "x" * 6  # 10 images in batches of 4, per view
    # Another process (a new store) reads the files; a budget of 0 bytes keeps them as memory maps.
    again, reused = Store(tmp_path / "act", ram_bytes=0).views({"k": 1}, cut, images, 4, count=2)
    assert reused and isinstance(again[0], np.memmap) and calls.read_text() == "x" * 6
    np.testing.assert_array_equal(again[1], first[1])
    # Another key is built anew.
    _, reused = Store(tmp_path / "act", ram_bytes=0).views({"k": 2}, cut, images, 4)
    assert not reused and calls.read_text() == "x" * 9


def test_store_memory_budget_keeps_the_most_recent(tmp_path):
    images = _images(8)
    cut = Split(_Prefix(), None, boundary="test", views=1)
    one_array = 8 * 3 * 2
    store = Store(tmp_path, ram_bytes=one_array)
    a, _ = store.views({"k": "a"}, cut, images, 8)
    assert not isinstance(a[0], np.memmap)
    store.views({"k": "b"}, cut, images, 8)
    assert list(store._resident) == [next(iter(store._resident))] and len(store._resident) == 1
    in_memory_only = Store(None, ram_bytes=0)
    _, reused = in_memory_only.views({"k": "a"}, cut, images, 8)
    assert not reused and not any(tmp_path.glob("*.partial.npy"))


def test_interrupted_build_leaves_nothing_half_written(tmp_path):
    images = _images()
    cut = Split(_Prefix(fail_after=1), None, boundary="test", views=1)
    store = Store(tmp_path, ram_bytes=2**20)
    with pytest.raises(KeyboardInterrupt):
        store.views({"k": 1}, cut, images, 4)
    assert not list(tmp_path.glob("*.npy"))
    built, reused = store.views({"k": 1}, Split(_Prefix(), None, boundary="test", views=1), images, 4)
    assert not reused
    np.testing.assert_array_equal(built[0], _expected(images))


def test_no_room_on_disk_is_said(tmp_path):
    store = Store(tmp_path, ram_bytes=0)
    with pytest.raises(CacheUnavailable, match="GB of activations would leave"):
        store.check_room(2**60)
    cut = Split(_Prefix(), None, boundary="test", views=2)
    assert store.missing_bytes({"k": 1}, cut, 10, 2) == 2 * 10 * 3 * 2
    store.views({"k": 1}, cut, _images(), 4)
    assert store.missing_bytes({"k": 1}, cut, 10, 2) == 10 * 3 * 2


def _build_in_process(folder, calls):
    Store(folder, ram_bytes=0).views({"k": 1}, Split(_Prefix(calls, delay=0.2), None, boundary="test", views=1),
                                     _images(), 4)


def test_parallel_workers_share_one_build(tmp_path):
    calls = tmp_path / "calls"
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_build_in_process, args=(tmp_path / "act", calls)) for _ in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert [worker.exitcode for worker in workers] == [0, 0, 0]
    assert calls.read_text() == "xxx"  # one build of 3 batches; the others waited on the lock and read it
    assert len(list((tmp_path / "act").glob("*.npy"))) == 1


def test_digest_follows_content():
    images = _images()
    labels = np.arange(10)
    assert digest(images, labels) == digest(images.copy(), labels.copy())
    changed = images.copy()
    changed[3, 5, 5, 0] ^= 1
    assert digest(changed, labels) != digest(images, labels)
    assert digest(images, labels[::-1].copy()) != digest(images, labels)


@pytest.fixture(scope="module")
def random_mobilenet_cfg(tmp_path_factory):
    """A MobileNet weights file whose activations differ between images (see test_models)."""
    keras.utils.set_random_seed(0)
    net = keras.applications.MobileNet(alpha=0.25, input_shape=(128, 128, 3), weights=None)
    for layer in net.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.0
    net(np.random.default_rng(1).uniform(-1, 1, (16, 128, 128, 3)).astype(np.float32), training=True)
    path = tmp_path_factory.mktemp("weights") / "mobilenet_random.weights.h5"
    net.save_weights(path)
    return dataclasses.replace(SMALL, weights=str(path))


def test_frozen_boundary_of_each_stage_cuts_the_graph():
    """Every stage end named in the registry separates the graph (Keras refuses a sub-model otherwise)."""
    for name in ("mobilenet", "resnet50"):
        features = backbones.load(dataclasses.replace(SMALL, backbone=name), input_size=64)
        assert backbones.frozen_boundary(features.model, features.backbone, 0) is features.model.output
        for stages in range(1, backbones.STAGES + 1):
            boundary = backbones.frozen_boundary(features.model, features.backbone, stages)
            keras.Model(boundary, features.model.output)


def _sweep(approach, tmp_path, tiny_folder, weights, trials, *extra):
    from sweep_helpers import SMALL

    storage = f"sqlite:///{tmp_path}/studies.db"
    tracking_uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    runner.run_sweep(approach, trials=trials, source=str(tiny_folder), cache_dir=str(tmp_path / "cache"),
                     overrides=(*SMALL[approach], f"model.weights={weights}", *extra), progress=False,
                     storage=storage, tracking_uri=tracking_uri)
    study = optuna.load_study(study_name=approach, storage=storage)
    client = MlflowClient(tracking_uri)
    return study, [client.get_run(t.user_attrs["mlflow_run_id"]).data.tags for t in study.trials]


@pytest.mark.backend
def test_finetune_trials_share_the_cache_and_say_so(tmp_path, tiny_folder, random_mobilenet_cfg):
    fixed = ("space.trainable_stages=1", "space.augment=flip", "space.resize=bilinear", "space.input_size=96",
             "space.head_init=random", "space.head_width=0")
    study, tags = _sweep("finetune", tmp_path, tiny_folder, random_mobilenet_cfg.weights, 2, *fixed)
    assert [t["activation_cache"] for t in tags] == ["built", "reused"]
    # Both views of train and one of selection and test: 4 files, whatever the trials' other params.
    assert len(list((tmp_path / "cache" / "activations").glob("*.npy"))) == 4
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    study, tags = _sweep("finetune", tmp_path, tiny_folder, random_mobilenet_cfg.weights, 1,
                         *fixed, "space.augment=flip_translate")
    assert tags[-1]["activation_cache"] == "off: augment = flip_translate changes every image in every epoch"
    study, tags = _sweep("finetune", tmp_path, tiny_folder, random_mobilenet_cfg.weights, 1,
                         *fixed, "train.activation_cache=false")
    assert tags[-1]["activation_cache"] == "off: train.activation_cache = false"


@pytest.mark.backend
def test_pretrained_reads_each_views_logits_once_and_never_repeats(tmp_path, tiny_folder, random_mobilenet_cfg):
    """Only restrict_200 and flip_tta vary: 4 combinations, the last three computed from the cached logits."""
    fixed = ("space.resize=bicubic", "space.input_size=96")
    study, tags = _sweep("pretrained", tmp_path, tiny_folder, random_mobilenet_cfg.weights, 10, *fixed)
    combos = [(t.params["flip_tta"], t.params["restrict_200"]) for t in study.trials]
    assert sorted(combos) == [(False, False), (False, True), (True, False), (True, True)]  # each once, then it stops
    built = [combo for combo, tag in zip(combos, tags, strict=True) if tag["activation_cache"] == "built"]
    assert built[0] == combos[0] and len(built) <= 2  # a flip_tta trial builds the mirror view if none did yet
    # Scores equal what a fresh model computes.
    pretrained = get_approach("pretrained")
    x, y = data.load_split("selection", tmp_path / "cache")
    for trial in study.trials:
        params = dict(trial.params, **{"resize": "bicubic", "input_size": 96})
        probs = pretrained.build(params, model=random_mobilenet_cfg, wnids=[c.wnid for c in data.load_classes(
            tmp_path / "cache")]).predict(np.asarray(x), verbose=0)
        if params["restrict_200"]:
            assert trial.value == pytest.approx(float(np.mean(probs.argmax(1) == y)))
    assert space.combinations(config.load_config("pretrained").space) == 96
    assert space.combinations(config.load_config("pretrained", str(config.sweeps_dir() / "cpu" / "pretrained.toml"))
                              .space) == 80
