"""Per-trial overhead of tinyopt against a bare ``model.fit`` of the same model and data.

Both sides build the same scratch CNN from the same params, train it for the same epochs on the
same arrays, and predict the selection and test splits. tinyopt adds the Optuna storage, the MLflow
run (params, per-epoch metrics, predictions, learning curve, kept model), the tf.data pipeline and
pruning. The two are run alternately, several times, and the medians are compared in one run; so
is the median of each pair's ratio, which a load that changes between pairs moves less.

The trial's MLflow logging runs in the background and is stored while the next trial trains; with
one trial it is waited for when the sweep ends, so it counts in the whole command, not the trial.

    python benchmarks/bench_trial_overhead.py [--data ../shared/data/tiny-imagenet-200-dev.zip] [--repeats 3]

Target: tinyopt trial time / bare fit time <= 1.02 (a 30 s trial).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

PARAMS = {"stages": 3, "width": 16, "blocks": 1, "residual": False, "batch_norm": True, "dropout": 0.2,
          "initializer": "he_normal", "augment": "flip", "optimizer": "sgd", "learning_rate": 0.05, "momentum": 0.9,
          "weight_decay": 5e-4, "decay": "cosine", "warmup_epochs": 0, "batch_size": 128, "label_smoothing": 0.1,
          "epochs": 3}
DEV_ZIP = Path(__file__).resolve().parents[2] / "shared" / "data" / "tiny-imagenet-200-dev.zip"
DATA = {"data.train_per_class": 15, "data.selection_per_class": 5, "data.test_per_class": 10}
TARGET = 1.02


def _bare(sweep_data) -> float:
    import keras

    from tinyopt.models.approaches import get_approach
    from tinyopt.train.training import compile_model

    keras.backend.clear_session(free_memory=True)
    keras.utils.set_random_seed(0)
    started = time.perf_counter()
    model = get_approach("scratch").build(PARAMS, model={}, wnids=sweep_data.wnids)
    compile_model(model, PARAMS)
    x, y = sweep_data.splits["train"]
    sx, sy = sweep_data.splits["selection"]
    model.fit(x, y, batch_size=PARAMS["batch_size"], epochs=PARAMS["epochs"], validation_data=(sx, sy),
              shuffle=True, verbose=0)
    for split in ("selection", "test"):
        model.predict(sweep_data.splits[split][0], batch_size=256, verbose=0)
    return time.perf_counter() - started


def _tinyopt(source: str, cache: str, workdir: Path, index: int) -> tuple[float, float]:
    import optuna

    from tinyopt.sweep.runner import run_sweep

    storage = f"sqlite:///{workdir}/studies-{index}.db"
    started = time.perf_counter()
    run_sweep("scratch", trials=1, source=source, cache_dir=cache, storage=storage,
              tracking_uri=f"sqlite:///{workdir}/mlruns-{index}/mlflow.db", progress=False,
              overrides=tuple(f"{k}={v}" for k, v in DATA.items()) + tuple(
                  f"space.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in PARAMS.items()))
    total = time.perf_counter() - started
    trial = optuna.load_study(study_name="scratch", storage=storage).trials[0]
    return (trial.datetime_complete - trial.datetime_start).total_seconds(), total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEV_ZIP))
    parser.add_argument("--cache", default=None)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from tinyopt.core.config import load_config
    from tinyopt.data.splits import load_sweep_data

    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache or str(Path(tmp) / "cache")
        config = load_config("scratch", overrides=[f"{k}={v}" for k, v in DATA.items()])
        sweep_data = load_sweep_data(config.data, args.data, cache, progress=False)
        sizes = {k: len(v[1]) for k, v in sweep_data.splits.items()}
        print(f"scratch CNN {PARAMS['stages']} stages x width {PARAMS['width']}, {PARAMS['epochs']} epochs, "
              f"splits {sizes}")
        _bare(sweep_data)  # warm-up: first TF graph build and thread pools
        bare, trial, total = [], [], []
        for index in range(args.repeats):
            bare.append(_bare(sweep_data))
            in_trial, whole = _tinyopt(args.data, cache, Path(tmp), index)
            trial.append(in_trial)
            total.append(whole)
            print(f"run {index}: bare fit {bare[-1]:.2f} s, tinyopt trial {in_trial:.2f} s, "
                  f"whole `sweep --trials 1` {whole:.2f} s")
        b, t, w = statistics.median(bare), statistics.median(trial), statistics.median(total)
        paired = statistics.median(tried / fit for tried, fit in zip(trial, bare, strict=True))
        print(f"median bare fit {b:.2f} s | tinyopt trial {t:.2f} s -> ratio {t / b:.3f}, "
              f"median of paired ratios {paired:.3f} (target <= {TARGET})")
        print(f"whole sweep command incl. study/storage/MLflow setup and data load: ratio {w / b:.3f}")


if __name__ == "__main__":
    main()
