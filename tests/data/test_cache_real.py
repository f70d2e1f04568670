"""The real 200-class dev subset of Tiny ImageNet (../shared/data/tiny-imagenet-200-dev.zip)."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
from PIL import Image

from tinyopt.data import cache as data

pytestmark = pytest.mark.slow


def test_dev_zip_splits_with_default_options(dev_cache):
    summary = data.info(dev_cache)
    assert summary["classes"] == 200
    assert summary["splits"] == {"train": 18_000, "selection": 2_000, "test": 5_000}
    assert summary["skipped"] == 0
    selection_y = data.load_split("selection", dev_cache)[1]
    train_y = data.load_split("train", dev_cache)[1]
    assert np.bincount(selection_y).tolist() == [10] * 200
    assert np.bincount(train_y).tolist() == [90] * 200
    classes = data.load_classes(dev_cache)
    assert classes[0] == data.ClassInfo(0, "n01443537", "goldfish, Carassius auratus")
    assert [c.wnid for c in classes] == sorted(c.wnid for c in classes)


def test_dev_grayscale_images_become_rgb(dev_cache):
    # The dev zip holds 464 grayscale JPEGs (train + val); each must arrive as three equal channels.
    gray = 0
    for split in data.SPLITS:
        x = data.load_split(split, dev_cache)[0].reshape(-1, 64 * 64, 3)
        gray += int(((x[..., 0] == x[..., 1]) & (x[..., 1] == x[..., 2])).all(axis=1).sum())
    assert gray >= 464


def test_dev_val_labels_and_pixels_match_the_archive(dev_zip, dev_cache):
    index = {c.wnid: c.index for c in data.load_classes(dev_cache)}
    test_x, test_y = data.load_split("test", dev_cache)
    with zipfile.ZipFile(dev_zip) as archive:
        lines = archive.read("tiny-imagenet-200/val/val_annotations.txt").decode().splitlines()
        wnid_of = dict(line.split("\t")[:2] for line in lines)
        for i in (0, 1, 2, 3, 4, 5, 1234, 4999):
            assert test_y[i] == index[wnid_of[f"val_{i}.JPEG"]], i
            payload = archive.read(f"tiny-imagenet-200/val/images/val_{i}.JPEG")
            np.testing.assert_array_equal(test_x[i], np.asarray(Image.open(io.BytesIO(payload)).convert("RGB")))
    # val_0 of Tiny ImageNet is a go-kart; a shifted order would give another class.
    assert data.load_classes(dev_cache)[test_y[0]].wnid == "n03444034"
    assert test_y.tolist() == [index[wnid_of[f"val_{i}.JPEG"]] for i in range(5_000)]
