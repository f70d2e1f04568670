"""Worker processes on this machine sharing one study: ``tinyopt sweep --workers K`` (and ``--trials-per-process``).

The supervisor, the command the user started, checks and prepares everything once (config,
stores, data, weights), opens the study and its MLflow parent run, and then starts K worker
processes. Each worker is a ``tinyopt sweep --worker`` of its share of the trials, in a process
group of its own (a Ctrl-C reaches it once, through the supervisor) and, with ``--gpus``, on its
own GPU. With ``--trials-per-process N`` (by default ``TRIALS_PER_PROCESS``) a worker's share runs
in consecutive fresh processes of at most N trials each, which bounds the memory TensorFlow keeps
per trained model.

The supervisor forwards SIGINT and SIGTERM to every worker, prefixes each worker's lines with its
number, closes the parent run with the status of the whole, and reports one summary. A worker
killed by a signal the supervisor did not pass on (the OOM killer, ``kill -9``, a crash) is reported
(which worker, how it died, the trial it was running), its trial failed and queued again and its
MLflow run closed at once (``tinyopt.sweep.recovery``), and a new process takes over the rest of its share,
so that the command still adds the trials it was asked for.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tinyopt.core import forecast, record, signals
from tinyopt.core.errors import ConfigError, TinyoptError
from tinyopt.core.urls import DEFAULT_STORAGE, DEFAULT_TRACKING_URI, first_line
from tinyopt.core.worker import identity as worker_identity
from tinyopt.stores import storage as storages
from tinyopt.sweep import recovery
from tinyopt.train import backend
from tinyopt.train.backend import SHARE_ENV

if TYPE_CHECKING:
    from tinyopt.sweep.summary import SweepResult

# TensorFlow keeps 17 to 20 MiB per trained model (keras-team/keras#17458): 10 trials grow a worker
# by 175 to 205 MiB, about 10% of its 2 GB, and its fresh process costs 9 to 11 s, about 1 s per
# trial (benchmarks/bench_trial_memory.py, BENCHMARKS.md).
TRIALS_PER_PROCESS = 10
# A worker still running this long after the supervisor passed SIGINT/SIGTERM on is stuck: it is asked
# for its threads' stacks (SIGUSR1, see tinyopt.cli.sweep) and killed, as SLURM and Kubernetes kill a job
# their grace period after SIGTERM; its trial is failed as interrupted.
STOP_GRACE = 60.0
# A worker's line that starts or ends a trial (tinyopt.cli.sweep prints them), which the ETA follows.
_TRIAL_LINE = re.compile(r"^trial (\d+): (started|COMPLETE|PRUNED|FAIL)\b")
# A worker whose processes die this many times in a row without finishing a trial is given up: something
# kills every one of them (memory, a broken GPU), and starting more would only repeat it.
DEATHS_IN_A_ROW = 3


@dataclass
class SweepArgs:
    """The options of one ``tinyopt sweep`` command (see ``tinyopt.cli.sweep``)."""

    approach: str
    trials: int | None
    timeout: float | None = None
    max_trials: int | None = None
    source: str | None = None
    cache_dir: str | None = None
    config_path: str | None = None
    overrides: tuple[str, ...] = ()
    study_name: str | None = None
    storage: str = DEFAULT_STORAGE
    tracking_uri: str = DEFAULT_TRACKING_URI
    seed: int = 0
    trials_per_process: int = 0
    workers: int = 1
    gpus: list[str] = field(default_factory=list)
    preset: str | None = None
    # --warm-start: the supervisor queues its trials once; its workers are not told (the study is marked).
    warm_start: str | None = None
    warm_start_storage: str | None = None
    forecast: dict[str, Any] | None = None  # --forecast, read: the supervisor stores it with a new study

    @property
    def forecast_trial_seconds(self) -> float | None:
        """The forecast's mean trial: the ETA's trial time before the first trial ends."""
        return None if self.forecast is None else self.forecast["trial_s"]

    @property
    def name(self) -> str:
        return self.study_name or self.approach


def default_trials_per_process(approach: str) -> int:
    """``--trials-per-process`` unless given: ensemble trials build no model, so a fresh process would only cost."""
    return 0 if approach == "ensemble" else TRIALS_PER_PROCESS


def shares(trials: int | None, workers: int) -> list[int | None]:
    """How many trials each worker runs so that they add ``trials`` in all (None: until the timeout)."""
    if trials is None:
        return [None] * workers
    return [trials // workers + (1 if i < trials % workers else 0) for i in range(workers)]


def parse_gpus(text: str | None, workers: int | None) -> tuple[list[str], int]:
    """The GPU of each worker from ``--gpus 0,1`` and the worker count they allow (one worker per entry).

    A GPU listed twice (``--gpus 0,0``) runs two workers that share it (see ``train.gpu_memory``).

    Raises:
        TinyoptError: an empty GPU id, or more workers than entries.
    """
    if not text:
        return [], workers or 1
    gpus = [item.strip() for item in text.split(",")]
    if any(not gpu for gpu in gpus):
        raise TinyoptError(f"--gpus {text!r} must list GPU indices or UUIDs separated by commas, e.g. 0,1 "
                           "(a GPU listed twice runs two workers on it)")
    workers = workers or len(gpus)
    if workers > len(gpus):
        raise TinyoptError(f"--workers {workers} needs {workers} GPUs but --gpus lists {len(gpus)} ({text}); "
                           "list more GPUs, list a GPU twice to run two workers on it, or lower --workers")
    return gpus[:workers], workers


def _worker_command(args: SweepArgs, trials: int | None, timeout: float | None) -> list[str]:
    command = [sys.executable, "-m", "tinyopt", "sweep", args.approach, "--worker", "--seed", str(args.seed),
               "--storage", args.storage, "--tracking-uri", args.tracking_uri, "--study", args.name]
    # The supervisor prepared the data: workers read the cache without hashing the source again.
    for flag, value in (("--trials", trials), ("--timeout", timeout), ("--max-trials", args.max_trials),
                        ("--cache", args.cache_dir), ("--preset", args.preset), ("--config", args.config_path)):
        if value is not None:
            command += [flag, str(value)]
    for item in args.overrides:
        command += ["--set", item]
    return command


class _Supervisor:
    """Runs the worker slots and forwards signals to the processes they run."""

    def __init__(self, args: SweepArgs, emit: Callable[[str], None]):
        self.args = args
        self.emit = emit
        self.study: Any = None  # set once the study is open
        self.session: Any = None  # the opened sweep (study, storage, tracker), to recover a dead worker's trial
        self.lock = threading.Lock()
        self.running: dict[int, subprocess.Popen] = {}
        self.pids: set[int] = set()
        self.codes: list[int] = []  # the exit codes that end a worker's share early
        self.notes: list[str] = []  # one per worker process that died
        self.signum: int | None = None
        self.signalled: float | None = None  # time.monotonic() when the first signal was passed on
        self.killed: set[int] = set()  # pids of the workers killed after STOP_GRACE
        self.started: dict[int, float] = {}  # trial number -> when a worker said it started
        self.durations: list[float] = []  # of the trials the workers ended
        self.deadline = None if args.timeout is None else time.monotonic() + args.timeout

    def forward(self, signum: int, _frame=None) -> None:
        self.signum = signum
        self.signalled = self.signalled or time.monotonic()
        with self.lock:
            for process in self.running.values():
                try:
                    os.killpg(process.pid, signum)
                except ProcessLookupError:
                    pass

    def kill_stuck(self) -> None:
        """Kill the workers still running ``STOP_GRACE`` after the signal, once they printed their stacks."""
        if self.signalled is None or time.monotonic() - self.signalled < STOP_GRACE:
            return
        with self.lock:
            stuck = {index: process for index, process in self.running.items() if process.pid not in self.killed}
        for index, process in stuck.items():
            self.emit(f"worker {index} (pid {process.pid}) did not stop within {STOP_GRACE:g} s of the signal; "
                      "its threads' stacks follow, then it is killed")
            self._signal(process, signal.SIGUSR1)
        time.sleep(2)  # for the stacks to come through
        for process in stuck.values():
            self._signal(process, signal.SIGKILL)
            self.killed.add(process.pid)

    @staticmethod
    def _signal(process: subprocess.Popen, signum: int) -> None:
        try:
            os.killpg(process.pid, signum)
        except ProcessLookupError:
            pass

    def slot(self, index: int, trials: int | None, deadline: float | None) -> None:
        """Worker ``index``: its share of the trials, in consecutive processes of at most ``trials_per_process``.

        A process that dies is replaced by a new one for the trials it did not finish, unless
        ``DEATHS_IN_A_ROW`` die in a row without finishing one.
        """
        per_process = self.args.trials_per_process
        env = dict(os.environ)
        if self.args.gpus:
            gpu = self.args.gpus[index]
            env["CUDA_VISIBLE_DEVICES"] = gpu
            env[SHARE_ENV] = str(self.args.gpus.count(gpu))
        remaining, deaths = trials, 0
        while remaining is None or remaining > 0:
            left = deadline - time.monotonic() if deadline is not None else None
            if self.signum is not None or (left is not None and left <= 0):
                return
            batch = remaining
            if per_process:
                batch = per_process if remaining is None else min(per_process, remaining)
            pid, code = self._run(index, _worker_command(self.args, batch, left), env)
            ran = _trials_of(self.study, {pid})
            if code < 0 and self.signum is None:  # killed by a signal that did not come through the supervisor
                finished = [number for number in ran if number not in self._bury(index, pid, -code)]
                deaths = 0 if finished else deaths + 1
                if remaining is not None:
                    remaining -= len(finished)
                if deaths >= DEATHS_IN_A_ROW:
                    self.emit(f"worker {index}: {deaths} processes in a row died without finishing a trial; "
                              "starting no other (see the lines above for how each died)")
                    self.codes.append(128 - code)  # as a shell reports a process killed by that signal
                    return
                continue
            # A worker that ran no trial met --max-trials (or its timeout): so would the next one.
            if code != 0 or batch is None or not ran:
                if code != 0:
                    self.codes.append(code)
                return
            if remaining is not None:
                remaining -= batch

    def _bury(self, index: int, pid: int, signum: int) -> set[int]:
        """Report a dead worker process, fail and requeue its trial, close its run; the trials it was running."""
        import optuna

        try:
            how = signal.Signals(signum).name
        except ValueError:
            how = f"signal {signum}"
        with self.lock:  # one recovery at a time: workers of one study may die together
            running = set(_trials_of(self.study, {pid}, optuna.trial.TrialState.RUNNING))
            try:
                recovered = recovery.recover(self.study, self.session.storage, self.session.tracker,
                                             when="by the supervisor of --workers, which saw its worker die")
            except Exception as err:  # noqa: BLE001 - the other workers go on; the next sweep recovers it
                recovered = [f"could not recover its trial now ({first_line(err)}); the next sweep of the study will"]
        what = f"trial {', '.join(map(str, sorted(running)))}" if running else "no trial (between trials)"
        line = f"worker {index} (pid {pid}) was killed by {how} while running {what}"
        self.emit(f"{line}; starting a new process for the rest of its trials")
        for message in recovered:
            self.emit(message)
        self.notes.append(f"{line}; a new process went on with the rest of its trials")
        return running

    def _time_left(self, line: str) -> str:
        """`` (about 12m 30s left)`` after a worker's line that ends a trial, from the trials ended so far."""
        found = _TRIAL_LINE.match(line)
        if found is None:
            return ""
        now = time.monotonic()
        with self.lock:
            if found[2] == "started":
                self.started[int(found[1])] = now
                return ""
            began = self.started.pop(int(found[1]), None)
            if began is not None:
                self.durations.append(now - began)
            until = None if self.deadline is None else self.deadline - now
            left = None if self.args.trials is None else max(self.args.trials - len(self.durations), 0)
            seconds = forecast.eta(self.durations, left, 0.0, self.args.forecast_trial_seconds, until,
                                   workers=self.args.workers)
        return "" if seconds is None else f" (about {forecast.format_seconds(seconds)} left)"

    def _run(self, index: int, command: list[str], env: dict[str, str]) -> tuple[int, int]:
        """Run one worker process to its end, passing its lines on; its pid and exit code."""
        with self.lock:
            if self.signum is not None:
                return 0, 128 + self.signum
            process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                       bufsize=1, start_new_session=True)
            self.running[index] = process
            self.pids.add(process.pid)
        prefix = f"[w{index}] " if self.args.workers > 1 else ""
        for line in process.stdout:
            line = line.rstrip("\n")
            self.emit(prefix + line + self._time_left(line))
        code = process.wait()
        with self.lock:
            self.running.pop(index, None)
        return process.pid, code


