"""The data layer on generated fixtures: splits, labels, conversion, caching, bad input."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
import pytest
from fixtures import FIXTURE_WNIDS, make_tiny_imagenet, zip_folder
from PIL import Image

from tinyopt.core.errors import ConfigError, DataError
from tinyopt.data import build
from tinyopt.data import cache as data

TRAIN_PER_CLASS, VAL_PER_CLASS = 30, 6  # make_tiny_imagenet's defaults


def _all_arrays(cache: Path) -> dict[str, np.ndarray]:
    arrays = {}
    for split in data.SPLITS:
        arrays[f"{split}_x"], arrays[f"{split}_y"] = data.load_split(split, cache, mmap=False)
    return arrays


def _assert_same_arrays(cache_a: Path, cache_b: Path) -> None:
    a, b = _all_arrays(cache_a), _all_arrays(cache_b)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_split_sizes_and_stratified_selection(tiny_cache):
    n_classes = len(FIXTURE_WNIDS)
    (train_x, train_y), (sel_x, sel_y), (test_x, test_y) = (data.load_split(s, tiny_cache) for s in data.SPLITS)
    assert train_x.dtype == np.uint8 and train_x.shape[1:] == (64, 64, 3)
    assert isinstance(train_x, np.memmap)
    assert train_y.dtype == np.int64 and test_y.dtype == np.int64
    assert len(sel_x) == len(sel_y) == n_classes * 3  # 10% of 30 per class
    assert len(train_x) == len(train_y) == n_classes * (TRAIN_PER_CLASS - 3)
    assert len(test_x) == len(test_y) == n_classes * VAL_PER_CLASS
    assert np.bincount(sel_y).tolist() == [3] * n_classes
    assert (np.bincount(train_y) + np.bincount(sel_y)).tolist() == [TRAIN_PER_CLASS] * n_classes
    summary = data.info(tiny_cache)
    assert summary["classes"] == n_classes
    assert summary["splits"] == {"train": len(train_y), "selection": len(sel_y), "test": len(test_y)}
    assert summary["bytes"] > train_x.nbytes + sel_x.nbytes + test_x.nbytes


def test_classes_sorted_with_words_txt_names(tiny_cache):
    classes = data.load_classes(tiny_cache)
    assert [c.wnid for c in classes] == sorted(FIXTURE_WNIDS)
    assert [c.index for c in classes] == list(range(len(FIXTURE_WNIDS)))
    assert classes[0] == data.ClassInfo(0, "n01443537", "goldfish, Carassius auratus")


def test_test_split_is_val_in_order_with_annotated_labels(tiny_folder, tiny_cache):
    index = {c.wnid: c.index for c in data.load_classes(tiny_cache)}
    lines = (tiny_folder / "val" / "val_annotations.txt").read_text().splitlines()
    by_file = {line.split("\t")[0]: index[line.split("\t")[1]] for line in lines}
    test_x, test_y = data.load_split("test", tiny_cache)
    assert test_y.tolist() == [by_file[f"val_{i}.JPEG"] for i in range(len(by_file))]
    for i in (0, 7, len(by_file) - 1):
        expected = np.asarray(Image.open(tiny_folder / "val" / "images" / f"val_{i}.JPEG").convert("RGB"))
        np.testing.assert_array_equal(test_x[i], expected)


def test_grayscale_and_cmyk_become_rgb(tiny_cache):
    first_class = sorted(FIXTURE_WNIDS).index(FIXTURE_WNIDS[0])  # its image 0 is grayscale, image 1 CMYK
    images = np.concatenate([x[y == first_class] for x, y in (data.load_split(s, tiny_cache) for s in
                                                              ("train", "selection"))]).astype(int)
    gray = (images[..., 0] == images[..., 1]).all(axis=(1, 2)) & (images[..., 1] == images[..., 2]).all(axis=(1, 2))
    assert gray.sum() == 1
    # CMYK decoded wrongly (inverted) would sit far from its class colour; every colour image stays close.
    means = images[~gray].mean(axis=(1, 2))
    assert np.abs(means - np.median(means, axis=0)).max() < 40


@pytest.mark.parametrize("form", ["zip", "folder", "parent"])
def test_zip_folder_and_parent_give_the_same_cache(form, tiny_folder, tiny_zip, tiny_cache, tmp_path):
    source = {"zip": tiny_zip, "folder": tiny_folder, "parent": tiny_folder.parent}[form]
    cache = build.prepare(source, tmp_path / "cache", progress=False)
    _assert_same_arrays(cache, tiny_cache)
    assert data.load_classes(cache) == data.load_classes(tiny_cache)


@pytest.fixture
def two_workers(monkeypatch):
    """Make the tiny fixture worth two worker processes and many chunks."""
    monkeypatch.setattr(build, "_MIN_IMAGES_PER_WORKER", 10)
    monkeypatch.setattr(data.os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(build, "_CHUNK_IMAGES", 16)


def test_worker_processes_give_the_same_cache(two_workers, tiny_zip, tiny_cache, tmp_path, monkeypatch):
    pools = []
    real_chunks = build._decoded_chunks

    def recording(args, chunks, workers):
        pools.append(workers)
        return real_chunks(args, chunks, workers)

    monkeypatch.setattr(build, "_decoded_chunks", recording)
    _assert_same_arrays(build.prepare(tiny_zip, tmp_path, progress=False), tiny_cache)
    assert pools == [2]


def test_decoding_finishes_in_process_when_workers_die(two_workers, tiny_zip, tiny_cache, tmp_path, monkeypatch):
    class DyingPool:
        """Decodes the first chunk, then breaks like a pool whose worker was killed."""

        def __init__(self, workers, context, initializer, initargs):
            self.initargs = initargs

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def map(self, func, chunks):
            decoder = build._Decoder(*self.initargs)
            yield decoder(chunks[0])
            decoder.close()
            raise BrokenProcessPool("a worker died")

    monkeypatch.setattr(build, "ProcessPoolExecutor", DyingPool)
    _assert_same_arrays(build.prepare(tiny_zip, tmp_path, progress=False), tiny_cache)


def test_a_script_without_a_main_guard_still_prepares(tiny_folder, tmp_path):
    # Spawned workers re-import the script; its top-level prepare() must fail fast there, not deadlock.
    script = tmp_path / "unguarded.py"
    script.write_text("from tinyopt.data import build\n"
                      "build._MIN_IMAGES_PER_WORKER = 10\n"
                      "build.os.sched_getaffinity = lambda pid: {0, 1}\n"
                      f"build.prepare({str(tiny_folder)!r}, {str(tmp_path / 'cache')!r}, progress=False)\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "__name__ == '__main__'" in done.stderr
    assert data.info(tmp_path / "cache")["splits"]["test"] == len(FIXTURE_WNIDS) * VAL_PER_CLASS

def test_prepare_again_is_a_no_op(tiny_folder, tmp_path, monkeypatch):
    cache = build.prepare(tiny_folder, tmp_path, progress=False)
    before = data.info(cache)

    def must_not_decode(*args, **kwargs):
        raise AssertionError("prepared the same source twice")

    monkeypatch.setattr(build, "_write_arrays", must_not_decode)
    assert build.prepare(tiny_folder, tmp_path, progress=False) == cache
    assert data.info(cache) == before


def test_other_options_rebuild_with_another_selection(tiny_folder, tiny_cache, tmp_path):
    shutil.copytree(tiny_cache, tmp_path, dirs_exist_ok=True)
    build.prepare(tiny_folder, tmp_path, seed=1, progress=False)
    assert data.info(tmp_path)["fingerprint"] != data.info(tiny_cache)["fingerprint"]
    assert data.info(tmp_path)["options"]["seed"] == 1
    sel_new, sel_old = data.load_split("selection", tmp_path)[0], data.load_split("selection", tiny_cache)[0]
    assert sel_new.shape == sel_old.shape and not np.array_equal(sel_new, sel_old)


def test_interrupted_prepare_keeps_the_old_cache_and_a_rerun_completes(tiny_folder, tiny_cache, tmp_path,
                                                                      monkeypatch):
    shutil.copytree(tiny_cache, tmp_path, dirs_exist_ok=True)
    (tmp_path / ".prepared.partial-killed").mkdir()  # what a killed run leaves behind
    good = data.info(tmp_path)
    calls = []
    real_decode = build._decode_image

    def interrupted(payload):
        calls.append(1)
        if len(calls) > 20:
            raise KeyboardInterrupt
        return real_decode(payload)

    monkeypatch.setattr(build, "_decode_image", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build.prepare(tiny_folder, tmp_path, seed=2, progress=False)
    assert data.info(tmp_path) == good
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "prepared"]
    monkeypatch.setattr(build, "_decode_image", real_decode)
    build.prepare(tiny_folder, tmp_path, seed=2, progress=False)
    assert data.info(tmp_path)["options"]["seed"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "prepared"]


def test_a_dataset_caught_mid_swap_is_put_back(tiny_cache, tmp_path):
    shutil.copytree(tiny_cache / "prepared", tmp_path / ".prepared.old-abc")
    with pytest.raises(DataError):
        build.prepare(tmp_path / "no-such-source", tmp_path, progress=False)
    assert data.info(tmp_path)["fingerprint"] == data.info(tiny_cache)["fingerprint"]


# --- bad input: each one clear line, and neither a partial cache nor a lost good one ---------------

def _copy(tiny_folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_folder, tmp_path / "src" / "tiny-imagenet-200"))


def _truncated_zip(tiny_folder, tiny_zip, tmp_path):
    payload = tiny_zip.read_bytes()
    (tmp_path / "cut.zip").write_bytes(payload[: len(payload) // 2])
    return tmp_path / "cut.zip"


def _zip_with_parent_entry(tiny_folder, tiny_zip, tmp_path):
    return zip_folder(tiny_folder, tmp_path / "evil.zip", extra={"tiny-imagenet-200/../../evil.txt": b"x"})


def _zip_with_absolute_entry(tiny_folder, tiny_zip, tmp_path):
    return zip_folder(tiny_folder, tmp_path / "evil.zip", extra={"/tmp/evil.txt": b"x"})


def _zip_without_wnids(tiny_folder, tiny_zip, tmp_path):
    return zip_folder(tiny_folder, tmp_path / "nownids.zip", skip=("tiny-imagenet-200/wnids.txt",))


def _folder_without_wnids(tiny_folder, tiny_zip, tmp_path):
    folder = _copy(tiny_folder, tmp_path)
    (folder / "wnids.txt").unlink()
    return folder


def _unknown_wnid_in_annotations(tiny_folder, tiny_zip, tmp_path):
    folder = _copy(tiny_folder, tmp_path)
    annotations = folder / "val" / "val_annotations.txt"
    lines = annotations.read_text().splitlines(keepends=True)
    lines[2] = "val_2.JPEG\tn99999999\t0\t0\t63\t63\n"
    annotations.write_text("".join(lines))
    return folder


def _listed_image_missing(tiny_folder, tiny_zip, tmp_path):
    folder = _copy(tiny_folder, tmp_path)
    (folder / "val" / "images" / "val_3.JPEG").unlink()
    return folder


def _wnid_without_train_images(tiny_folder, tiny_zip, tmp_path):
    folder = _copy(tiny_folder, tmp_path)
    shutil.rmtree(folder / "train" / FIXTURE_WNIDS[2])
    return folder


def _unlisted_train_folder(tiny_folder, tiny_zip, tmp_path):
    folder = _copy(tiny_folder, tmp_path)
    extra = folder / "train" / "n99999999" / "images"
    extra.mkdir(parents=True)
    shutil.copy(next((folder / "val" / "images").iterdir()), extra / "n99999999_0.JPEG")
    return folder


def _wnid_without_a_name(tiny_folder, tiny_zip, tmp_path):
    folder = _copy(tiny_folder, tmp_path)
    words = folder / "words.txt"
    words.write_text("".join(line for line in words.read_text().splitlines(keepends=True)
                             if not line.startswith(FIXTURE_WNIDS[3])))
    return folder


def _corrupt_jpeg(tiny_folder, tiny_zip, tmp_path):
    folder = _copy(tiny_folder, tmp_path)
    image = folder / "train" / FIXTURE_WNIDS[1] / "images" / f"{FIXTURE_WNIDS[1]}_4.JPEG"
    image.write_bytes(image.read_bytes()[:300])
    return folder


BAD_SOURCES = {
    "truncated zip": (_truncated_zip, "not a readable zip archive"),
    "../ entry": (_zip_with_parent_entry, r"'tiny-imagenet-200/\.\./\.\./evil\.txt'.*outside the dataset folder"),
    "absolute entry": (_zip_with_absolute_entry, "'/tmp/evil.txt'.*outside the dataset folder"),
    "zip without wnids.txt": (_zip_without_wnids, "no wnids.txt"),
    "folder without wnids.txt": (_folder_without_wnids, r"wnids\.txt does not exist"),
    "unknown wnid": (_unknown_wnid_in_annotations, "val_annotations.txt line 3 names wnid n99999999, which is not in"),
    "missing val image": (_listed_image_missing, r"val/images/val_3\.JPEG does not exist"),
    "class without images": (_wnid_without_train_images, rf"train/{FIXTURE_WNIDS[2]}/images/ has no images"),
    "unlisted train folder": (_unlisted_train_folder, r"train/n99999999/ is not listed in wnids\.txt"),
    "wnid without a name": (_wnid_without_a_name, rf"words\.txt has no name for {FIXTURE_WNIDS[3]}"),
    "corrupt jpeg": (_corrupt_jpeg, rf"{FIXTURE_WNIDS[1]}_4\.JPEG cannot be decoded.*--skip-bad"),
}


@pytest.mark.parametrize("with_good_cache", [False, True], ids=["empty cache", "good cache"])
@pytest.mark.parametrize("case", list(BAD_SOURCES))
def test_bad_source_is_one_clear_error_and_leaves_the_cache_alone(case, with_good_cache, tiny_folder, tiny_zip,
                                                                  tiny_cache, tmp_path):
    make_source, message = BAD_SOURCES[case]
    source = make_source(tiny_folder, tiny_zip, tmp_path)
    cache = tmp_path / "cache"
    if with_good_cache:
        shutil.copytree(tiny_cache, cache)
    with pytest.raises(DataError, match=message) as caught:
        build.prepare(source, cache, progress=False)
    assert "\n" not in str(caught.value)
    assert str(source.name) in str(caught.value) or "tiny-imagenet-200" in str(caught.value)
    if with_good_cache:
        assert data.info(cache) == data.info(tiny_cache) | {"cache": str(cache / "prepared")}
    else:
        assert not (cache / "prepared").exists()
    assert not list(cache.glob(".prepared.*"))


def test_zip_md5_mismatch_is_an_error_and_keeps_the_users_zip(tiny_zip, tmp_path):
    with pytest.raises(DataError, match=f"has md5 .*expected {'0' * 32}"):
        build.prepare(tiny_zip, tmp_path, md5="0" * 32, progress=False)
    assert tiny_zip.is_file() and not (tmp_path / "prepared").exists()


def test_skip_bad_skips_and_counts_undecodable_images(tiny_folder, tmp_path):
    folder = _corrupt_jpeg(tiny_folder, None, tmp_path)
    (folder / "val" / "images" / "val_5.JPEG").write_bytes(b"not a jpeg at all")
    cache = build.prepare(folder, tmp_path / "cache", skip_bad=True, progress=False)
    summary = data.info(cache)
    assert summary["skipped"] == 2
    assert summary["splits"]["test"] == len(FIXTURE_WNIDS) * VAL_PER_CLASS - 1
    assert summary["splits"]["train"] + summary["splits"]["selection"] == len(FIXTURE_WNIDS) * TRAIN_PER_CLASS - 1
    test_x, test_y = data.load_split("test", cache)
    assert len(test_x) == len(test_y) == summary["splits"]["test"]
    # The rows after the skipped val_5 move up by one, labels with them.
    index = {c.wnid: c.index for c in data.load_classes(cache)}
    lines = (folder / "val" / "val_annotations.txt").read_text().splitlines()
    annotated = [index[line.split("\t")[1]] for line in lines]
    assert test_y.tolist() == annotated[:5] + annotated[6:]


def test_odd_sized_image_is_named(tiny_folder, tmp_path):
    folder = _copy(tiny_folder, tmp_path)
    Image.new("RGB", (32, 32)).save(folder / "val" / "images" / "val_0.JPEG")
    with pytest.raises(DataError, match=r"val_0\.JPEG cannot be decoded .*32x32, expected 64x64"):
        build.prepare(folder, tmp_path / "cache", progress=False)


def test_selection_fraction_must_be_a_fraction(tiny_folder, tmp_path):
    with pytest.raises(ConfigError, match="selection fraction"):
        build.prepare(tiny_folder, tmp_path, selection_fraction=1.0, progress=False)


def test_loading_without_a_prepared_cache_says_how_to_fix_it(tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path} holds no prepared dataset; run `tinyopt data prepare"):
        data.load_split("train", tmp_path)
    with pytest.raises(DataError, match="unknown split 'val'"):
        data.load_split("val", tmp_path)


def test_default_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("TINYOPT_CACHE", str(tmp_path))
    assert data.default_cache_dir() == tmp_path
    monkeypatch.delenv("TINYOPT_CACHE")
    assert data.default_cache_dir() == Path.home() / ".cache" / "tinyopt"


def test_zip_reading_does_not_extract(tiny_zip, tmp_path):
    build.prepare(tiny_zip, tmp_path, progress=False)
    assert not list(tmp_path.rglob("*.JPEG"))
    with zipfile.ZipFile(tiny_zip) as archive:
        assert any(name.endswith(".JPEG") for name in archive.namelist())


# --- stratified subsets ----------------------------------------------------------------------------

LABELS = np.repeat(np.arange(4), [10, 20, 5, 1])


@pytest.mark.parametrize(("kwargs", "counts"), [
    ({}, [10, 20, 5, 1]),
    ({"fraction": 0.5}, [5, 10, 3, 1]),
    ({"per_class": 4}, [4, 4, 4, 1]),
    ({"fraction": 0.5, "per_class": 6}, [5, 6, 3, 1]),
])
def test_stratified_subset_counts(kwargs, counts):
    subset = data.stratified_subset(LABELS, **kwargs)
    assert np.bincount(LABELS[subset], minlength=4).tolist() == counts
    assert subset.dtype == np.int64 and np.all(np.diff(subset) > 0)


def test_stratified_subset_is_seeded():
    labels = np.random.default_rng(0).integers(0, 5, 500)
    same = [data.stratified_subset(labels, fraction=0.2, seed=3) for _ in range(2)]
    other = data.stratified_subset(labels, fraction=0.2, seed=4)
    np.testing.assert_array_equal(*same)
    assert len(other) == len(same[0]) and not np.array_equal(other, same[0])


@pytest.mark.parametrize("kwargs", [{"fraction": 0.0}, {"fraction": 1.5}, {"per_class": -1}])
def test_stratified_subset_rejects_bad_arguments(kwargs):
    with pytest.raises(ConfigError):
        data.stratified_subset(LABELS, **kwargs)


def test_fixture_images_are_class_specific(tmp_path):
    # The training tests of others rely on classes being learnable: class colours must differ.
    folder = make_tiny_imagenet(tmp_path, train_per_class=4, val_per_class=1, test_images=0, grayscale=0, cmyk=0)
    means = [np.mean([np.asarray(Image.open(p)).mean(axis=(0, 1))
                      for p in (folder / "train" / w / "images").iterdir()], axis=0) for w in FIXTURE_WNIDS]
    distances = [np.linalg.norm(a - b) for i, a in enumerate(means) for b in means[i + 1:]]
    assert min(distances) > 40

