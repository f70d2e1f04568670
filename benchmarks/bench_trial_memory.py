"""Resident memory across the trials of one sweep, in one process and with --trials-per-process.

Runs a scratch sweep of small trials (different params each, as a real study does) in this process
and prints the RSS after every trial and the growth per trial over the second half, beside the peak
RSS of the worker processes of the same number of trials run by `tinyopt sweep --trials-per-process K`.

    python benchmarks/bench_trial_memory.py [--data ../shared/data/tiny-imagenet-200-dev.zip] [--trials 20]
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from tinyopt.objectives import QuietEvents

DEV_ZIP = Path(__file__).resolve().parents[2] / "shared" / "data" / "tiny-imagenet-200-dev.zip"
# Small trials whose params still vary (optimizer, batch norm, augmentation, ...) as in a real study.
SMALL = ("data.train_per_class=5", "data.selection_per_class=2", "data.test_per_class=2", "space.epochs=1",
         "space.stages=2", "space.width=16", "space.blocks=1", "train.eval_batch_size=256")


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


class RecordRss(QuietEvents):
    def __init__(self):
        self.rss: list[float] = []

    def trial_ended(self, number, state, value, reason):
        self.rss.append(rss_mib())
        print(f"trial {number:2d} {state:8s} RSS {self.rss[-1]:7.1f} MiB", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEV_ZIP))
    parser.add_argument("--cache", default=None)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--trials-per-process", type=int, default=5)
    args = parser.parse_args()

    # Workers first, while this process is small: a child forked from a large parent would count
    # the parent's pages in its peak RSS.
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "tinyopt", "sweep", "scratch", "--trials", str(args.trials),
                   "--trials-per-process", str(args.trials_per_process), "--data", args.data,
                   "--cache", args.cache or f"{tmp}/cache", "--storage", f"sqlite:///{tmp}/studies.db",
                   "--tracking-uri", f"sqlite:///{tmp}/mlruns/mlflow.db"]
        for item in SMALL:
            command += ["--set", item]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    # The largest RSS any descendant process reached (Linux reports KiB).
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024

    from tinyopt.runner import run_sweep

    events = RecordRss()
    with tempfile.TemporaryDirectory() as tmp:
        run_sweep("scratch", trials=args.trials, source=args.data, cache_dir=args.cache or f"{tmp}/cache",
                  storage=f"sqlite:///{tmp}/studies.db", tracking_uri=f"sqlite:///{tmp}/mlruns/mlflow.db",
                  overrides=SMALL, events=events, progress=False)
    half = len(events.rss) // 2
    growth = (events.rss[-1] - events.rss[half]) / max(len(events.rss) - 1 - half, 1)
    print(f"RSS after trial 0: {events.rss[0]:.1f} MiB, after trial {half}: {events.rss[half]:.1f} MiB, "
          f"last: {events.rss[-1]:.1f} MiB")
    print(f"growth over the second half: {growth:.2f} MiB per trial "
          f"({growth / events.rss[half] * 100:.2f}% of RSS per trial)")
    print(f"--trials-per-process {args.trials_per_process}: peak RSS of any worker {peak:.1f} MiB "
          f"vs {events.rss[-1]:.1f} MiB after {len(events.rss)} trials in one process "
          f"(ratio {peak / events.rss[-1]:.2f})")


if __name__ == "__main__":
    main()
