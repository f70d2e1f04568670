"""Options shared by several commands, defined once."""

from __future__ import annotations

import click

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
