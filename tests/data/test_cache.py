"""Damaged caches: every read finds the damage, says it in one line with the fix, and prepare repairs it.

The faults these probe were found in the landed code: a truncated ``train_x.npy`` made ``tinyopt sweep``
print a traceback while ``tinyopt data info`` found nothing wrong and ``tinyopt data prepare`` had
nothing to do; ``--skip-bad`` on a source whose every image is bad wrote a 0-image cache that a sweep
then failed on inside TensorFlow, after it had created the study and a FAILED MLflow run.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from fault_helpers import one_error_line, snapshot, tinyopt
from fixtures import FIXTURE_WNIDS, copy_cache, edit_meta, flip_last_byte

from tinyopt.cli import cli
from tinyopt.core.errors import DataError
from tinyopt.data import build
from tinyopt.data import cache as data
from tinyopt.data.activations import Split, Store


def _assert_same_dataset(cache: Path, expected: Path) -> None:
    for split in data.SPLITS:
        for got, want in zip(data.load_split(split, cache, mmap=False), data.load_split(split, expected, mmap=False),
                             strict=True):
            np.testing.assert_array_equal(got, want, err_msg=split)
    assert data.load_classes(cache) == data.load_classes(expected)


def _as_landed(prepared: Path) -> None:
    """Make the cache one the landed code prepared: meta.json without sizes and checksums."""
    edit_meta(prepared, files=None)


def _garbage_of_the_same_size(path: Path) -> None:
    # Bytes that are neither UTF-8 nor a .npy magic string, and the same size: only the content check can tell.
    path.write_bytes(b"\xff" * path.stat().st_size)


def _truncated_landed_train_x(prepared: Path) -> None:
    _as_landed(prepared)
    os.truncate(prepared / "train_x.npy", 100_000)


def _short_landed_test_labels(prepared: Path) -> None:
    _as_landed(prepared)
    np.save(prepared / "test_y.npy", np.load(prepared / "test_y.npy")[:-1])


# name -> (damage done to the prepared folder, what the one error line says)
DAMAGE = {
    "flipped byte in selection_y.npy": (lambda p: flip_last_byte(p / "selection_y.npy"),
                                        "selection_y.npy fails its checksum"),
    "garbage classes.tsv": (lambda p: _garbage_of_the_same_size(p / "classes.tsv"), "classes.tsv is unreadable"),
    "meta.json not JSON": (lambda p: (p / "meta.json").write_text("{'splits': "), "meta.json is not valid JSON"),
    "meta.json without splits": (lambda p: edit_meta(p, splits=None), "meta.json lacks splits"),
    "deleted test_x.npy": (lambda p: (p / "test_x.npy").unlink(), "test_x.npy is missing"),
    "overwritten header of test_y.npy": (lambda p: _garbage_of_the_same_size(p / "test_y.npy"),
                                         "test_y.npy is not a valid .npy file"),
    "landed cache, truncated train_x.npy": (_truncated_landed_train_x, "train_x.npy is truncated: 100000 bytes"),
    "landed cache, a test label short": (_short_landed_test_labels,
                                         "test_y.npy holds int64 (29,), expected int64 (30,)"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damage_is_one_line_naming_the_file_and_prepare_repairs_it(case, tiny_folder, tiny_cache, tmp_path):
    damage, message = DAMAGE[case]
    cache = copy_cache(tiny_cache, tmp_path)
    damage(cache / "prepared")
    source = "SOURCE" if case == "meta.json not JSON" else str(tiny_folder)  # that meta.json no longer says it
    one_error_line(tinyopt("data", "info", "--cache", cache, cwd=tmp_path), message,
                   f"`tinyopt data prepare --force --data {source} --cache {cache}`")
    if "checksum" not in message:  # loads check all but the checksums, which take a read of every byte
        for load in (lambda: data.load_split("train", cache), lambda: data.load_classes(cache)):
            with pytest.raises(DataError, match=re.escape(message)):
                load()
    repaired = tinyopt("data", "prepare", "--data", tiny_folder, "--cache", cache, cwd=tmp_path)
    assert repaired.returncode == 0, repaired.stderr
    assert f"{message.split(' ')[0]}" in repaired.stderr and "rebuilding the cache" in repaired.stderr
    assert "nothing to do" not in repaired.stderr
    data.verify(cache)
    _assert_same_dataset(cache, tiny_cache)


def test_truncated_images_stop_the_sweep_before_any_store_and_prepare_repairs_them(tiny_folder, tiny_cache,
                                                                                    tmp_path):
    cache = copy_cache(tiny_cache, tmp_path)
    os.truncate(cache / "prepared" / "train_x.npy", 100_000)
    fix = f"tinyopt data prepare --force --data {tiny_folder} --cache {cache}"
    one_error_line(tinyopt("data", "info", "--cache", cache, cwd=tmp_path), "train_x.npy is truncated", fix)
    stores, work = tmp_path / "stores", tmp_path / "work"
    work.mkdir()
    swept = tinyopt("sweep", "scratch", "--trials", "1", "--cache", cache, "--storage", f"sqlite:///{stores}/studies.db",
                    "--tracking-uri", f"sqlite:///{stores}/mlruns/mlflow.db", "--set", "space.epochs=1", cwd=work)
    one_error_line(swept, "train_x.npy is truncated", fix)
    assert not (stores / "studies.db").exists() and not (stores / "mlruns" / "mlflow.db").exists()
    assert snapshot(work) == {}
    repaired = tinyopt("data", "prepare", "--data", tiny_folder, "--cache", cache, cwd=tmp_path)
    assert repaired.returncode == 0 and "rebuilding the cache" in repaired.stderr, repaired.stderr
    shown = tinyopt("data", "info", "--cache", cache, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    _assert_same_dataset(cache, tiny_cache)


def _every_image_garbage(folder: Path) -> None:
    for image in folder.rglob("*.JPEG"):
        image.write_bytes(b"not a jpeg")


def test_skip_bad_on_a_source_without_one_good_image_fails_and_keeps_the_cache(tiny_folder, tiny_cache, tmp_path):
    source = Path(shutil.copytree(tiny_folder, tmp_path / "src" / "tiny-imagenet-200"))
    _every_image_garbage(source)
    cache = copy_cache(tiny_cache, tmp_path)
    before = snapshot(cache)
    failed = tinyopt("data", "prepare", "--data", source, "--cache", cache, "--skip-bad", cwd=tmp_path)
    one_error_line(failed, f"{source}/train/ leaves the train split empty: all 135 of its images are undecodable")
    assert snapshot(cache) == before


@pytest.mark.parametrize(("spoil", "options", "message"), [
    (lambda src: _every_image_garbage(src / "val"), {"skip_bad": True},
     "val/images/ leaves the test split empty: all 30 of its images are undecodable"),
    (lambda src: _every_image_garbage(src / "train" / FIXTURE_WNIDS[2]), {"skip_bad": True},
     f"train/{FIXTURE_WNIDS[2]}/images/ leaves class {FIXTURE_WNIDS[2]} with no image in the train split: all 27"),
    (lambda src: None, {"selection_fraction": 0.99},
     "train/ leaves the train split empty: the selection split takes all of its images; lower --selection-fraction"),
], ids=["all val images bad", "all of a class's train images bad", "selection takes every image"])
def test_a_dataset_a_sweep_cannot_use_is_refused(spoil, options, message, tiny_folder, tiny_cache, tmp_path):
    source = Path(shutil.copytree(tiny_folder, tmp_path / "src" / "tiny-imagenet-200"))
    spoil(source)
    cache = copy_cache(tiny_cache, tmp_path)
    with pytest.raises(DataError, match=re.escape(message)):
        build.prepare(source, cache, progress=False, **options)
    _assert_same_dataset(cache, tiny_cache)
    assert not list(cache.glob(".prepared.*"))


def test_a_source_without_val_images_fails_before_decoding(tiny_folder, tmp_path, monkeypatch):
    source = Path(shutil.copytree(tiny_folder, tmp_path / "src" / "tiny-imagenet-200"))
    shutil.rmtree(source / "val" / "images")
    (source / "val" / "images").mkdir()
    (source / "val" / "val_annotations.txt").write_text("")
    monkeypatch.setattr(build, "_write_arrays", lambda *args: pytest.fail("decoded a source it must refuse"))
    with pytest.raises(DataError, match="val/images/ leaves the test split empty: the source has none"):
        build.prepare(source, tmp_path / "cache", progress=False)
    assert not (tmp_path / "cache").exists()


def test_a_cache_prepared_before_checksums_still_loads_and_is_kept(tiny_folder, tiny_cache, tmp_path, monkeypatch):
    cache = copy_cache(tiny_cache, tmp_path)
    _as_landed(cache / "prepared")
    assert "files" not in data.verify(cache)
    _assert_same_dataset(cache, tiny_cache)
    monkeypatch.setattr(build, "_write_arrays", lambda *args: pytest.fail("rebuilt an intact cache"))
    build.prepare(tiny_folder, cache, progress=False)


def test_force_rebuilds_an_intact_cache(tiny_folder, tiny_cache, tmp_path, monkeypatch):
    cache = copy_cache(tiny_cache, tmp_path)
    decoded = []
    real_write = build._write_arrays
    monkeypatch.setattr(build, "_write_arrays", lambda *args: decoded.append(1) or real_write(*args))
    command = ["data", "prepare", "--data", str(tiny_folder), "--cache", str(cache)]
    assert CliRunner().invoke(cli, command).exit_code == 0
    assert decoded == []
    forced = CliRunner().invoke(cli, [*command, "--force"])
    assert forced.exit_code == 0, forced.output
    assert decoded == [1]
    _assert_same_dataset(cache, tiny_cache)


def test_the_fix_hides_the_secrets_of_the_recorded_source(tiny_cache, tmp_path):
    cache = copy_cache(tiny_cache, tmp_path)
    edit_meta(cache / "prepared", source="https://someone:hunter2@example.com/tiny-imagenet-200.zip")
    (cache / "prepared" / "test_x.npy").unlink()
    with pytest.raises(DataError) as caught:
        data.verify(cache)
    assert "someone:***@example.com" in str(caught.value) and "hunter2" not in str(caught.value)


# --- activations: derived data, rebuilt when its file is damaged ------------------------------------

class _MeanPixel:
    """Stands for a Keras prefix: each image's mean colour, counting its calls."""

    class output:  # noqa: N801 - mimics keras.Model.output
        shape = (None, 3)

    def __init__(self):
        self.calls = 0

    def predict_on_batch(self, batch):
        self.calls += 1
        return batch.reshape(len(batch), -1, 3).mean(axis=1)


