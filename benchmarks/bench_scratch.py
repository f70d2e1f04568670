"""A scratch sweep against a plain hand-written Keras CNN, given the same minutes on the same data.

Arm 1, the sweep: `tinyopt sweep scratch --config sweeps/cpu/scratch.toml --timeout BUDGET` over every
dev train image, as a user runs it (a subprocess with its own study and MLflow store); its result is
the test top-1 of the trial with the best selection top-1.

Arm 2, the hand-written baseline, its recipe fixed: four stages of 3x3 convolution (16, 32, 64, 128
filters), batch norm, ReLU and 2x2 max-pool on the 64 px images, global average pooling, a 200-way
softmax; random horizontal flips and shifts of up to 1/8 of the side; Adam at 2e-3 with a cosine decay
to 0, batch 128, on the same train images. The cosine spans the epochs that fit the budget (from the
first epoch's time); training stops when the budget ends, at a batch, and the model is scored on the
sweep's test images.

The arms run one after the other, each with every core, its budget counted from its process start
(keep the machine otherwise idle). This machine has slow spells that halve its speed for minutes at a
time (the baseline trained 67 epochs in one 20-minute run and 34 in another), so one arm may get
twice the work of the other; `--side-by-side` runs the two arms at the same time instead, each pinned
to a core of its own, so that the spells fall on both. Printed: each arm's test top-1 and the difference.

    python benchmarks/bench_scratch.py [--budget 1200] [--data ZIP] [--arms sweep baseline] [--side-by-side]

Target: the sweep's test top-1 above the baseline's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
PRESET = ROOT / "sweeps" / "cpu" / "scratch.toml"


def _splits(cache: Path) -> dict:
    """The preset's train and test images, sliced as the sweep slices them."""
    from tinyopt.core.config import load_config
    from tinyopt.data.splits import load_sweep_data

    return load_sweep_data(load_config("scratch", PRESET).data, None, str(cache), False).splits


def baseline(cache: Path, budget: float, out: Path) -> None:
    """Arm 2, in its own process: train the fixed recipe for ``budget`` seconds, write its test top-1 to ``out``."""
    started = time.monotonic()
    import keras
    import numpy as np
    from keras import layers

    keras.utils.set_random_seed(0)
    splits = _splits(cache)
    (x, y), (x_test, y_test) = splits["train"], splits["test"]
    image = keras.Input((64, 64, 3), dtype="uint8")
    h = layers.Rescaling(1 / 127.5, offset=-1.0)(keras.ops.cast(image, "float32"))
    h = layers.RandomFlip("horizontal")(h)
    h = layers.RandomTranslation(0.125, 0.125, fill_mode="reflect")(h)
    for filters in (16, 32, 64, 128):
        h = layers.Conv2D(filters, 3, padding="same", use_bias=False)(h)
        h = layers.ReLU()(layers.BatchNormalization()(h))
        h = layers.MaxPooling2D()(h)
    h = layers.GlobalAveragePooling2D()(h)
    model = keras.Model(image, layers.Dense(200, activation="softmax")(h))
    model.compile(keras.optimizers.Adam(2e-3), "sparse_categorical_crossentropy", metrics=["accuracy"])
    x, y = np.asarray(x), np.asarray(y)

    class Budget(keras.callbacks.Callback):
        """A cosine over the epochs that fit the budget, re-planned after every epoch; stop when it is spent."""

        planned, fit_started = 10**6, 0.0

        def on_train_begin(self, logs=None):
            self.fit_started = time.monotonic()

        def on_epoch_begin(self, epoch, logs=None):
            self.model.optimizer.learning_rate = 2e-3 * 0.5 * (1 + math.cos(math.pi * min(epoch / self.planned, 1)))

        def on_train_batch_end(self, batch, logs=None):
            if time.monotonic() - started >= budget:
                self.model.stop_training = True

        def on_epoch_end(self, epoch, logs=None):
            now = time.monotonic()
            per_epoch = (now - self.fit_started) / (epoch + 1)
            self.planned = epoch + 1 + max(int((budget - (now - started)) / per_epoch), 0)
            print(f"  baseline epoch {epoch + 1}/{self.planned}: train top-1 {logs['accuracy']:.3f}, "
                  f"{now - started:.0f} s", flush=True)

    fitted = model.fit(x, y, batch_size=128, epochs=10**6, shuffle=True, verbose=0, callbacks=[Budget()])
    trained = time.monotonic() - started
    top1 = float(np.mean(np.argmax(model.predict(x_test, batch_size=256, verbose=0), axis=1) == y_test))
    out.write_text(json.dumps({"test_top1": top1, "seconds": time.monotonic() - started, "trained": trained,
                               "epochs": len(fitted.history["loss"])}))


