"""``tinyopt sweep APPROACH``: run or continue the Optuna study of one approach."""

from __future__ import annotations

import faulthandler
import signal
import sys
import time

import click

from tinyopt.cli.options import cache_option, data_option, storage_options
from tinyopt.cli.results import number_column
from tinyopt.core import record
from tinyopt.core.config import APPROACHES, preset_path
from tinyopt.core.errors import ConfigError

# workers.py imports nothing heavy at module level, so --help stays fast. supervise is called through
# its module, where the tests replace it.
from tinyopt.sweep import workers as worker_processes
from tinyopt.sweep.workers import TRIALS_PER_PROCESS, SweepArgs, default_trials_per_process, parse_gpus


class _RichEvents:
    """Trial and epoch progress bars for a sweep."""

    def __init__(self, progress, trials: int | None):
        self.progress = progress
        self.trials = progress.add_task("trials", total=trials)
        self.epochs = progress.add_task("epochs", total=None, visible=False)

    def sweep_started(self, device: str, recovered: list[str]) -> None:
        for line in (f"trials run on {device}", *recovered):
            self.progress.console.print(line, markup=False, highlight=False, soft_wrap=True)

    def trial_started(self, number: int, epochs: int) -> None:
        self.progress.update(self.trials, description=f"trial {number}")
        self.progress.reset(self.epochs, total=epochs or None, visible=bool(epochs), description="epochs")

    def epoch_ended(self, number: int, epoch: int, logs: dict[str, float]) -> None:
        score = logs.get(record.SELECTION_TOP1)
        label = f"epoch {epoch + 1}" + (f" sel top-1 {score:.3f}" if score is not None else "")
        self.progress.update(self.epochs, advance=1, description=label)

    def trial_ended(self, number: int, state: str, value: float | None, reason: str | None) -> None:
        self.progress.console.print(_trial_line(number, state, value, reason), markup=False, highlight=False,
                                    soft_wrap=True)
        self.progress.update(self.trials, advance=1)


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
@click.option("--trials", type=click.IntRange(min=1), default=None,
              help="Trials this command adds, in all its workers (default: until --timeout, else 10).")
@click.option("--timeout", type=click.FloatRange(min=0), default=None,
              help="End the sweep SECONDS after it starts: no trial starts after that, and one still training "
                   "stops after its current batch and is recorded as pruned.")
@click.option("--max-trials", type=click.IntRange(min=1), default=None,
              help="Start no trial once the study holds N finished or running trials, counted over every worker "
                   "of every machine (for workers started by hand on several machines).")
@data_option
@cache_option
@click.option("--preset", default=None, metavar="NAME",
              help="Packaged preset merged onto the defaults before --config: --preset cpu takes the CPU-sized "
                   "sweeps/cpu/APPROACH.toml (pretrained, finetune, scratch).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="Config file merged onto the defaults (sweeps/APPROACH.toml) and the --preset.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override one config value, e.g. --set model.weights=none (repeatable).")
@click.option("--study", "study_name", default=None, help="Study name (default: the approach).")
@storage_options
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the sampler and every trial.")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Worker processes on this machine sharing the study (default 1, or one per --gpus).")
@click.option("--gpus", default=None, metavar="IDS",
              help="Pin one worker per GPU listed, e.g. --gpus 0,1 (sets each worker's CUDA_VISIBLE_DEVICES); "
                   "--gpus 0,0 runs two workers sharing GPU 0.")
@click.option("--trials-per-process", type=click.IntRange(min=0), default=None, metavar="N",
              help=f"Run each worker's trials in consecutive fresh processes of at most N trials; 0 runs them all "
                   f"in one process (default: {TRIALS_PER_PROCESS}, 0 for ensemble). TensorFlow keeps about 20 MiB "
                   f"per trained model, so one process grows with every trial; a fresh one costs about 10 s.")
@click.option("--worker", "is_worker", is_flag=True, hidden=True,
              help="Run as a worker of a supervising `tinyopt sweep` (plain lines; it owns the parent run).")
def sweep(approach, trials, timeout, max_trials, source, cache_dir, preset, config_path, overrides, study_name,
          storage, tracking_uri, seed, workers, gpus, trials_per_process, is_worker) -> None:
    """Run (or continue) the Optuna study of APPROACH, one MLflow run per trial.

    Rerunning the same command adds trials to the same study. SIGINT (Ctrl-C) and SIGTERM stop it
    cleanly: the running trial is recorded as failed, every MLflow run is closed, exit code 130/143.
    A trial stopped by SIGTERM (a preemption) is queued again, and the next run resumes it from its
    last checkpointed epoch, as it does a trial whose worker was killed.
    """
    if preset is not None:
        try:
            preset_path(approach, preset)
        except ConfigError as err:  # a name click could not check: a usage error, like an unknown APPROACH
            raise click.BadParameter(str(err), param_hint="'--preset'") from err
    from rich.console import Console


    if trials is None and timeout is None:
        trials = 10
    if timeout is not None:
        timeout = max(timeout - _seconds_since_start(), 0.0)
    if trials_per_process is None:
        trials_per_process = default_trials_per_process(approach)
    gpu_ids, workers = parse_gpus(gpus, workers)
    args = SweepArgs(approach, trials, timeout, max_trials, source, cache_dir, config_path, tuple(overrides),
                     study_name, storage, tracking_uri, seed, trials_per_process, workers, gpu_ids, preset)
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

        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=console, transient=True) as progress:
            result = _run(args, _RichEvents(progress, trials))
        _render(console, result)
    if result.exit_code:
        sys.exit(result.exit_code)


def _seconds_since_start() -> float:
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
                     tracking_uri=args.tracking_uri, seed=args.seed, events=events, owner=owner, preset=args.preset)


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
    table.add_column("params")  # "key=value" items: the column wraps between them, never inside one
    for row in result.top:
        params = ", ".join(f"{k}={_short(v)}" for k, v in row["params"].items())
        table.add_row(str(row["number"]), _four(row["value"]), *[_four(row[key]) for key in scores], params)
    return table


def _short(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _four(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
