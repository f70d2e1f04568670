"""``tinyopt plan APPROACH``: what ``tinyopt sweep APPROACH`` with the same options will cost, before it runs."""

from __future__ import annotations

import json
import math

import click

from tinyopt.cli.options import check_preset, sweep_options, trials_to_run
from tinyopt.cli.results import number_column
from tinyopt.cli.sweep import seconds_since_start
from tinyopt.core.config import APPROACHES
from tinyopt.core.errors import ConfigError
from tinyopt.core.forecast import format_seconds
from tinyopt.sweep.workers import parse_gpus
from tinyopt.track.names import short_param


@click.command()
@click.argument("approach", type=click.Choice(APPROACHES))
@sweep_options
@click.option("--json", "as_json", is_flag=True, help="Print the forecast as one JSON object (for scripts).")
def plan(approach, trials, timeout, max_trials, source, cache_dir, preset, config_path, overrides, study_name,
         storage, tracking_uri, seed, workers, gpus, as_json) -> None:
    """Forecast a sweep's cost on this machine's device, creating no study and no run.

    Times a few training and evaluation batches of the space's defaults, its most expensive corner
    and a few random draws, and prints seconds per epoch and per trial, the epochs the pruner is
    expected to leave, the sweep's wall time (and with --timeout how many trials fit), peak memory and
    the disk its kept models and activation cache take. It checks what `tinyopt sweep` checks, and
    refuses what it refuses. Pass its --json output to `tinyopt sweep --forecast FILE` to see the
    forecast beside what happened, in the sweep's MLflow parent run and in `tinyopt report`.
    """
    check_preset(approach, preset)
    if approach == "ensemble":
        raise ConfigError("tinyopt plan forecasts the model approaches (pretrained, finetune, scratch); an ensemble "
                          "trial is a moment of numpy over saved predictions: run `tinyopt sweep ensemble` directly")
    from tinyopt.sweep.runner import prepare

    trials = trials_to_run(trials, timeout)
    gpu_ids, workers = parse_gpus(gpus, workers)
    prepared = prepare(approach, study_name=study_name, config_path=config_path, overrides=tuple(overrides),
                       source=source, cache_dir=cache_dir, storage=storage, tracking_uri=tracking_uri,
                       progress=not as_json, preset=preset)
    from tinyopt.sweep import plan as planning  # Keras: once the backend is loaded, its start-up lines dropped

    if max_trials is not None:
        trials = max_trials if trials is None else min(trials, max_trials)
    forecast = planning.forecast(approach, prepared.config, prepared.data, prepared.device, trials=trials,
                                 timeout=timeout, workers=workers, devices=len(set(gpu_ids)) or 1, seed=seed,
                                 startup_s=seconds_since_start())
    if as_json:
        click.echo(json.dumps(forecast.as_dict()))
        return
    _render(forecast)


def _render(forecast) -> None:
    from rich.console import Console
    from rich.table import Table

    from tinyopt.sweep import plan as planning

    console = Console()
    trials = "until the timeout" if forecast.trials is None else f"{forecast.trials} trials"
    table = Table(title=f"{forecast.approach}: {trials} on {forecast.device}, {forecast.workers} worker(s), "
                        f"{forecast.parallel} trial(s) at a time")
    trains = bool(forecast.max_epochs)
    table.add_column("configuration")
    for label in (("s/epoch", "epochs") if trains else ()) + ("s/trial", "setup s", "cache s", "peak mem"):
        number_column(table, label)
    table.add_column("differs from the defaults")
    defaults = forecast.configs[0].params
    for cost in forecast.configs:
        differs = ", ".join(f"{key}={short_param(value)}" for key, value in cost.params.items()
                            if key in planning.COST_PARAMS and defaults.get(key) != value)
        figures = ((f"{cost.epoch_s:.1f}", str(cost.epochs)) if trains else ()) + (
            f"{cost.trial_s:.1f}", f"{cost.setup_s:.1f}", f"{cost.cache_build_s:.1f}" if cost.cache_build_s else "-",
            _bytes(cost.peak_memory))
        table.add_row(cost.label, *figures, differs or "-")
    console.print(table)
    lines = []
    if forecast.max_epochs:
        lines.append(f"epochs per trial under the {forecast.pruner} pruner: {forecast.epochs_per_trial:.1f} of up to "
                     f"{forecast.max_epochs} (simulated with Optuna's pruner; early stopping can end trials sooner)")
    cache = (f", its share of the {forecast.cache_keys:.1f} activation caches the trials build included"
             if forecast.cache_keys else "")
    lines.append(f"a trial: {format_seconds(forecast.trial_s)} on average{cache}")
    if forecast.trials is not None:
        lines.append(f"the sweep: {format_seconds(forecast.wall_s)} of wall time "
                     f"(start-up {format_seconds(forecast.startup_s)})")
    if forecast.timeout is not None:
        lines.append(f"--timeout {format_seconds(forecast.timeout)}: about {forecast.fits} trials end within it")
    disk = forecast.disk
    lines.append(f"peak memory {_bytes(forecast.peak_memory)}; disk: kept models {_bytes(disk['models'])}, "
                 f"predictions {_bytes(disk['predictions'])}, activation cache {_bytes(disk['activation_cache'])}")
    lines.append(f"measured in {format_seconds(forecast.measured_s)}; nothing was created")
    for line in lines:
        console.print(line, markup=False, highlight=False)


def _bytes(count: float | None) -> str:
    if count is None:
        return "-"
    units = ("B", "KB", "MB", "GB")
    power = min(max(int(math.log10(max(count, 1)) // 3), 0), len(units) - 1)
    return f"{count / 1000 ** power:.{0 if power == 0 else 1}f} {units[power]}"