def _pinned(core: int | None):
    """A ``preexec_fn`` that keeps a process (and the processes it starts) on one core; None: every core."""
    return None if core is None else (lambda: os.sched_setaffinity(0, {core}))


def _baseline(cache: Path, budget: float, out: Path, core: int | None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, "--budget", str(budget), "--baseline-worker", str(cache),
                             str(out)], env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}, preexec_fn=_pinned(core))


def _start_sweep(cache: Path, budget: float, workdir: Path, log: Path, core: int | None) -> subprocess.Popen:
    command = [sys.executable, "-m", "tinyopt", "sweep", "scratch", "--timeout", str(budget),
               "--config", str(PRESET), "--cache", str(cache), "--storage", f"sqlite:///{workdir}/studies.db",
               "--tracking-uri", f"sqlite:///{workdir}/mlruns/mlflow.db"]
    with log.open("w") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}, preexec_fn=_pinned(core))


def _sweep_result(process: subprocess.Popen, started: float, workdir: Path, log: Path) -> dict:
    import optuna

    code = process.wait()
    seconds = time.perf_counter() - started  # the deadline is held if this is within 5% of the budget
    if code:
        sys.exit(f"the sweep failed (exit {code}); its output is in {log}")
    study = optuna.load_study(study_name="scratch", storage=f"sqlite:///{workdir}/studies.db")
    best = study.best_trial
    states = [t.state.name for t in study.trials]
    return {"seconds": seconds, "test_top1": best.user_attrs["test_top1"], "selection_top1": best.value,
            "trials": len(states), "complete": states.count("COMPLETE"), "pruned": states.count("PRUNED"),
            "best": best.number, "params": best.params}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=1200.0, help="seconds each arm has")
    parser.add_argument("--data", default=str(SHARED / "tiny-imagenet-200-dev.zip"))
    parser.add_argument("--arms", nargs="+", choices=("sweep", "baseline"), default=["sweep", "baseline"])
    parser.add_argument("--log", default="bench_scratch_sweep.log", help="where the sweep's output goes")
    parser.add_argument("--side-by-side", action="store_true",
                        help="run both arms at the same time, each pinned to a core of its own")
    parser.add_argument("--baseline-worker", nargs=2, metavar=("CACHE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline_worker:
        baseline(Path(args.baseline_worker[0]), args.budget, Path(args.baseline_worker[1]))
        return

    from tinyopt.data import build

    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "data"
        build.prepare(args.data, cache, progress=False)
        print(f"budget {args.budget:.0f} s per arm; preset {PRESET.relative_to(ROOT)}", flush=True)
        hand = swept = None
        cores = (0, 1) if args.side_by_side else (None, None)
        out, workdir, log = Path(tmp) / "baseline.json", Path(tmp) / "sweep", Path(args.log).resolve()
        workdir.mkdir()
        if args.side_by_side:
            print("side by side: the baseline on core 0, the sweep on core 1, at the same time", flush=True)
        running = {}
        for arm in ("baseline", "sweep"):
            if arm in args.arms:
                started = time.perf_counter()
                running[arm] = (_baseline(cache, args.budget, out, cores[0]) if arm == "baseline" else
                                _start_sweep(cache, args.budget, workdir, log, cores[1])), started
                if not args.side_by_side:
                    running[arm][0].wait()
        if "baseline" in running:
            if running["baseline"][0].wait():
                sys.exit("the baseline failed; its output is above")
            hand = json.loads(out.read_text())
            print(f"baseline: test top-1 {hand['test_top1']:.4f} in {hand['seconds']:.0f} s "
                  f"(trained {hand['trained']:.0f} s, {hand['epochs']} epochs)", flush=True)
        if "sweep" in running:
            swept = _sweep_result(*running["sweep"], workdir, log)
            print(f"sweep:    test top-1 {swept['test_top1']:.4f} (trial {swept['best']}, selection top-1 "
                  f"{swept['selection_top1']:.4f}) in {swept['seconds']:.0f} s; {swept['trials']} trials, "
                  f"{swept['complete']} complete, {swept['pruned']} pruned; {swept['params']}", flush=True)
        if hand and swept:
            print(f"sweep - baseline: {100 * (swept['test_top1'] - hand['test_top1']):+.1f} points of test top-1 "
                  f"(target > 0)", flush=True)


if __name__ == "__main__":
    main()
