"""Per-epoch checkpoints: what one ``Checkpoints.save`` costs against the epoch it follows.

For each case, the seconds one epoch takes, one ``Checkpoints.save`` (every variable of the trainee and
of its optimizer, with early stopping's best weights as a second copy, as a trial keeps them) and one
``Checkpoints.load``, the checkpoint's size on disk, the share save/epoch, and whether
``train.checkpoint = "auto"`` writes it (an epoch of ``AUTO_SECONDS`` or more):

- ``scratch``: the scratch CPU preset's default trial (``sweeps/cpu/scratch.toml``, its precision
  policy included, except that ``bfloat16`` becomes float32 on a CPU without bfloat16 instructions, as
  the preset advises: ``--precision``), on every train image of the dev zip.
- ``finetune``: the finetune CPU preset's default trial (MobileNet 0.25 with the real weights, one
  trainable stage, ``flip``): the trainee is the part after the frozen stages, on cached activations.
- ``resnet50``: the finetune approach's ResNet50 at 224 px, ``model.weights = none``, its default
  trainable stages and 200-way head, the trial's optimizer (the whole model trains on images: no cache
  without weights). A full epoch is out of reach on a CPU: a few steps at batch 32 are timed and
  extrapolated to the full dataset's train split (90,000 images: 100,000 less the 10% selection split),
  leaving out the scoring of its selection split (10,000 images) each epoch. **An extrapolation.**

Epochs of ``scratch`` and ``finetune`` run as ``ModelObjective._fit`` runs them, after a warm-up ``fit``
(a whole epoch of ``finetune``; two steps of ``scratch``, whose first timed epoch still traces its last,
smaller batch), and are timed as the trial's checkpoint callback times them for ``auto`` (``on_epoch_begin``
to ``on_epoch_end``: training and scoring the selection split). The trial's own ``progress_callback``
checkpoints each of them (``train.checkpoint = "epoch"``): its saves are the "in fit" column. Then
``--saves`` saves and as many loads of the trained trainee are timed, to a temporary folder on this
disk (``save`` fsyncs its arrays; loads follow the saves and so read from the page cache).

    python benchmarks/bench_checkpoint.py [--repeats N] [--saves 5] [--steps 3] [--precision cpu|preset]
        [--cases scratch finetune resnet50]
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
CASES = ("scratch", "finetune", "resnet50")
# The full dataset: 100,000 train images, of which 10% (stratified) is the selection split.
FULL_TRAIN, FULL_SELECTION = 90_000, 10_000
RESNET_BATCH = 32
DEFAULT_REPEATS = {"scratch": 2, "finetune": 5}


@dataclass
class Row:
    case: str
    trainee: str
    epoch_s: float
    epoch_how: str
    save_s: float
    load_s: float
    size_mb: float
    in_fit_s: float | None = None


def _config(approach: str, path: Path, overrides: list[str]):
    from tinyopt.core.config import load_config

    return load_config(approach, path, overrides)


def _bfloat16_cpu() -> bool:
    """Whether this CPU computes in bfloat16 (AMX or AVX-512 BF16), as far as /proc/cpuinfo says."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return True
    return "amx_bf16" in flags or "avx512_bf16" in flags


def _describe(model) -> str:
    import numpy as np

    trainable = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    total = sum(int(np.prod(v.shape)) for v in model.variables)
    return f"{model.name}: {total / 1e6:.2f}M values, {trainable / 1e6:.2f}M trainable, {model.optimizer.name}"


def _checkpoint_costs(model, history: dict, stopping: dict, folder: Path, saves: int) -> tuple[float, float, float]:
    """Median seconds of ``saves`` saves and loads of ``model``'s checkpoint, and its size in MB (10^6 bytes)."""
    from tinyopt.train.checkpoints import Checkpoints

    checkpoints = Checkpoints(folder)
    best = model.get_weights()  # early stopping's restore_best_weights: a second copy of every weight
    saved = []
    for epoch in range(1, saves + 1):  # new epochs: the rotation (the two newest kept) is timed too
        started = time.perf_counter()
        checkpoints.save(model, epoch, history, stopping, best)
        saved.append(time.perf_counter() - started)
    newest = folder / f"epoch-{saves:04d}"
    size = sum(f.stat().st_size for f in newest.iterdir())
    loaded = []
    for _ in range(saves):
        started = time.perf_counter()
        resumed = checkpoints.load(model)
        loaded.append(time.perf_counter() - started)
        if resumed is None or resumed.epoch != saves or resumed.notes or resumed.best_weights is None \
                or len(resumed.best_weights) != len(best):
            raise RuntimeError(f"Checkpoints.load gave {resumed!r} after {saves} saves")
    checkpoints.clear()
    return statistics.median(saved), statistics.median(loaded), size / 1e6


