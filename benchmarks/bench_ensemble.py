"""Does the ensemble pay? The CPU presets' sweeps, then the ensemble study over their best trials.

Runs, as a user runs them (subprocesses sharing one study storage and one MLflow store):

    tinyopt sweep pretrained --trials 10 --config sweeps/cpu/pretrained.toml --set model.weights=WEIGHTS
    tinyopt sweep finetune   --trials 10 --config sweeps/cpu/finetune.toml   --set model.weights=WEIGHTS
    tinyopt sweep scratch    --trials 10 --config sweeps/cpu/scratch.toml
    tinyopt sweep ensemble   --trials 30                                     (sweeps/ensemble.toml defaults)

The three approach sweeps run at the same time (only their scores are compared, not their times).
Printed for the ensemble's best trial, on selection and on test: the weighted vote, the best member
(the one with the best selection score) and the uniform vote, and the differences in test top-1.

    python benchmarks/bench_ensemble.py [--trials 10] [--ensemble-trials 30] [--seed 0] [--keep DIR]

Target: test top-1 of the ensemble at least 1 point above the best member's.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import preset_runs

ROOT = Path(__file__).resolve().parents[1]
APPROACHES = ("pretrained", "finetune", "scratch")


def _command(approach: str, trials: int, seed: int, cache: Path, workdir: Path, weights: str) -> list[str]:
    command = [sys.executable, "-m", "tinyopt", "sweep", approach, "--trials", str(trials), "--seed", str(seed),
               "--cache", str(cache), "--storage", f"sqlite:///{workdir}/studies.db",
               "--tracking-uri", f"sqlite:///{workdir}/mlruns/mlflow.db"]
    if approach != "ensemble":
        command += ["--config", str(ROOT / "sweeps" / "cpu" / f"{approach}.toml")]
    if approach in ("pretrained", "finetune"):
        command += ["--set", f"model.weights={weights}"]
    return command


def main() -> None:
    parser = preset_runs.parser(__doc__.splitlines()[0])
    parser.add_argument("--ensemble-trials", type=int, default=30)
    args = parser.parse_args()

    import optuna

    from tinyopt.core import record

    with preset_runs.folders(args) as (workdir, cache):
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
        started = time.perf_counter()
        logs = {a: open(workdir / f"{a}.log", "w") for a in (*APPROACHES, "ensemble")}  # noqa: SIM115
        sweeps = [subprocess.Popen(_command(a, args.trials, args.seed, cache, workdir, args.weights),
                                   stdout=logs[a], stderr=subprocess.STDOUT, env=env) for a in APPROACHES]
        if any(process.wait() for process in sweeps):
            sys.exit(f"an approach sweep failed; see the logs in {workdir} (--keep DIR keeps them)")
        print(f"approach sweeps: {time.perf_counter() - started:.0f} s", flush=True)
        subprocess.run(_command("ensemble", args.ensemble_trials, args.seed, cache, workdir, args.weights),
                       stdout=logs["ensemble"], stderr=subprocess.STDOUT, env=env, check=True)
        storage = f"sqlite:///{workdir}/studies.db"
        for approach in APPROACHES:
            study = optuna.load_study(study_name=approach, storage=storage)
            best = study.best_trial
            print(f"{approach:10s} best trial {best.number}: selection top-1 {best.value:.4f}, "
                  f"test top-1 {best.user_attrs['test_top1']:.4f}", flush=True)
        ensemble = optuna.load_study(study_name="ensemble", storage=storage)
        best, greedy = ensemble.best_trial, ensemble.trials[0]
        attrs = best.user_attrs
        rows = {"ensemble": attrs, f"best member ({attrs[record.BEST_MEMBER]['label']})": attrs[record.BEST_MEMBER],
                "uniform vote": attrs[record.UNIFORM]}
        print(f"ensemble study: best trial {best.number} of {len(ensemble.trials)} (trial 0, the greedy "
              f"selection: {greedy.value:.4f}; best {best.value:.4f})", flush=True)
        for name, scores in rows.items():
            print(f"  {name:28s} selection top-1 {scores['selection_top1']:.4f}, log loss "
                  f"{scores.get('selection_log_loss', float('nan')):.4f} | test top-1 {scores['test_top1']:.4f}, "
                  f"log loss {scores.get('test_log_loss', float('nan')):.4f}", flush=True)
        for member in attrs[record.MEMBERS]:
            print(f"  member {member['label']:16s} weight {member['weight']:.3f}, temperature "
                  f"{member.get('temperature', float('nan')):.3g}, test top-1 {member['test_top1']:.4f}", flush=True)
        test = attrs["test_top1"]
        print(f"ensemble - best member: {100 * (test - attrs[record.BEST_MEMBER]['test_top1']):+.2f} points of test "
              f"top-1 (target >= +1); ensemble - uniform vote: "
              f"{100 * (test - attrs[record.UNIFORM]['test_top1']):+.2f} points", flush=True)
        for log in logs.values():
            log.close()


if __name__ == "__main__":
    main()
