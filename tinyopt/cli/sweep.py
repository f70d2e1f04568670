"""``tinyopt sweep APPROACH``: run or continue the Optuna study of one approach."""

from __future__ import annotations

import click

from tinyopt.cli.options import cache_option, data_option, storage_options
from tinyopt.config import APPROACHES


class _RichEvents:
    """Trial and epoch progress bars for a sweep."""

    def __init__(self, progress, trials: int | None):
        self.progress = progress
        self.trials = progress.add_task("trials", total=trials)
        self.epochs = progress.add_task("epochs", total=None, visible=False)

    def trial_started(self, number: int, epochs: int) -> None:
        self.progress.update(self.trials, description=f"trial {number}")
        self.progress.reset(self.epochs, total=epochs or None, visible=bool(epochs), description="epochs")

    def epoch_ended(self, number: int, epoch: int, logs: dict[str, float]) -> None:
        score = logs.get("selection_accuracy")
        label = f"epoch {epoch + 1}" + (f" sel top-1 {score:.3f}" if score is not None else "")
        self.progress.update(self.epochs, advance=1, description=label)

    def trial_ended(self, number: int, state: str, value: float | None, reason: str | None) -> None:
        shown = f"{value:.4f}" if value is not None else (reason or "")
        self.progress.console.print(f"trial {number}: {state} {shown}", highlight=False, soft_wrap=True)
        self.progress.update(self.trials, advance=1)


@click.command()
@click.argument("approach", type=click.Choice(APPROACHES))
@click.option("--trials", type=click.IntRange(min=1), default=None,
              help="Trials to add to the study (default: until --timeout, else 10).")
@click.option("--timeout", type=click.FloatRange(min=0), default=None, help="Stop starting trials after SECONDS.")
@data_option
@cache_option
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="Config file merged onto sweeps/APPROACH.toml (e.g. sweeps/cpu/APPROACH.toml).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override one config value, e.g. --set model.weights=none (repeatable).")
@click.option("--study", "study_name", default=None, help="Study name (default: the approach).")
@storage_options
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the sampler and every trial.")
@click.option("--trials-per-process", type=click.IntRange(min=0), default=0, show_default=True,
              help="Run the trials in fresh processes of at most N trials each (0: all in this one). "
                   "TensorFlow keeps memory per trained model, so this bounds a long sweep's memory.")
def sweep(approach, trials, timeout, source, cache_dir, config_path, overrides, study_name, storage,
          tracking_uri, seed, trials_per_process) -> None:
    """Run (or continue) the Optuna study of APPROACH, one MLflow run per trial.

    Rerunning the same command adds trials to the same study.
    """
    if trials is None and timeout is None:
        trials = 10
    if trials_per_process and (trials is None or trials > trials_per_process):
        _sweep_in_processes({**click.get_current_context().params, "trials": trials})
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from tinyopt.runner import run_sweep

    console = Console()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        result = run_sweep(approach, trials=trials, timeout=timeout, source=source, cache_dir=cache_dir,
                           config_path=config_path, overrides=tuple(overrides), study_name=study_name,
                           storage=storage, tracking_uri=tracking_uri, seed=seed,
                           events=_RichEvents(progress, trials))
    _render(console, result)


def _sweep_in_processes(params: dict) -> None:
    """Run the sweep as consecutive ``tinyopt sweep`` processes of ``--trials-per-process`` trials.

    Each process continues the same study and parent MLflow run; a failing or interrupted one
    ends the sweep with its exit code.
    """
    import subprocess
    import sys
    import time

    per_process = params["trials_per_process"]
    remaining = params["trials"]
    deadline = time.monotonic() + params["timeout"] if params["timeout"] is not None else None
    while remaining is None or remaining > 0:
        left = deadline - time.monotonic() if deadline is not None else None
        if left is not None and left <= 0:
            return
        batch = per_process if remaining is None else min(per_process, remaining)
        command = [sys.executable, "-m", "tinyopt", *_sweep_args({**params, "trials": batch, "timeout": left,
                                                                   "trials_per_process": 0})]
        code = subprocess.call(command)
        if code != 0:
            sys.exit(code)
        if remaining is not None:
            remaining -= batch


def _sweep_args(params: dict) -> list[str]:
    """The ``tinyopt sweep`` arguments that reproduce ``params``."""
    args = ["sweep", params["approach"]]
    flags = {"trials": "--trials", "timeout": "--timeout", "source": "--data", "cache_dir": "--cache",
             "config_path": "--config", "study_name": "--study", "storage": "--storage",
             "tracking_uri": "--tracking-uri", "seed": "--seed", "trials_per_process": "--trials-per-process"}
    for key, flag in flags.items():
        if params[key] is not None:
            args += [flag, str(params[key])]
    for item in params["overrides"]:
        args += ["--set", item]
    return args


def _render(console, result) -> None:
    from rich.table import Table

    table = Table(title=f"study {result.study_name}: top {len(result.top)} trials")
    for column in ("trial", "selection top-1", "test top-1"):
        table.add_column(column, no_wrap=True)
    table.add_column("params", overflow="fold")
    table.add_column("MLflow run", overflow="fold")
    for row in result.top:
        params = ", ".join(f"{k}={_short(v)}" for k, v in row["params"].items())
        test = f"{row['test_top1']:.4f}" if row["test_top1"] is not None else "-"
        table.add_row(str(row["number"]), f"{row['value']:.4f}", test, params, row["run_id"] or "-")
    console.print(table)
    counts = result.counts
    console.print(f"{result.new_trials} new trials; study totals: {counts['COMPLETE']} complete, "
                  f"{counts['PRUNED']} pruned, {counts['FAIL']} failed (storage {result.storage})")
    for note in result.notes:
        console.print(f"[yellow]note:[/] {note}", highlight=False)
    console.print(f"Review every trial: [bold]{result.ui_command}[/]")


def _short(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
