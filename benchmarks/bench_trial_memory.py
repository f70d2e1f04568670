"""Memory across the trials of one sweep, with and without fresh worker processes, and what one costs.

Runs a scratch sweep of small trials (different params each, as a real study does) twice over one
prepared cache:

1. ``tinyopt sweep --trials-per-process K`` (K: the default, ``tinyopt.sweep.workers.TRIALS_PER_PROCESS``):
   the peak RSS of one worker, the peak anonymous memory of the supervisor and its workers together,
   and what a fresh process costs, read from the run's time-stamped lines: the gap between a trial's
   end and the next one's start where a fresh process takes over (the old one exits, the new one
   imports, loads the data and opens the study), less that gap inside one process.
2. The same trials in this one process: its memory after every trial and the growth per trial
   (least squares over the second half, after the first trials' warm-up).

    python benchmarks/bench_trial_memory.py [--data ../shared/data/tiny-imagenet-200-dev.zip] [--trials 50]
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from statistics import linear_regression, mean

import psutil

from tinyopt.objectives.model import QuietEvents
from tinyopt.sweep.workers import TRIALS_PER_PROCESS

DEV_ZIP = Path(__file__).resolve().parents[2] / "shared" / "data" / "tiny-imagenet-200-dev.zip"
# Small trials whose params still vary (optimizer, batch norm, augmentation, ...) as in a real study.
SMALL = ("data.train_per_class=5", "data.selection_per_class=2", "data.test_per_class=2", "space.epochs=1",
         "space.stages=2", "space.width=16", "space.blocks=1", "train.eval_batch_size=256")
TRIAL_LINE = re.compile(r"^trial (\d+): (\w+)")


def memory_mib(pid: int | str = "self") -> dict[str, float]:
    """RSS, and the anonymous part of it (heap: what models leave behind), of one process (0 once it has exited)."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return {key: int(fields.get(field, "0").split()[0]) / 1024 for key, field in (("rss", "VmRSS"),
                                                                                   ("anon", "RssAnon"))}


class RecordMemory(QuietEvents):
    """This process's memory after every trial, and how long each trial took."""

    def __init__(self):
        self.rss: list[float] = []
        self.anon: list[float] = []
        self.seconds: list[float] = []
        self.started = 0.0

    def trial_started(self, number, epochs):
        self.started = time.monotonic()

    def trial_ended(self, number, state, value, reason):
        memory = memory_mib()
        self.rss.append(memory["rss"])
        self.anon.append(memory["anon"])
        self.seconds.append(time.monotonic() - self.started)
        print(f"trial {number:2d} {state:8s} RSS {self.rss[-1]:7.1f} MiB, anonymous {self.anon[-1]:7.1f} MiB",
              flush=True)


class TreeMemory(threading.Thread):
    """Peak anonymous memory of a process and its descendants together, and of the process alone.

    Anonymous memory, not RSS, is what adds up over processes: the supervisor and its workers map
    the same TensorFlow libraries and dataset cache, pages that RSS would count once per process.
    """

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.root = psutil.Process(pid)
        self.total = self.alone = 0.0

    def run(self):
        while self.root.is_running() and self.root.status() != psutil.STATUS_ZOMBIE:
            try:
                alone = memory_mib(self.root.pid)["anon"]
                total = alone + sum(memory_mib(child.pid)["anon"] for child in self.root.children(recursive=True))
            except (OSError, psutil.Error):  # a worker ended between listing and reading it
                continue
            self.alone, self.total = max(self.alone, alone), max(self.total, total)
            time.sleep(0.5)


