"""``tinyopt sweep APPROACH``: run or continue the Optuna study of one approach."""

from __future__ import annotations

import faulthandler
import signal
import sys
import time

import click

from tinyopt.cli.options import check_preset, sweep_options, trials_to_run
from tinyopt.cli.results import number_column
from tinyopt.core import forecast, record
from tinyopt.core.config import APPROACHES

# workers.py imports nothing heavy at module level, so --help stays fast. supervise is called through
# its module, where the tests replace it.
from tinyopt.sweep import workers as worker_processes
from tinyopt.sweep.workers import TRIALS_PER_PROCESS, SweepArgs, default_trials_per_process, parse_gpus
from tinyopt.track.names import short_param


class _RichEvents:
    """Trial and epoch progress bars for a sweep, and the time it is expected to take yet.

    The expected time left is the trials still to run at the mean duration of those this sweep ran (before
    the first ends: the ``--forecast``'s trial, if given), less what the running trial has done, and never
    past the ``--timeout`` deadline.
    """

    def __init__(self, progress, trials: int | None, timeout: float | None = None, expected: float | None = None):
        self.progress = progress
        self.trials = progress.add_task("trials", total=trials, eta="")
        self.epochs = progress.add_task("epochs", total=None, visible=False, eta="")
        self.total, self.expected = trials, expected
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.durations: list[float] = []
        self.started: float | None = None

    def _show_eta(self) -> None:
        now = time.monotonic()
        until_deadline = None if self.deadline is None else self.deadline - now
        left = None if self.total is None else self.total - len(self.durations)
        running_for = now - self.started if self.started is not None else 0.0
        seconds = forecast.eta(self.durations, left, running_for, self.expected, until_deadline)
        shown = "" if seconds is None else f"about {forecast.format_seconds(seconds)} left"
        self.progress.update(self.trials, eta=shown)

    def sweep_started(self, device: str, recovered: list[str]) -> None:
        for line in (f"trials run on {device}", *recovered):
            self.progress.console.print(line, markup=False, highlight=False, soft_wrap=True)
        self._show_eta()

    def trial_started(self, number: int, epochs: int) -> None:
        self.started = time.monotonic()
        self.progress.update(self.trials, description=f"trial {number}")
        self.progress.reset(self.epochs, total=epochs or None, visible=bool(epochs), description="epochs")

    def epoch_ended(self, number: int, epoch: int, logs: dict[str, float]) -> None:
        score = logs.get(record.SELECTION_TOP1)
        label = f"epoch {epoch + 1}" + (f" sel top-1 {score:.3f}" if score is not None else "")
        self.progress.update(self.epochs, advance=1, description=label)
        self._show_eta()

    def trial_ended(self, number: int, state: str, value: float | None, reason: str | None) -> None:
        self.progress.console.print(_trial_line(number, state, value, reason), markup=False, highlight=False,
                                    soft_wrap=True)
        if self.started is not None:
            self.durations.append(time.monotonic() - self.started)
            self.started = None
        self.progress.update(self.trials, advance=1)
        self._show_eta()


class _LineEvents:
    """One plain line per trial: what a worker of ``--workers`` prints for its supervisor to pass on."""

    def sweep_started(self, device: str, recovered: list[str]) -> None:
        for line in recovered:
            click.echo(line)

    def trial_started(self, number: int, epochs: int) -> None:
        click.echo(f"trial {number}: started")

    def epoch_ended(self, number: int, epoch: int, logs: dict[str, float]) -> None:
        pass

    def trial_ended(self, number: int, state: str, value: float | None, reason: str | None) -> None:
        click.echo(_trial_line(number, state, value, reason))


def _trial_line(number: int, state: str, value: float | None, reason: str | None) -> str:
    return f"trial {number}: {state} " + (f"{value:.4f}" if value is not None else (reason or ""))


@click.command()
@click.argument("approach", type=click.Choice(APPROACHES))
@sweep_options
@click.option("--trials-per-process", type=click.IntRange(min=0), default=None, metavar="N",
              help=f"Run each worker's trials in consecutive fresh processes of at most N trials; 0 runs them all "
                   f"in one process (default: {TRIALS_PER_PROCESS}, 0 for ensemble). TensorFlow keeps about 20 MiB "
                   f"per trained model, so one process grows with every trial; a fresh one costs about 10 s.")
@click.option("--warm-start", default=None, metavar="STUDY",
              help="Start with the best study.warm_start_trials (5) complete trials of an earlier STUDY of the "
                   "approach (a changed slice, backbone or space): their values that fit this space are queued "
                   "once, however many workers start; the rest are dropped with a note.")
@click.option("--warm-start-storage", default=None, metavar="URL",
              help="Optuna storage of the --warm-start study (default: --storage).")
@click.option("--forecast", "forecast_file", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="The forecast of `tinyopt plan ... --json > FILE`, kept with a new study: the parent run and "
                   "`tinyopt report` show it beside what happened, and the progress shows its ETA from the start.")
@click.option("--worker", "is_worker", is_flag=True, hidden=True,
              help="Run as a worker of a supervising `tinyopt sweep` (plain lines; it owns the parent run).")