def _trial(case: str, args, tmp: Path) -> Row:
    """A CPU preset's default trial: real epochs through ``fit`` as ``ModelObjective._fit`` runs them."""
    import keras

    from tinyopt.core import space as search_space
    from tinyopt.data.splits import load_sweep_data
    from tinyopt.models.approaches import get_approach
    from tinyopt.objectives.callbacks import progress_callback
    from tinyopt.objectives.model import ModelObjective
    from tinyopt.train import backend
    from tinyopt.train.checkpoints import Checkpoints
    from tinyopt.train.training import build_model, compile_model, lr_at_epoch

    overrides = [] if case == "scratch" else [f"model.weights={args.weights}"]
    config = _config(case, ROOT / "sweeps" / "cpu" / f"{case}.toml", overrides)
    changed = ""
    if config.train.mixed_precision == "bfloat16" and args.precision == "cpu" and not _bfloat16_cpu():
        # As the preset itself says for a CPU without bfloat16 instructions: bfloat16 is emulated there.
        config = _config(case, ROOT / "sweeps" / "cpu" / f"{case}.toml", [*overrides, "train.mixed_precision=off"])
        changed = " (the preset's bfloat16 set off: no bfloat16 instructions on this CPU)"
    params = search_space.defaults(config.space)
    data = load_sweep_data(config.data, args.data, str(tmp / "data"), progress=False)
    backend.free_memory()
    keras.utils.set_random_seed(0)
    module = get_approach(case)
    model, policy, batch = build_model(module, params, config, data.wnids, "cpu")
    objective = ModelObjective(module, config, data, tracker=None, seed=0)
    feed, _ = objective._feed(model, params, policy)
    trainee = feed.trainee()
    compile_model(trainee, params, config.train.jit_compile)
    fed = "cached activations" if trainee is not model else "images"
    images = len(data.splits["train"][1])

    class Timer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.seconds: list[float] = []

        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds.append(time.perf_counter() - self.started)

    # Early stopping as the trial has it (its patience out of the way: every timed epoch runs).
    stopping = keras.callbacks.EarlyStopping(monitor="val_accuracy", mode="max", restore_best_weights=True,
                                             patience=10**6, start_from_epoch=0)
    timer = Timer()
    progress = progress_callback(Checkpoints(tmp / f"{case}-fit"), "epoch", stopping)
    train, steps = feed.training(int(params["batch_size"]), seed=0)
    selection = feed.batches("selection", batch)
    # Warm-up: a whole epoch where epochs are short, else two training steps and one scoring step (the
    # last, smaller batch of an epoch is then traced, or compiled under JAX, in the first timed epoch).
    warm = {} if case == "finetune" else {"steps_per_epoch": 2, "validation_steps": 1}
    trainee.fit(train, **{"steps_per_epoch": steps, **warm}, validation_data=selection, verbose=0, shuffle=False)
    repeats = args.repeats or DEFAULT_REPEATS[case]
    trainee.fit(train, steps_per_epoch=steps, validation_data=selection, epochs=repeats, verbose=0,
                shuffle=False,
                callbacks=[keras.callbacks.LearningRateScheduler(lr_at_epoch(params)), stopping, timer, progress])
    epoch_s = statistics.median(timer.seconds)
    state = {key: getattr(stopping, key) for key in ("wait", "best", "best_epoch", "stopped_epoch")}
    save_s, load_s, size_mb = _checkpoint_costs(trainee, progress.history, state, tmp / case, args.saves)
    Checkpoints(tmp / f"{case}-fit").clear()
    desc = (f"{_describe(trainee)}, {policy}{changed}, batch {params['batch_size']}, {images:,} train images ({fed}) "
            f"+ {len(data.splits['selection'][1]):,} selection")
    return Row(case, desc, epoch_s, f"measured: median of {repeats} epochs, "
               f"{', '.join(f'{t:.2f}' for t in timer.seconds)} s", save_s, load_s, size_mb,
               statistics.median(progress.saves))