ACTIVATION_DAMAGE = {
    "truncated": lambda path: os.truncate(path, path.stat().st_size - 7),
    "garbage": lambda path: path.write_bytes(b"garbage" * 20),
    "another shape": lambda path: np.save(path, np.zeros((9, 3), np.float16)),
    "another dtype": lambda path: np.save(path, np.zeros((10, 3), np.float32)),
}


@pytest.mark.parametrize("case", list(ACTIVATION_DAMAGE))
def test_damaged_activations_are_rebuilt(case, tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (10, 64, 64, 3), dtype=np.uint8)
    expected = images.reshape(10, -1, 3).mean(axis=1).astype(np.float16)
    prefix = _MeanPixel()
    cut = Split(prefix, None, boundary="test", views=1)
    Store(tmp_path, ram_bytes=0).views({"k": 1}, cut, images, 4)
    (written,) = tmp_path.glob("*.npy")
    ACTIVATION_DAMAGE[case](written)
    store = Store(tmp_path, ram_bytes=0)  # another trial's process: nothing of it in memory
    assert store.missing_bytes({"k": 1}, cut, 10) == expected.nbytes
    calls = prefix.calls
    (rebuilt,), reused = store.views({"k": 1}, cut, images, 4)
    assert not reused and prefix.calls > calls
    np.testing.assert_array_equal(rebuilt, expected)
    (again,), reused = Store(tmp_path, ram_bytes=0).views({"k": 1}, cut, images, 4)
    assert reused
    np.testing.assert_array_equal(again, expected)
