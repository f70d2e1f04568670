"""Whole CPU-preset sweeps side by side: pruning on and off, the activation cache on and off.

Each variant is one `tinyopt sweep <approach> --config sweeps/cpu/<approach>.toml --trials N --seed S`
run as a user runs it (a subprocess, its own study and MLflow store), with an empty activation cache
at its start. Printed per variant: wall time, best selection top-1 (and that trial's test top-1),
epochs trained in all (every epoch a trial reported), trials pruned. Ratios are against the first
variant of each group.

    python benchmarks/bench_sweeps.py pruning [--approaches finetune scratch] [--variants none median halving halving4]
    python benchmarks/bench_sweeps.py cache [--approaches finetune pretrained] [--variants off on] [--trials 20]

Targets: pruning reaches a best selection top-1 within 1 point of no pruning with at most half the
epochs; the cache makes the same sweep faster with the same best top-1 within noise.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
VARIANTS = {  # group -> variant -> (what it is, its overrides)
    "pruning": {
        "none": ("no pruning", ("study.pruner=none",)),
        "median": ("median, judged from epoch 1", ("study.pruner=median", "study.pruner_warmup_epochs=0")),
        "halving": ("halving, judged from epoch 1", ("study.pruner=halving", "study.pruner_warmup_epochs=0",
                                                     "study.pruner_reduction_factor=3")),
        "halving4": ("halving 1 in 4, from epoch 1", ("study.pruner=halving", "study.pruner_warmup_epochs=0",
                                                      "study.pruner_reduction_factor=4")),
    },
    "cache": {
        "off": ("without the activation cache", ("train.activation_cache=false",)),
        "on": ("with the activation cache", ("train.activation_cache=true",)),
    },
}


def _sweep(approach: str, trials: int, seed: int, overrides: tuple[str, ...], data_cache: Path, workdir: Path,
           weights: str) -> dict:
    import optuna

    shutil.rmtree(data_cache / "activations", ignore_errors=True)
    storage = f"sqlite:///{workdir}/studies.db"
    command = [sys.executable, "-m", "tinyopt", "sweep", approach, "--trials", str(trials), "--seed", str(seed),
               "--config", str(ROOT / "sweeps" / "cpu" / f"{approach}.toml"), "--cache", str(data_cache),
               "--storage", storage, "--tracking-uri", f"sqlite:///{workdir}/mlruns/mlflow.db"]
    if approach != "scratch":
        command += ["--set", f"model.weights={weights}"]
    for item in overrides:
        command += ["--set", item]
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    seconds = time.perf_counter() - started
    study = optuna.load_study(study_name=approach, storage=storage)
    best = study.best_trial
    return {"seconds": seconds, "best": best.value, "test": best.user_attrs.get("test_top1"),
            "epochs": sum(len(t.intermediate_values) for t in study.trials),
            "pruned": sum(t.state == optuna.trial.TrialState.PRUNED for t in study.trials)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("group", choices=sorted(VARIANTS))
    parser.add_argument("--approaches", nargs="+", default=None)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", default=str(SHARED / "tiny-imagenet-200-dev.zip"))
    parser.add_argument("--weights", default=str(SHARED / "mobilenet_2_5_128_tf.h5"))
    parser.add_argument("--variants", nargs="+", default=None,
                        help="run only these variants of the group (default: all, in order)")
    parser.add_argument("--set", dest="extra", action="append", default=[], help="an override for every variant")
    args = parser.parse_args()
    approaches = args.approaches or (["finetune", "scratch"] if args.group == "pruning" else ["finetune", "pretrained"])

    from tinyopt.data import build

    with tempfile.TemporaryDirectory() as tmp:
        data_cache = Path(tmp) / "data"
        build.prepare(args.data, data_cache, progress=False)
        for approach in approaches:
            print(f"{approach}: {args.trials} trials of sweeps/cpu/{approach}.toml, seed {args.seed}", flush=True)
            first = None
            chosen = args.variants or list(VARIANTS[args.group])
            for index, variant in enumerate(chosen):
                name, overrides = VARIANTS[args.group][variant]
                workdir = Path(tmp) / f"{approach}-{index}"
                workdir.mkdir()
                result = _sweep(approach, args.trials, args.seed, (*overrides, *args.extra), data_cache, workdir,
                                args.weights)
                first = first or result
                print(f"  {name:32s} {result['seconds']:7.1f} s ({result['seconds'] / first['seconds']:.2f}x time) | "
                      f"best selection top-1 {result['best']:.4f} ({100 * (result['best'] - first['best']):+.1f} pt), "
                      f"its test top-1 {result['test']:.4f} | {result['epochs']} epochs "
                      f"({result['epochs'] / max(first['epochs'], 1):.2f}x), {result['pruned']} pruned", flush=True)


if __name__ == "__main__":
    main()
