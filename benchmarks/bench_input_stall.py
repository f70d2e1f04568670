"""Input stall: a trial's training step fed by its real pipeline against one batch already in memory.

For each case below, the model and the batches are the ones a trial of the CPU preset builds
(``ModelObjective._feed``: the images, or the cached activations, through ``make_dataset``). The
real batches and the same number of steps of one synthetic batch that never leaves memory
(``tf.data.Dataset.from_tensors(...).repeat`` under TensorFlow, a one-batch ``PyDataset``
elsewhere) are each fed to ``fit``, alternately, after a warm-up epoch of each so that tracing is
left out; short epochs are timed several at a time. The stall fraction is the share of the real
epoch's time the model waited for input: ``1 - synthetic / real`` (medians; negative is noise).
Where epochs last a second, the noise of shared cores outweighs a few percent, so the script also
times reading the batches with no model: the input's whole cost, an upper bound of the stall.

    python benchmarks/bench_input_stall.py [--repeats 5] [--cases scratch finetune-images finetune-cached]

Target: a stall fraction of at most 5% (0.05).
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
TARGET = 0.05
MIN_SECONDS = 5.0
# The CPU presets' models, every value fixed: case -> (approach, params that differ from the defaults).
CASES = {
    "scratch": ("scratch", {"stages": 3, "width": 24, "blocks": 1, "augment": "flip_translate", "batch_size": 128}),
    "finetune-images": ("finetune", {"trainable_stages": 1, "input_size": 128, "augment": "flip_translate",
                                     "batch_size": 64}),
    "finetune-cached": ("finetune", {"trainable_stages": 1, "input_size": 128, "augment": "flip", "batch_size": 64}),
}


class _OneBatch:
    """``steps`` times the same batch a epoch, held in memory: input that costs nothing; with ``fit``'s
    ``steps_per_epoch`` as ``ImageFeed.training`` gives it."""

    def __new__(cls, batch, steps: int):
        import keras

        if keras.backend.backend() == "tensorflow":
            import tensorflow as tf

            return tf.data.Dataset.from_tensors(batch).repeat(), steps

        class Repeated(keras.utils.PyDataset):
            def __len__(self):
                return steps

            def __getitem__(self, index):
                return batch

        return Repeated(), None


def _epochs(model, feed: tuple, epochs: int = 1) -> float:
    """Seconds per epoch of ``epochs`` epochs of ``fit`` on ``(batches, steps_per_epoch)``."""
    batches, steps = feed
    started = time.perf_counter()
    model.fit(batches, steps_per_epoch=steps, epochs=epochs, verbose=0, shuffle=False)
    return (time.perf_counter() - started) / epochs


def _read(feed: tuple) -> float:
    """Seconds to read one epoch of ``(batches, steps_per_epoch)`` with no model: the input's whole cost."""
    batches, steps = feed
    started = time.perf_counter()
    for _ in itertools.islice(iter(batches), steps):
        pass
    return time.perf_counter() - started


def _case(name: str, data: str, weights: str, cache: str, repeats: int) -> float:
    import keras
    import numpy as np

    from tinyopt.core import space as search_space
    from tinyopt.core.config import load_config
    from tinyopt.data.splits import load_sweep_data
    from tinyopt.models.approaches import get_approach
    from tinyopt.objectives.model import ModelObjective
    from tinyopt.train import backend
    from tinyopt.train.training import compile_model

    approach, changed = CASES[name]
    overrides = [] if approach == "scratch" else [f"model.weights={weights}"]
    config = load_config(approach, ROOT / "sweeps" / "cpu" / f"{approach}.toml", overrides)
    params = {**search_space.defaults(config.space), **changed}
    sweep_data = load_sweep_data(config.data, data, cache, progress=False)
    backend.free_memory()
    keras.utils.set_random_seed(0)
    module = get_approach(approach)
    model = module.build(params, model=config.model, wnids=sweep_data.wnids)
    objective = ModelObjective(module, config, sweep_data, tracker=None, seed=0)
    feed, off = objective._feed(model, params, "float32")
    fed = "cached activations through make_dataset" if feed.trainee() is not model else \
        f"images through make_dataset, activation cache {off or 'not applicable'}"
    trainee = feed.trainee()
    compile_model(trainee, params)
    steps = -(-len(sweep_data.splits["train"][1]) // int(params["batch_size"]))
    real = feed.training(int(params["batch_size"]), seed=0)
    first = next(iter(real[0]))
    synthetic = _OneBatch(tuple(np.asarray(part) for part in first), steps)
    _epochs(trainee, real), _epochs(trainee, synthetic)  # warm-up: tracing, thread pools, the cache built
    # Short epochs (a cached head) are timed several at a time, so that each timing lasts seconds.
    epochs = max(1, math.ceil(MIN_SECONDS / _epochs(trainee, real)))
    times = {"real": [], "synthetic": []}
    for _ in range(repeats):
        times["real"].append(_epochs(trainee, real, epochs))
        times["synthetic"].append(_epochs(trainee, synthetic, epochs))
    real_s, synthetic_s = statistics.median(times["real"]), statistics.median(times["synthetic"])
    read_s = statistics.median(_read(real) for _ in range(repeats))
    stall = 1 - synthetic_s / real_s
    print(f"{name:16s} {steps} steps of {params['batch_size']} ({fed}), {epochs} epoch(s) per timing: "
          f"per epoch, real pipeline {real_s:.2f} s, one in-memory batch {synthetic_s:.2f} s -> stall {stall:+.3f} "
          f"(target <= {TARGET}); reading the batches alone {read_s:.3f} s, {read_s / real_s:.3f} of the real epoch "
          f"(the stall if none of it overlapped training)", flush=True)
    return stall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(SHARED / "tiny-imagenet-200-dev.zip"))
    parser.add_argument("--weights", default=str(SHARED / "mobilenet_2_5_128_tf.h5"))
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import keras

    print(f"Keras backend: {keras.backend.backend()}; epochs timed alternately, medians of {args.repeats}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.cases:
            _case(name, args.data, args.weights, str(Path(tmp) / "data"), args.repeats)


if __name__ == "__main__":
    main()