def run_recycled(args, stores: str, cache: str) -> tuple[float, dict[int, dict[str, float]], TreeMemory]:
    """Run the CLI with --trials-per-process: its wall time, when each trial started and ended, its memory."""
    command = [sys.executable, "-m", "tinyopt", "sweep", "scratch", "--trials", str(args.trials),
               "--trials-per-process", str(args.trials_per_process), "--data", args.data, "--cache", cache,
               "--storage", f"sqlite:///{stores}/studies.db", "--tracking-uri", f"sqlite:///{stores}/mlruns/mlflow.db"]
    for item in SMALL:
        command += ["--set", item]
    times: dict[int, dict[str, float]] = {}
    lines: list[str] = []
    begin = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    memory = TreeMemory(process.pid)
    memory.start()
    for line in process.stdout:
        lines.append(line)
        match = TRIAL_LINE.match(line)
        if match:
            number, state = int(match[1]), match[2]
            times.setdefault(number, {})["start" if state == "started" else "end"] = time.monotonic() - begin
    if process.wait():
        raise SystemExit("".join(lines[-30:]) + f"{' '.join(command)} exited with {process.returncode}")
    return time.monotonic() - begin, times, memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEV_ZIP))
    parser.add_argument("--cache", default=None)
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--trials-per-process", type=int, default=TRIALS_PER_PROCESS)
    args = parser.parse_args()
    per = args.trials_per_process

    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache or f"{tmp}/cache"
        # Workers first, while this process is small: a child forked from a large parent would count
        # the parent's pages in its peak RSS.
        recycled_wall, times, tree = run_recycled(args, f"{tmp}/recycled", cache)
        # The largest RSS any descendant process reached (Linux reports KiB).
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        numbers = sorted(n for n in times if {"start", "end"} <= times[n].keys())
        gaps = {n: times[n]["start"] - times[n - 1]["end"] for n in numbers[1:] if n - 1 in times}
        fresh = [gap for n, gap in gaps.items() if n % per == 0]
        same = [gap for n, gap in gaps.items() if n % per]
        trial = mean(times[n]["end"] - times[n]["start"] for n in numbers)
        cost = mean(fresh) - mean(same)
        print(f"--trials-per-process {per}, {len(numbers)} trials: {recycled_wall:.0f} s "
              f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores); peak RSS of one worker "
              f"{peak:.1f} MiB; peak anonymous memory of the supervisor and its workers together {tree.total:.1f} MiB, "
              f"of the supervisor alone {tree.alone:.1f} MiB")
        print(f"between two trials: {mean(same):.2f} s in one process, {mean(fresh):.2f} s across a fresh process "
              f"(mean of {len(fresh)}): a fresh process costs {cost:.1f} s, {cost / trial:.1f}x one of these "
              f"trials ({trial:.1f} s)", flush=True)

        from tinyopt.sweep.runner import run_sweep

        events = RecordMemory()
        begin = time.monotonic()
        run_sweep("scratch", trials=args.trials, source=args.data, cache_dir=cache,
                  storage=f"sqlite:///{tmp}/one/studies.db", tracking_uri=f"sqlite:///{tmp}/one/mlruns/mlflow.db",
                  overrides=SMALL, events=events, progress=False)
        one_wall = time.monotonic() - begin

    rss, anon, half = events.rss, events.anon, len(events.rss) // 2
    second_half = range(half, len(rss))
    growth = linear_regression(second_half, rss[half:]).slope
    print(f"\none process, {len(rss)} trials: {one_wall:.0f} s (its imports included), "
          f"load average {os.getloadavg()[0]:.1f}; {mean(events.seconds):.1f} s per trial")
    print(f"RSS after trial 0: {rss[0]:.1f} MiB, after trial {half}: {rss[half]:.1f} MiB, last: {rss[-1]:.1f} MiB")
    print(f"growth over the second half (least squares): RSS {growth:.2f} MiB per trial "
          f"({growth / rss[0] * 100:.2f}% of the RSS after trial 0), anonymous "
          f"{linear_regression(second_half, anon[half:]).slope:.2f} MiB per trial")
    print(f"{'':28s}{'one process':>14s}{f'--trials-per-process {per}':>26s}  ratio")
    for label, one, recycled in (("peak RSS of one process", max(rss), peak),
                                 ("peak anonymous, all", max(anon), tree.total)):
        print(f"{label:28s}{one:10.1f} MiB{recycled:22.1f} MiB  {recycled / one:5.2f}")
    print(f"--trials-per-process {per}: a worker grows by about {growth * per:.0f} MiB in its {per} trials "
          f"({growth * per / peak:.0%} of its peak RSS); its fresh process costs {cost / per:.1f} s per trial "
          f"({cost / per / trial:.0%} of one of these trials)")


if __name__ == "__main__":
    main()
