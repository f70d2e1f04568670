"""Per-epoch checkpoints: a resumed training is the uninterrupted one; a damaged or half-written one is never read."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest

from tinyopt.train import checkpoints as ckpt
from tinyopt.train.batches import training_batches

RNG = np.random.default_rng(0)
X = RNG.integers(0, 255, (96, 8, 8, 3), dtype=np.uint8)
Y = RNG.integers(0, 4, 96)


def _model():
    """Random layers (a flip, dropout: seed states that ``save_weights`` leaves out), batch norm and Adam."""
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Rescaling(1 / 255),
                              keras.layers.RandomFlip("horizontal"), keras.layers.Conv2D(4, 3),
                              keras.layers.BatchNormalization(), keras.layers.Flatten(), keras.layers.Dropout(0.3),
                              keras.layers.Dense(4, activation="softmax")])
    model.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy")
    return model


def _fit(model, first: int, epochs: int) -> None:
    train, steps = training_batches(X, Y, batch_size=16, seed=3, first_epoch=first)
    model.fit(train, steps_per_epoch=steps, initial_epoch=first, epochs=epochs, verbose=0, shuffle=False)


@pytest.mark.backend
def test_training_resumed_from_a_checkpoint_ends_where_an_uninterrupted_one_does(tmp_path):
    uninterrupted = _model()
    _fit(uninterrupted, 0, 4)
    interrupted = _model()
    _fit(interrupted, 0, 2)
    store = ckpt.Checkpoints(tmp_path / "trial-0")
    store.save(interrupted, 2, {"loss": [1.0, 0.9]}, {"wait": 1, "best": 0.5, "best_epoch": 1, "stopped_epoch": 0},
               interrupted.get_weights())
    resumed_model = _model()  # a fresh process: the same model, built anew
    resumed = store.load(resumed_model)
    assert resumed.epoch == 2 and resumed.history == {"loss": [1.0, 0.9]} and resumed.notes == []
    assert resumed.stopping == {"wait": 1, "best": 0.5, "best_epoch": 1, "stopped_epoch": 0}
    assert all(np.array_equal(a, b) for a, b in zip(resumed.best_weights, interrupted.get_weights(), strict=True))
    _fit(resumed_model, 2, 4)
    for a, b in zip(uninterrupted.variables, resumed_model.variables, strict=True):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b), err_msg=a.path)


def _saved(tmp_path, epochs=(1, 2)):
    model = _model()
    _fit(model, 0, 1)
    store = ckpt.Checkpoints(tmp_path / "trial-3")
    for epoch in epochs:
        store.save(model, epoch, {"loss": [0.0] * epoch}, {}, None)
    return store, model


def test_only_the_two_newest_checkpoints_are_kept_and_clear_removes_them(tmp_path):
    store, _ = _saved(tmp_path, (1, 2, 3))
    assert sorted(p.name for p in store.folder.iterdir()) == ["epoch-0002", "epoch-0003"]
    store.clear()
    assert not store.folder.exists() and not store.folder.parent.exists()  # the study's folder once empty


@pytest.mark.parametrize("damage", ["truncated arrays", "flipped byte", "no state", "bad json", "other format"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(tmp_path, damage):
    store, _ = _saved(tmp_path)
    newest = store.folder / "epoch-0002"
    arrays, state = newest / "arrays.npz", newest / "state.json"
    if damage == "truncated arrays":
        arrays.write_bytes(arrays.read_bytes()[:100])
    elif damage == "flipped byte":
        data = bytearray(arrays.read_bytes())
        data[len(data) // 2] ^= 0xFF
        arrays.write_bytes(bytes(data))
    elif damage == "no state":
        state.unlink()
    elif damage == "bad json":
        state.write_text("{not json")
    else:
        state.write_text(json.dumps({**json.loads(state.read_text()), "format": 99}))
    resumed = store.load(_model())
    assert resumed.epoch == 1
    assert len(resumed.notes) == 1 and "epoch-0002" in resumed.notes[0] and "unreadable" in resumed.notes[0]


def test_a_checkpoint_of_another_model_is_not_loaded(tmp_path):
    store, _ = _saved(tmp_path, (1,))
    other = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Flatten(), keras.layers.Dense(4)])
    other.compile("adam", "sparse_categorical_crossentropy")
    resumed = store.load(other)
    assert resumed.epoch == 0 and "another model" in resumed.notes[0] and "from epoch 1" in resumed.notes[-1]


def test_a_write_interrupted_half_way_leaves_the_previous_checkpoint_to_load(tmp_path, monkeypatch):
    store, model = _saved(tmp_path, (1,))

    def half_then_signal(stream, **arrays):
        stream.write(b"PK\x03\x04 half an archive")
        raise KeyboardInterrupt  # a SIGTERM arriving mid-write

    monkeypatch.setattr(ckpt.np, "savez", half_then_signal)
    with pytest.raises(KeyboardInterrupt):
        store.save(model, 2, {}, {}, None)
    monkeypatch.undo()
    assert [p.name for p in store.folder.iterdir()] == ["epoch-0001"]
    assert store.load(_model()).epoch == 1


def test_a_write_killed_half_way_is_never_read_and_is_removed(tmp_path):
    store, _ = _saved(tmp_path, (1,))
    left = store.folder / ".tmp-epoch-0002-4242"  # what a SIGKILL during the write of epoch 2 leaves
    left.mkdir()
    (left / "arrays.npz").write_bytes(b"partial")
    assert store.load(_model()).epoch == 1 and not left.exists()


def test_no_checkpoint_means_no_resume(tmp_path):
    assert ckpt.Checkpoints(tmp_path / "nothing").load(_model()) is None


_WRITER = """
import sys
import keras
import numpy as np
from tinyopt.train.checkpoints import Checkpoints

keras.utils.set_random_seed(0)
model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(2048), keras.layers.Dense(512)])
model.compile(keras.optimizers.Adam(), "mse")
model.optimizer.build(model.trainable_variables)
store = Checkpoints(sys.argv[1])
epoch = 0
while True:
    epoch += 1
    for variable in [*model.variables, *model.optimizer.variables]:  # every value says which epoch wrote it
        if "float" in str(variable.dtype):
            variable.assign(np.full(variable.shape, epoch, dtype=variable.dtype))
    store.save(model, epoch, {"loss": [float(epoch)]}, {}, None)
    print(epoch, flush=True)
"""


@pytest.mark.parametrize("after", [0.2, 0.5, 0.9])
def test_a_writer_killed_at_any_moment_leaves_a_checkpoint_that_loads_whole(tmp_path, after):
    import signal
    import subprocess
    import sys
    import time

    writer = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path / "trial-0")], stdout=subprocess.PIPE,
                              text=True)
    assert writer.stdout.readline().strip() == "1"  # one complete checkpoint, then it writes on
    time.sleep(after)
    writer.send_signal(signal.SIGKILL)
    writer.wait(timeout=30)
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(2048), keras.layers.Dense(512)])
    model.compile(keras.optimizers.Adam(), "mse")
    resumed = ckpt.Checkpoints(tmp_path / "trial-0").load(model)
    assert resumed.epoch >= 1 and resumed.history == {"loss": [float(resumed.epoch)]} and resumed.notes == []
    for variable in [*model.variables, *model.optimizer.variables]:
        if "float" in str(variable.dtype):
            assert np.all(keras.ops.convert_to_numpy(variable) == resumed.epoch), variable.path
