"""How long ``tinyopt --help`` and ``tinyopt sweep --help`` take to start, beside another checkout's.

Every import at the top of a module is paid by every command; the heavy ones (keras, TensorFlow,
JAX, mlflow, optuna, sklearn, scipy, matplotlib) are kept inside the functions that need them, so
that a command's help comes at once. This times the two commands in fresh processes, alternating
this checkout and ``--other`` (another checkout's root, e.g. a ``git worktree`` of an earlier
commit), and prints the medians side by side::

    git worktree add /tmp/landed 6c73ca5
    python benchmarks/bench_startup.py --other /tmp/landed --repeats 15
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _seconds(root: Path, args: list[str]) -> float:
    env = {**os.environ, "PYTHONPATH": str(root)}  # ahead of the installed (editable) tinyopt
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "tinyopt", *args], cwd=root, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"tinyopt {' '.join(args)} failed in {root}: {done.stderr.strip()[-300:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--other", type=Path, help="another checkout's root to compare with")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    roots = {"this": ROOT, **({"other": args.other.resolve()} if args.other else {})}
    commands = {"--help": ["--help"], "sweep --help": ["sweep", "--help"]}
    times = {(name, command): [] for name in roots for command in commands}
    for _ in range(args.repeats):
        for command, argv in commands.items():
            for name, root in roots.items():  # alternated, so that a busy moment hits both alike
                times[name, command].append(_seconds(root, argv))
    print(f"median of {args.repeats} fresh processes, seconds")
    for command in commands:
        medians = {name: statistics.median(times[name, command]) for name in roots}
        line = "  ".join(f"{name} {value:.3f}" for name, value in medians.items())
        ratio = f"  this/other {medians['this'] / medians['other']:.2f}" if "other" in medians else ""
        print(f"tinyopt {command:<14} {line}{ratio}")


if __name__ == "__main__":
    main()
