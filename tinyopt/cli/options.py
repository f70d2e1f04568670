"""Options shared by several commands, defined once."""

from __future__ import annotations

import click

from tinyopt.core.config import preset_path
from tinyopt.core.errors import ConfigError
from tinyopt.core.urls import DEFAULT_STORAGE, DEFAULT_TRACKING_URI


def cache_option(func):
    return click.option(
        "--cache", "cache_dir", type=click.Path(file_okay=False), default=None,
        help="Dataset cache folder (default: $TINYOPT_CACHE or ~/.cache/tinyopt).",
    )(func)


def data_option(func):
    return click.option(
        "--data", "source", default=None,
        help="Tiny ImageNet source: the official URL (default), a local .zip, or an extracted folder. "
             "`sweep` without --data uses the prepared cache when there is one.",
    )(func)


def tracking_option(func):
    return click.option(
        "--tracking-uri", default=DEFAULT_TRACKING_URI, show_default=True,
        help="MLflow tracking URI (a sqlite: file or an http(s) mlflow server).",
    )(func)


def storage_options(func):
    """``--storage`` and ``--tracking-uri``."""
    func = tracking_option(func)
    return click.option(
        "--storage", default=DEFAULT_STORAGE, show_default=True,
        help="Optuna storage URL: sqlite:///file.db, postgresql+psycopg://..., or journal:PATH.",
    )(func)


def trials_to_run(trials: int | None, timeout: float | None) -> int | None:
    """``--trials``, which is 10 when neither it nor ``--timeout`` is given (None: until the timeout)."""
    return 10 if trials is None and timeout is None else trials


def sweep_options(func):
    """What a sweep is: the options ``tinyopt sweep`` and ``tinyopt plan`` (its forecast) share."""
    decorators = [
        click.option("--trials", type=click.IntRange(min=1), default=None,
                     help="Trials this command adds, in all its workers (default: until --timeout, else 10)."),
        click.option("--timeout", type=click.FloatRange(min=0), default=None,
                     help="End the sweep SECONDS after it starts: no trial starts after that, and one still training "
                          "stops after its current batch and is recorded as pruned."),
        click.option("--max-trials", type=click.IntRange(min=1), default=None,
                     help="Start no trial once the study holds N finished or running trials, counted over every worker "
                          "of every machine (for workers started by hand on several machines)."),
        data_option,
        cache_option,
        click.option("--preset", default=None, metavar="NAME",
                     help="Packaged preset merged onto the defaults before --config: --preset cpu takes the CPU-sized "
                          "sweeps/cpu/APPROACH.toml (pretrained, finetune, scratch)."),
        click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
                     help="Config file merged onto the defaults (sweeps/APPROACH.toml) and the --preset."),
        click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                     help="Override one config value, e.g. --set model.weights=none (repeatable)."),
        click.option("--study", "study_name", default=None, help="Study name (default: the approach)."),
        storage_options,
        click.option("--seed", type=int, default=0, show_default=True, help="Seeds the sampler and every trial."),
        click.option("--workers", type=click.IntRange(min=1), default=None,
                     help="Worker processes on this machine sharing the study (default 1, or one per --gpus)."),
        click.option("--gpus", default=None, metavar="IDS",
                     help="Pin one worker per GPU listed, e.g. --gpus 0,1 (sets each worker's CUDA_VISIBLE_DEVICES); "
                          "--gpus 0,0 runs two workers sharing GPU 0."),
    ]
    for decorator in reversed(decorators):
        func = decorator(func)
    return func


def check_preset(approach: str, preset: str | None) -> None:
    """Refuse an unknown ``--preset`` as click refuses an unknown APPROACH: a usage error."""
    if preset is not None:
        try:
            preset_path(approach, preset)
        except ConfigError as err:  # a name click could not check
            raise click.BadParameter(str(err), param_hint="'--preset'") from err
