"""Decoding Tiny ImageNet into the tinyopt cache against one pass of Keras' directory loader.

Side by side in one run, on the same dev zip:
  1. ``tinyopt.data.cache.prepare`` from the zip (verify, decode every labelled image with all cores,
     write the memory-mappable cache), best of ``--repeats`` into fresh cache folders;
  2. the zip extracted to a temporary folder (timed apart), then
     ``keras.utils.image_dataset_from_directory`` over its train folder (indexing + one full pass
     of decoded batches; Keras decodes again on every later epoch);
  3. loading the prepared cache (``load_split`` of every split, memory-mapped and read whole);
  4. one epoch of ``make_dataset`` over the train split.

    python benchmarks/bench_prepare.py [--data ../shared/data/tiny-imagenet-200-dev.zip] [--repeats 2]

Targets: prepare >= 2,000 images/s on 2 cores; loading the prepared cache <= 1 s.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import zipfile
from pathlib import Path

DEV_ZIP = Path(__file__).resolve().parents[2] / "shared" / "data" / "tiny-imagenet-200-dev.zip"


def _timed(func):
    started = time.perf_counter()
    result = func()
    return time.perf_counter() - started, result


def _bench_prepare(source: Path, workdir: Path, repeats: int) -> tuple[float, int, Path]:
    from tinyopt.data import build
    from tinyopt.data import cache as data

    best = float("inf")
    for attempt in range(repeats):
        cache = workdir / f"cache-{attempt}"
        seconds, _ = _timed(lambda cache=cache: build.prepare(source, cache, progress=False))
        best = min(best, seconds)
    images = sum(data.info(cache)["splits"].values())
    return best, images, cache


def _bench_keras(source: Path, workdir: Path) -> tuple[float, float, int]:
    def extract() -> Path:
        with zipfile.ZipFile(source) as archive:
            archive.extractall(workdir / "extracted")  # zipfile itself drops "..", absolute paths and drives
        return next((workdir / "extracted").rglob("train"))

    extract_s, train = _timed(extract)
    import keras  # imported here so TensorFlow's start-up is charged to neither side

    def one_pass() -> int:
        dataset = keras.utils.image_dataset_from_directory(train, image_size=(64, 64), batch_size=256,
                                                           shuffle=False, verbose=False)
        return sum(int(images.shape[0]) for images, _ in dataset)

    pass_s, images = _timed(one_pass)
    return extract_s, pass_s, images


def _bench_load(cache: Path) -> tuple[float, float]:
    from tinyopt.data import cache as data

    mapped, _ = _timed(lambda: [data.load_split(split, cache) for split in data.SPLITS] + [data.load_classes(cache)])
    read, _ = _timed(lambda: [data.load_split(split, cache, mmap=False) for split in data.SPLITS])
    return mapped, read


def _bench_pipeline(cache: Path) -> tuple[float, int]:
    from tinyopt.data import cache as data
    from tinyopt.train import batches

    x, y = data.load_split("train", cache)
    dataset = batches.make_dataset(x, y, batch_size=256, shuffle=True)
    return _timed(lambda: sum(len(images) for images, _ in dataset.as_numpy_iterator()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEV_ZIP, help="Tiny ImageNet zip (default: the dev zip)")
    parser.add_argument("--repeats", type=int, default=2, help="prepare runs; the best counts")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory(prefix="bench_prepare-") as tmp:
        workdir = Path(tmp)
        prepare_s, prepared, cache = _bench_prepare(args.data, workdir, args.repeats)
        extract_s, keras_s, keras_images = _bench_keras(args.data, workdir)
        mapped_s, read_s = _bench_load(cache)
        pipeline_s, pipeline_images = _bench_pipeline(cache)
    ours, theirs = prepared / prepare_s, keras_images / keras_s
    print(f"{args.data.name} on {cores} cores")
    print(f"tinyopt prepare (zip -> cache):      {prepared:,} images in {prepare_s:.2f} s = {ours:,.0f} images/s"
          f"  (target >= 2,000)")
    print(f"keras image_dataset_from_directory:  {keras_images:,} images in {keras_s:.2f} s = {theirs:,.0f} images/s"
          f"  (one pass over the extracted train folder; extracting took {extract_s:.2f} s more)")
    print(f"ratio tinyopt / keras, per image:    {ours / theirs:.2f}x  "
          f"(with extraction: {ours / (keras_images / (keras_s + extract_s)):.2f}x)")
    print(f"load prepared cache, memory-mapped:  {mapped_s * 1000:.1f} ms  (target <= 1 s)")
    print(f"load prepared cache, read whole:     {read_s * 1000:.1f} ms")
    print(f"make_dataset, one shuffled epoch:    {pipeline_images:,} images in {pipeline_s:.2f} s = "
          f"{pipeline_images / pipeline_s:,.0f} images/s")


if __name__ == "__main__":
    main()
