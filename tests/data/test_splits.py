"""The splits a sweep loads from the prepared cache: capped per class as [data] says, checked before it starts."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from fixtures import FIXTURE_WNIDS, copy_cache, edit_meta, flip_last_byte

from tinyopt.core.config import DataConfig, load_config
from tinyopt.core.errors import DataError
from tinyopt.data import cache as data
from tinyopt.data import splits


def test_each_split_is_capped_per_class_and_zero_keeps_all(tiny_cache):
    loaded = splits.load_sweep_data(DataConfig(train_per_class=4, selection_per_class=1, test_per_class=0, seed=0),
                                    None, str(tiny_cache), progress=False)
    counts = {split: np.bincount(y, minlength=5).tolist() for split, (_, y) in loaded.splits.items()}
    assert counts == {"train": [4] * 5, "selection": [1] * 5, "test": [6] * 5}
    for x, y in loaded.splits.values():
        assert x.dtype == np.uint8 and x.shape == (len(y), 64, 64, 3)
    np.testing.assert_array_equal(loaded.splits["test"][1], data.load_split("test", tiny_cache)[1])
    assert loaded.wnids == sorted(FIXTURE_WNIDS) and [c.index for c in loaded.classes] == [0, 1, 2, 3, 4]
    assert loaded.cache_dir == tiny_cache


def test_the_data_seed_picks_the_capped_slice_and_the_digest_tells_slices_apart(tiny_cache):
    def load(seed):
        return splits.load_sweep_data(DataConfig(train_per_class=4, selection_per_class=0, test_per_class=0,
                                                 seed=seed), None, str(tiny_cache), progress=False)

    first, again, other = load(0), load(0), load(1)
    np.testing.assert_array_equal(first.splits["train"][0], again.splits["train"][0])
    assert first.digest("train") == again.digest("train") != other.digest("train")
    assert first.digest("test") == other.digest("test")  # uncapped: the same images


@pytest.mark.parametrize("per_class", [0, 2])
def test_a_sweep_refuses_an_empty_split_before_it_creates_anything(per_class, tiny_cache, tmp_path):
    # What the landed code wrote for --skip-bad on a source whose val images were all bad.
    cache = copy_cache(tiny_cache, tmp_path)
    prepared = cache / "prepared"
    np.save(prepared / "test_x.npy", np.zeros((0, *data.IMAGE_SHAPE), np.uint8))
    np.save(prepared / "test_y.npy", np.zeros(0, np.int64))
    edit_meta(prepared, files=None, splits=data.info(tiny_cache)["splits"] | {"test": 0})
    data_cfg = dataclasses.replace(load_config("scratch").data, test_per_class=per_class)
    with pytest.raises(DataError, match=f"the test split of {cache} holds no images.*tinyopt data prepare --force"):
        splits.load_sweep_data(data_cfg, None, str(cache), progress=False)


def test_a_sweep_checks_every_byte_before_it_starts_and_repairs_with_its_source(tiny_folder, tiny_cache, tmp_path):
    cache = copy_cache(tiny_cache, tmp_path)
    flip_last_byte(cache / "prepared" / "selection_y.npy")
    with pytest.raises(DataError, match="selection_y.npy fails its checksum"):
        splits.load_sweep_data(load_config("scratch").data, None, str(cache), progress=False)
    # Given its source, a sweep prepares: the damaged cache is rebuilt, not used.
    loaded = splits.load_sweep_data(load_config("scratch").data, str(tiny_folder), str(cache), progress=False)
    np.testing.assert_array_equal(loaded.splits["selection"][1], data.load_split("selection", tiny_cache)[1])