def sweep(approach, trials, timeout, max_trials, source, cache_dir, preset, config_path, overrides, study_name,
          storage, tracking_uri, seed, workers, gpus, trials_per_process, warm_start, warm_start_storage,
          forecast_file, is_worker) -> None:
    """Run (or continue) the Optuna study of APPROACH, one MLflow run per trial.

    Rerunning the same command adds trials to the same study. SIGINT (Ctrl-C) and SIGTERM stop it
    cleanly: the running trial is recorded as failed, every MLflow run is closed, exit code 130/143.
    A trial stopped by SIGTERM (a preemption) is queued again, and the next run resumes it from its
    last checkpointed epoch, as it does a trial whose worker was killed.
    """
    check_preset(approach, preset)
    from rich.console import Console


    trials = trials_to_run(trials, timeout)
    if timeout is not None:
        timeout = max(timeout - seconds_since_start(), 0.0)
    if trials_per_process is None:
        trials_per_process = default_trials_per_process(approach)
    gpu_ids, workers = parse_gpus(gpus, workers)
    args = SweepArgs(approach, trials, timeout, max_trials, source, cache_dir, config_path, tuple(overrides),
                     study_name, storage, tracking_uri, seed, trials_per_process, workers, gpu_ids, preset,
                     warm_start, warm_start_storage,
                     None if forecast_file is None else forecast.read(forecast_file, approach).as_dict())
    console = Console()
    if is_worker:
        # A worker that does not stop after SIGINT/SIGTERM is asked for its stacks before it is killed
        # (tinyopt.sweep.workers.STOP_GRACE): they say where it was stuck.
        faulthandler.register(signal.SIGUSR1, all_threads=True)
        result = _run(args, _LineEvents(), owner=False)
    elif workers > 1 or gpu_ids or (trials_per_process and (trials is None or trials > trials_per_process)):
        def emit(line: str) -> None:
            console.print(line, markup=False, highlight=False, soft_wrap=True)

        result = worker_processes.supervise(args, emit)
        _render(console, result)
    else:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("{task.fields[eta]}"))
        with Progress(*columns, console=console, transient=True) as progress:
            result = _run(args, _RichEvents(progress, trials, timeout, args.forecast_trial_seconds))
        _render(console, result)
    if result.exit_code:
        sys.exit(result.exit_code)


def seconds_since_start() -> float:
    """How long this process has run: ``--timeout`` counts from the command's start, Python's imports included.

    A worker process is started with the time its supervisor had left, so it ends at the same deadline.
    """
    import psutil

    return max(time.time() - psutil.Process().create_time(), 0.0)


def _run(args, events, owner: bool = True):
    from tinyopt.sweep.runner import run_sweep  # numpy and the objectives: not for --help

    return run_sweep(args.approach, trials=args.trials, timeout=args.timeout, max_trials=args.max_trials,
                     source=args.source, cache_dir=args.cache_dir, config_path=args.config_path,
                     overrides=args.overrides, study_name=args.study_name, storage=args.storage,
                     tracking_uri=args.tracking_uri, seed=args.seed, events=events, owner=owner, preset=args.preset,
                     warm_start=args.warm_start, warm_start_storage=args.warm_start_storage,
                     forecast=args.forecast)


def _render(console, result) -> None:
    if result.top:
        console.print(_top_table(result))
        # soft_wrap: a link longer than the line stays one link to click or copy, the terminal wraps it.
        for row in result.top:
            run = row["run_url"] or f"MLflow run {row['run_id'] or '-'}"  # trials recorded before links: the id
            console.print(f"trial {row['number']}: {run}", markup=False, highlight=False, soft_wrap=True)
    counts = result.counts
    lines = [f"note: {note}" for note in result.notes]
    if result.recovered:  # each was named in a line of its own when the sweep started
        lines.append(f"{len(result.recovered)} trial(s) or MLflow run(s) left RUNNING by a dead worker were "
                     "recovered when the sweep started")
    if result.interrupted:
        lines.append(f"interrupted by {result.interrupted}: no trial was left running and every MLflow run of this "
                     "sweep is closed; rerun the same command to continue the study")
    lines.append(f"{result.new_trials} new trials; study totals: {counts['COMPLETE']} complete, "
                 f"{counts['PRUNED']} pruned, {counts['FAIL']} failed (storage {result.storage})")
    for line in lines:  # wrapped at spaces, never inside a word
        console.print(line, markup=False, highlight=False)
    # A command to copy: the terminal wraps it, as a link.
    console.print(f"Review every trial: {result.ui_command}", markup=False, highlight=False, soft_wrap=True)


def _top_table(result):
    """The best trials, best first: the objective under its name (a loss with the selection top-1 beside it)."""
    from rich.table import Table

    scores = ([record.SELECTION_TOP1] if result.objective.is_loss else []) + [record.TEST_TOP1]
    table = Table(title=f"study {result.study_name}: top {len(result.top)} trials, by {result.objective.heading}")
    table.add_column("trial", justify="right", no_wrap=True)
    number_column(table, result.objective.label)
    for key in scores:
        number_column(table, record.SCORE_LABELS[key])
    timed = any(row.get(record.LATENCY_MS) is not None for row in result.top)  # not an ensemble's, nor older trials'
    if timed:
        number_column(table, "latency ms")
    table.add_column("params")  # "key=value" items: the column wraps between them, never inside one
    for row in result.top:
        params = ", ".join(f"{k}={short_param(v)}" for k, v in row["params"].items())
        latency = [short_param(row.get(record.LATENCY_MS) or "-")] if timed else []
        table.add_row(str(row["number"]), _four(row["value"]), *[_four(row[key]) for key in scores], *latency, params)
    return table


def _four(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
