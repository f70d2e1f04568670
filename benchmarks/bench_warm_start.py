"""Does a warm start pay? The finetune CPU preset on a changed slice, cold and warm from the earlier study.

Runs, as a user runs them (subprocesses sharing one study storage and one MLflow store):

    tinyopt sweep finetune --preset cpu --trials 10 --study earlier --set model.weights=WEIGHTS
    tinyopt sweep finetune --preset cpu --trials 10 --study cold --set model.weights=WEIGHTS --set data.seed=1
    tinyopt sweep finetune --preset cpu --trials 10 --study warm --set model.weights=WEIGHTS --set data.seed=1 \\
        --warm-start earlier

``data.seed = 1`` draws another stratified slice of every split (train, selection and test: the same
sizes, other images). The cold and warm sweeps run at the same time (only their scores are compared).
Printed: each study's selection top-1 by trial and its best so far, side by side (the warm trials
marked with the earlier trial they took their params from), then the best trial's test top-1.

    python benchmarks/bench_warm_start.py [--trials 10] [--seed 0] [--changed data.seed=1] [--keep DIR]

Target: the warm study's best so far at or above the cold one's at every trial, and above it over
the first half.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import preset_runs


def _command(study: str, args, cache: Path, workdir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "tinyopt", "sweep", "finetune", "--preset", "cpu", "--trials", str(args.trials),
            "--seed", str(args.seed), "--study", study, "--cache", str(cache),
            "--storage", f"sqlite:///{workdir}/studies.db", "--tracking-uri", f"sqlite:///{workdir}/mlruns/mlflow.db",
            "--set", f"model.weights={args.weights}", *extra]


def _run(commands: dict[str, list[str]], workdir: Path) -> None:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    started = time.perf_counter()
    logs = {name: open(workdir / f"{name}.log", "w") for name in commands}  # noqa: SIM115
    processes = {name: subprocess.Popen(command, stdout=logs[name], stderr=subprocess.STDOUT, env=env)
                 for name, command in commands.items()}
    failed = [name for name, process in processes.items() if process.wait()]
    for log in logs.values():
        log.close()
    if failed:
        sys.exit(f"the {', '.join(failed)} sweep failed; see the logs in {workdir} (--keep DIR keeps them)")
    print(f"{' and '.join(commands)}: {time.perf_counter() - started:.0f} s", flush=True)


def main() -> None:
    parser = preset_runs.parser(__doc__.splitlines()[0])
    parser.add_argument("--changed", default="data.seed=1", help="the --set that changes the slice")
    args = parser.parse_args()

    import optuna

    from tinyopt.core import record

    with preset_runs.folders(args) as (workdir, cache):
        _run({"earlier": _command("earlier", args, cache, workdir)}, workdir)
        changed = ("--set", args.changed)
        _run({"cold": _command("cold", args, cache, workdir, *changed),
              "warm": _command("warm", args, cache, workdir, *changed, "--warm-start", "earlier")}, workdir)
        storage = f"sqlite:///{workdir}/studies.db"
        studies = {name: optuna.load_study(study_name=name, storage=storage) for name in ("earlier", "cold", "warm")}
        print(f"earlier study (the first slice): best trial {studies['earlier'].best_trial.number}, selection top-1 "
              f"{studies['earlier'].best_value:.4f}; then {args.changed}", flush=True)
        print(f"{'trial':>5} | {'cold':>6} {'best':>6} | {'warm':>6} {'best':>6} | warm trial's params from")
        best = {"cold": [], "warm": []}
        trials = {name: studies[name].get_trials(deepcopy=False) for name in best}
        for number in range(args.trials):
            cells = []
            for name in best:
                trial = trials[name][number] if number < len(trials[name]) else None
                value = trial.value if trial is not None and trial.state.name == "COMPLETE" else None
                best[name].append(max([v for v in (value, *best[name][-1:]) if v is not None], default=None))
                shown = "pruned" if trial is not None and trial.state.name == "PRUNED" else _cell(value)
                cells.append(f"{shown:>6} {_cell(best[name][-1]):>6}")
            source = trials["warm"][number].user_attrs.get(record.WARM_START_FROM) if number < len(trials["warm"]) \
                else None
            origin = f"earlier trial {source['trial']}" if source else ("defaults" if number == 0 else "sampler")
            print(f"{number:>5} | {cells[0]} | {cells[1]} | {origin}", flush=True)
        for name in best:
            top = studies[name].best_trial
            print(f"{name}: best trial {top.number}, selection top-1 {top.value:.4f}, test top-1 "
                  f"{top.user_attrs[record.TEST_TOP1]:.4f}", flush=True)
        half = args.trials // 2 - 1
        print(f"best so far, warm - cold: after trial {half} {100 * (best['warm'][half] - best['cold'][half]):+.2f} "
              f"points, after trial {args.trials - 1} {100 * (best['warm'][-1] - best['cold'][-1]):+.2f} points of "
              "selection top-1", flush=True)


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


if __name__ == "__main__":
    main()
