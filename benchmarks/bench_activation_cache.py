"""A finetune trial on cached frozen activations against a plain Keras ``fit`` through the frozen backbone.

Both sides build the same finetune model (MobileNet v1 alpha 0.25 with its real ImageNet weights,
128 px, the CPU preset's data slice) from the same params, train it for the same epochs with
validation on the selection split, and predict the selection and test splits. The plain side runs
``model.fit`` on the uint8 arrays through the whole model; tinyopt runs one trial of ``tinyopt sweep``
(MLflow run and Optuna storage included), first with an empty activation cache, then again with the
cache the first trial left. Run alternately, ``--repeats`` times; medians are compared in one run.

    python benchmarks/bench_activation_cache.py [--stages 0 1] [--augment flip] [--repeats 3]

Targets: trainable_stages = 0: first trial >= 4x faster, second >= 20x; trainable_stages = 1: >= 1.5x.
The script also prints the most a first trial can gain from the split sizes: the frozen layers must
still see every image (and, with flip, its mirror image) once.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
PRESET = Path(__file__).resolve().parents[1] / "sweeps" / "cpu" / "finetune.toml"
PARAMS = {"head_init": "pretrained", "head_width": 0, "dropout": 0.2, "resize": "bilinear", "input_size": 128,
          "optimizer": "adam", "learning_rate": 1e-3, "momentum": 0.9, "weight_decay": 1e-4, "decay": "cosine",
          "warmup_epochs": 0, "batch_size": 64, "label_smoothing": 0.1, "epochs": 5}


def _overrides(weights: str, params: dict) -> list[str]:
    # Every value fixed, so that both sides and every repeat train the same model; early stopping and
    # pruning off, so that every trial trains all its epochs.
    fixed = [f"space.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in params.items()]
    return [f"model.weights={weights}", "train.early_stopping_patience=100", "study.pruner=none", *fixed]


def _plain(sweep_data, config: dict, params: dict) -> float:
    import keras

    from tinyopt.models.approaches import get_approach
    from tinyopt.train.training import compile_model

    keras.backend.clear_session(free_memory=True)
    keras.utils.set_random_seed(0)
    started = time.perf_counter()
    model = get_approach("finetune").build(params, model=config.model, wnids=sweep_data.wnids)
    compile_model(model, params)
    x, y = sweep_data.splits["train"]
    sx, sy = sweep_data.splits["selection"]
    batch = int(config.train.eval_batch_size)
    model.fit(x, y, batch_size=params["batch_size"], epochs=params["epochs"], validation_data=(sx, sy),
              validation_batch_size=batch, shuffle=True, verbose=0)
    for split in ("selection", "test"):
        model.predict(sweep_data.splits[split][0], batch_size=batch, verbose=0)
    return time.perf_counter() - started


def _trial(source: str, cache: str, workdir: Path, name: str, overrides: list[str]) -> tuple[float, str]:
    import optuna

    from tinyopt.sweep.runner import run_sweep
    from tinyopt.track.store import get_run

    storage, tracking = f"sqlite:///{workdir}/{name}.db", f"sqlite:///{workdir}/mlruns-{name}/mlflow.db"
    run_sweep("finetune", trials=1, source=source, cache_dir=cache, storage=storage, tracking_uri=tracking,
              config_path=str(PRESET), progress=False, overrides=tuple(overrides))
    trial = optuna.load_study(study_name="finetune", storage=storage).trials[-1]
    if trial.state != optuna.trial.TrialState.COMPLETE:
        raise SystemExit(f"trial {trial.number} ended {trial.state.name}: {trial.user_attrs}")
    tag = get_run(trial.user_attrs["mlflow_run_id"], tracking).data.tags.get("activation_cache")
    return (trial.datetime_complete - trial.datetime_start).total_seconds(), tag


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(SHARED / "tiny-imagenet-200-dev.zip"))
    parser.add_argument("--weights", default=str(SHARED / "mobilenet_2_5_128_tf.h5"))
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--augment", default="flip")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from tinyopt.core.config import load_config
    from tinyopt.data.splits import load_sweep_data

    with tempfile.TemporaryDirectory() as tmp:
        data_cache = str(Path(tmp) / "data")
        base = load_config("finetune", str(PRESET), _overrides(args.weights, PARAMS))
        sweep_data = load_sweep_data(base.data, args.data, data_cache, progress=False)
        print(f"finetune {base['model']['backbone']} alpha {base['model']['alpha']}, {PARAMS['input_size']} px, "
              f"augment {args.augment}, {PARAMS['epochs']} epochs, splits "
              f"{ {k: len(v[1]) for k, v in sweep_data.splits.items()} }")
        sizes = {split: len(labels) for split, (_, labels) in sweep_data.splits.items()}
        views = 2 if args.augment == "flip" else 1
        # Images pushed through the frozen layers: every epoch's train and validation images, then the
        # two predictions, against each view of the train images and each scored image once. The ratio
        # is the most the cache can gain on a first trial, if training the rest cost nothing.
        plain_images = PARAMS["epochs"] * (sizes["train"] + sizes["selection"]) + sizes["selection"] + sizes["test"]
        cached_images = views * sizes["train"] + sizes["selection"] + sizes["test"]
        print(f"images through the frozen layers: plain fit {plain_images}, first cached trial {cached_images} "
              f"-> a first trial gains at most {plain_images / cached_images:.1f}x", flush=True)
        for stages in args.stages:
            params = {**PARAMS, "trainable_stages": stages, "augment": args.augment}
            overrides = _overrides(args.weights, params)
            config = load_config("finetune", str(PRESET), overrides)
            _plain(sweep_data, config, params)  # warm-up: first graph builds, thread pools, weights loaded
            plain, first, second = [], [], []
            for index in range(args.repeats):
                # A fresh activation cache for each repeat: the data cache's activations folder is emptied.
                for stale in (Path(data_cache) / "activations").glob("*"):
                    stale.unlink()
                plain.append(_plain(sweep_data, config, params))
                seconds, tag1 = _trial(args.data, data_cache, Path(tmp), f"s{stages}-{index}", overrides)
                first.append(seconds)
                seconds, tag2 = _trial(args.data, data_cache, Path(tmp), f"s{stages}-{index}", overrides)
                second.append(seconds)
                print(f"trainable_stages={stages} run {index}: plain fit {plain[-1]:.2f} s, tinyopt first trial "
                      f"{first[-1]:.2f} s (cache {tag1}), second trial {second[-1]:.2f} s (cache {tag2})", flush=True)
            p, f, s = statistics.median(plain), statistics.median(first), statistics.median(second)
            print(f"trainable_stages={stages}: median plain {p:.2f} s | first trial {f:.2f} s -> {p / f:.1f}x | "
                  f"second trial {s:.2f} s -> {p / s:.1f}x", flush=True)


if __name__ == "__main__":
    main()