def _resnet(args, tmp: Path) -> Row:
    """ResNet50 at 224 px, weights none: training and scoring steps timed, a full epoch extrapolated."""
    import keras
    import numpy as np

    from tinyopt.core import space as search_space
    from tinyopt.data.splits import load_sweep_data
    from tinyopt.models.approaches import get_approach
    from tinyopt.train import backend
    from tinyopt.train.training import build_model, compile_model

    config = _config("finetune", ROOT / "sweeps" / "finetune.toml", ["model.backbone=resnet50", "model.weights=none"])
    params = {**search_space.defaults(config.space), "input_size": 224}
    wnids = load_sweep_data(_config("finetune", ROOT / "sweeps" / "cpu" / "finetune.toml", []).data,
                            args.data, str(tmp / "data"), progress=False).wnids
    backend.free_memory()
    keras.utils.set_random_seed(0)
    model, policy, _ = build_model(get_approach("finetune"), params, config, wnids, "cpu")
    compile_model(model, params, config.train.jit_compile)
    model.optimizer.build(model.trainable_variables)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (RESNET_BATCH, *model.inputs[0].shape[1:]), dtype=np.uint8)
    y = rng.integers(0, len(wnids), (RESNET_BATCH,))

    def timed(step, count: int) -> float:
        step()  # warm-up: tracing
        seconds = []
        for _ in range(count):
            started = time.perf_counter()
            step()
            seconds.append(time.perf_counter() - started)
        return statistics.median(seconds)

    train_s = timed(lambda: model.train_on_batch(x, y), args.steps)
    epoch_s = FULL_TRAIN / RESNET_BATCH * train_s  # the selection split scored each epoch left out: longer still
    history = {"loss": [1.0], "accuracy": [0.1], "val_loss": [1.0], "val_accuracy": [0.1]}
    state = {"wait": 0, "best": 0.1, "best_epoch": 0, "stopped_epoch": 0}
    save_s, load_s, size_mb = _checkpoint_costs(model, history, state, tmp / "resnet50", args.saves)
    desc = (f"{_describe(model)}, {policy}, trainable_stages {params['trainable_stages']}, images at 224 px; "
            f"random uint8 images")
    how = (f"EXTRAPOLATED: median of {args.steps} training steps of {RESNET_BATCH} ({train_s:.2f} s) "
           f"x {FULL_TRAIN:,}/{RESNET_BATCH} steps; scoring the {FULL_SELECTION:,} selection images left out")
    return Row("resnet50", desc, epoch_s, how, save_s, load_s, size_mb)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(SHARED / "tiny-imagenet-200-dev.zip"))
    parser.add_argument("--weights", default=str(SHARED / "mobilenet_2_5_128_tf.h5"))
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--repeats", type=int, default=None,
                        help="epochs timed per case, after a warm-up of 2 steps (default: 2 for scratch, whose "
                             "epochs last minutes on 2 cores; 5 for finetune)")
    parser.add_argument("--saves", type=int, default=5, help="saves and loads timed per case (at least 5)")
    parser.add_argument("--steps", type=int, default=3, help="ResNet50 training steps timed, after a warm-up one")
    parser.add_argument("--precision", choices=("cpu", "preset"), default="cpu",
                        help="cpu: float32 where the preset asks for bfloat16 and this CPU lacks bfloat16 "
                             "instructions (emulated, 9x slower here); preset: as the preset says")
    args = parser.parse_args()
    args.saves = max(args.saves, 5)

    import keras

    from tinyopt.train.checkpoints import AUTO_SECONDS

    started = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        for case in args.cases:
            rows.append(_resnet(args, Path(tmp)) if case == "resnet50" else _trial(case, args, Path(tmp)))
            print(f"[{case} done at {time.perf_counter() - started:.0f} s]", flush=True)
        where = tmp
    print(f"\n$ {shlex.join(['python', *sys.argv])}")
    print(f"Keras {keras.__version__}, backend {keras.backend.backend()}, {os.cpu_count()} CPU cores, "
          f"checkpoints under {Path(where).parent}; save/load: medians of {args.saves}; MB = 10^6 bytes\n")
    print(f"{'case':9s} {'epoch s':>9s} {'save s':>7s} {'in fit':>7s} {'load s':>7s} {'MB':>7s} "
          f"{'save/epoch':>10s}  auto (epoch >= {AUTO_SECONDS:g} s)")
    for row in rows:
        in_fit = "-" if row.in_fit_s is None else f"{row.in_fit_s:.3f}"
        print(f"{row.case:9s} {row.epoch_s:9.2f} {row.save_s:7.3f} {in_fit:>7s} {row.load_s:7.3f} "
              f"{row.size_mb:7.1f} {row.save_s / row.epoch_s:10.4f}  "
              f"{'writes' if row.epoch_s >= AUTO_SECONDS else 'skips'}")
    print()
    for row in rows:
        print(f"{row.case}: {row.trainee}\n    epoch: {row.epoch_how}")
    print(f"\n'in fit': the median save by the trial's progress_callback during the timed epochs. "
          f"{time.perf_counter() - started:.0f} s in all.")


if __name__ == "__main__":
    main()
