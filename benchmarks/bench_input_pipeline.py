"""make_dataset's tf.data pipeline against ArrayBatches, the PyDataset it hands every other Keras backend.

Side by side in one run, on one synthetic uint8 memory map shaped like a prepared split:
  1. one shuffled epoch read straight from each pipeline under the TensorFlow backend, best of
     ``--repeats`` (the ratio is ArrayBatches' speed over tf.data's);
  2. one epoch of a trivial ``model.fit`` (cast, average pool, dense) consuming each, the second
     epoch so that tracing is left out, plus ArrayBatches under the JAX backend in a child process
     (Keras picks its backend once, at import).

    python benchmarks/bench_input_pipeline.py [--images 20000] [--batch 256] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CLASSES = 200
_CHUNK = 2000


def _write_images(path: Path, count: int) -> None:
    """Random uint8 64x64x3 images and labels as .npy files, written in chunks to spare memory."""
    rng = np.random.default_rng(0)
    images = np.lib.format.open_memmap(path / "x.npy", mode="w+", dtype=np.uint8, shape=(count, 64, 64, 3))
    for start in range(0, count, _CHUNK):
        images[start:start + _CHUNK] = rng.integers(0, 256, images[start:start + _CHUNK].shape, dtype=np.uint8)
    images.flush()
    np.save(path / "y.npy", rng.integers(0, CLASSES, count))


def _load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    return np.load(path / "x.npy", mmap_mode="r"), np.load(path / "y.npy")


def _read_epoch(dataset) -> float:
    """Seconds to read one epoch of batches into numpy."""
    started = time.perf_counter()
    for _ in dataset.as_numpy_iterator():
        pass
    return time.perf_counter() - started


def _fit_epoch(dataset) -> float:
    """Seconds of the second epoch of a model that barely computes, so that its input sets the pace."""
    import keras

    class EpochTimes(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds = time.perf_counter() - self.started

    model = keras.Sequential([keras.Input((64, 64, 3), dtype="uint8"), keras.layers.Rescaling(1 / 255),
                              keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(CLASSES, activation="softmax")])
    model.compile("sgd", "sparse_categorical_crossentropy")
    timer = EpochTimes()
    model.fit(dataset, epochs=2, shuffle=False, verbose=0, callbacks=[timer])
    return timer.seconds


def _child_fit(folder: Path, batch: int) -> float:
    """ArrayBatches' fit epoch under the JAX backend, from a child process."""
    command = [sys.executable, __file__, "--jax-fit", str(folder), "--batch", str(batch)]
    out = subprocess.run(command, capture_output=True, text=True, check=True,
                         env={**os.environ, "KERAS_BACKEND": "jax"}).stdout
    return float(out.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20_000, help="images in the synthetic memory map")
    parser.add_argument("--batch", type=int, default=256, help="batch size")
    parser.add_argument("--repeats", type=int, default=3, help="epochs read from each pipeline; the best counts")
    parser.add_argument("--jax-fit", type=Path, help=argparse.SUPPRESS)  # the child: a folder of x.npy, y.npy
    args = parser.parse_args()
    if args.jax_fit:
        from tinyopt.train import batches

        x, y = _load(args.jax_fit)
        print(_fit_epoch(batches.make_dataset(x, y, batch_size=args.batch, shuffle=True)))
        return

    os.environ["KERAS_BACKEND"] = "tensorflow"  # before Keras is imported: make_dataset then builds tf.data
    import keras

    from tinyopt.train import batches

    with tempfile.TemporaryDirectory(prefix="bench_input_pipeline-") as tmp:
        folder = Path(tmp)
        _write_images(folder, args.images)
        x, y = _load(folder)
        pipelines = {"tf.data (make_dataset)": batches.make_dataset(x, y, batch_size=args.batch, shuffle=True),
                     "ArrayBatches": batches.ArrayBatches(x, y, batch_size=args.batch, shuffle=True)}
        read = {name: min(_read_epoch(dataset) for _ in range(args.repeats)) for name, dataset in pipelines.items()}
        fit = {f"{name}, tensorflow": _fit_epoch(dataset) for name, dataset in pipelines.items()}
        fit["ArrayBatches, jax"] = _child_fit(folder, args.batch)

    cores = len(os.sched_getaffinity(0))
    print(f"{args.images:,} uint8 64x64x3 images in a memory map, shuffled batches of {args.batch}, {cores} cores, "
          f"Keras {keras.__version__}")
    rows = [(f"read one epoch, {name}", seconds) for name, seconds in read.items()]
    rows += [(f"fit one epoch, {name}", seconds) for name, seconds in fit.items()]
    width = max(len(label) for label, _ in rows) + 1
    for label, seconds in rows:
        print(f"{label + ':':<{width}} {args.images / seconds:>9,.0f} images/s  ({seconds:.2f} s)")
    tf_data, array_batches = read.values()
    print(f"{'ratio ArrayBatches / tf.data, read:':<{width}} {tf_data / array_batches:>9.2f}x")

if __name__ == "__main__":
    main()