def supervise(args: SweepArgs, emit: Callable[[str], None], progress: bool = True) -> SweepResult:
    """Run ``args.workers`` worker processes (each maybe several, one after another) over one study.

    Args:
        args: the sweep's options.
        emit: prints one line (notes, and each worker's lines prefixed with its number).
        progress: show the data preparation progress bar.

    Returns:
        The study's summary; ``exit_code`` is 128 + the signal that stopped it, else the first
        non-zero exit code of a worker, else 0. ``new_trials`` counts the trials of its workers.

    Raises:
        TinyoptError: anything ``runner.prepare`` or ``runner.open_sweep`` refuses; nothing is started.
    """
    # The sweep's own code (numpy, the objectives) loads here, not with `tinyopt sweep --help`.
    from tinyopt.sweep import runner
    from tinyopt.sweep.summary import summarize

    deadline = time.monotonic() + args.timeout if args.timeout is not None else None
    prepared = runner.prepare(args.approach, study_name=args.name, config_path=args.config_path,
                              overrides=args.overrides, preset=args.preset,
                              source=args.source, cache_dir=args.cache_dir, storage=args.storage,
                              tracking_uri=args.tracking_uri, progress=progress, warm_start=args.warm_start,
                              warm_start_storage=args.warm_start_storage)
    if args.gpus:
        if args.approach == "ensemble":
            raise ConfigError("--gpus is for the model approaches: an ensemble trial votes in numpy on the CPU; "
                              "drop --gpus")
        backend.check_gpus(args.gpus)
    supervisor = _Supervisor(args, emit)
    # From here a signal is only remembered, then passed on to the workers: setting up the study and
    # the parent run is never cut halfway.
    previous = {signum: signal.signal(signum, supervisor.forward) for signum in signals.HANDLED}
    try:
        session = runner.open_sweep(args.approach, args.name, prepared.config, storage=args.storage,
                                    tracking_uri=args.tracking_uri, seed=args.seed, workers=args.workers,
                                    warm_start=prepared.warm_start, forecast=args.forecast)
        supervisor.study, supervisor.session = session.study, session
        status = "FAILED"
        try:
            where = "on GPUs " + ",".join(args.gpus) if args.gpus else f"on {prepared.device}"
            if args.trials_per_process:
                where += f", in a fresh process every {args.trials_per_process} trials (--trials-per-process)"
            emit(f"{args.workers} worker processes {where}" if args.workers > 1 else f"trials run {where}")
            if storages.needs_journal(args.storage, args.workers):
                emit(f"SQLite serves one process, so the {args.workers} workers share the study in Optuna's "
                     f"journal file {session.url.removeprefix('journal:')}, Optuna's storage for several "
                     f"processes on one machine; every tinyopt command finds it there through {args.storage}")
            for line in session.recovered:
                emit(line)
            threads = [threading.Thread(target=supervisor.slot, args=(i, share, deadline), daemon=True)
                       for i, share in enumerate(shares(args.trials, args.workers))]
            for thread in threads:
                thread.start()
            for thread in threads:
                while thread.is_alive():  # join with a timeout, so that the signal handler runs meanwhile
                    thread.join(0.2)
                    supervisor.kill_stuck()
            if supervisor.killed:
                reason = f"interrupted by {signal.Signals(supervisor.signum).name}"
                import optuna

                stuck = _trials_of(session.study, supervisor.killed, optuna.trial.TrialState.RUNNING)
                preempted = signals.requeues(prepared.config.study.requeue, signals.Interrupted(supervisor.signum))
                recovery.fail_interrupted(session.study, session.storage, session.tracker, stuck, reason,
                                          preempted_by=signal.Signals(supervisor.signum).name if preempted else None)
            failed = supervisor.codes
            status = "KILLED" if supervisor.signum is not None else "FAILED" if failed else "FINISHED"
        finally:
            session.tracker.end_sweep(status)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    ran = _trials_of(session.study, supervisor.pids)
    result = summarize(session.study, args.storage, args.tracking_uri, new_trials=len(ran))
    result.notes = session.notes + supervisor.notes + runner.deadline_notes(session.study, ran)
    result.recovered = session.recovered
    if supervisor.signum is not None:
        stopped = signals.Interrupted(supervisor.signum)
        result.interrupted, result.exit_code = stopped.name, stopped.exit_code
    elif failed:
        result.exit_code = failed[0]
    return result


def _trials_of(study: Any, pids: set[int], *states: Any) -> list[int]:
    """The numbers of the study's trials that these processes of this machine ran (in these states, if given)."""
    host = worker_identity()["host"]
    return [t.number for t in study.get_trials(deepcopy=False, states=states or None)
            if (w := t.user_attrs.get(record.WORKER) or {}).get("host") == host and w.get("pid") in pids]
