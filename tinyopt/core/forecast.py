"""A sweep's forecast (``tinyopt plan``) and what happened, side by side.

The forecast is measured by ``tinyopt.sweep.plan`` and stored with the study when a sweep creates it
(user attr ``record.FORECAST``); ``Actual.of_study`` reads the same figures from the trials as they
ended, so that the sweep's parent run and ``tinyopt report`` show both under the same names.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tinyopt.core import record
from tinyopt.core.errors import ConfigError


@dataclass(frozen=True)
class ConfigCost:
    """One representative configuration of the space, as timed on the device.

    Attributes:
        label: ``defaults``, ``most expensive``, ``sample 1`` ...
        params: its params (what differs between configurations is what a person reads).
        setup_s: building, compiling and tracing, once per trial.
        epoch_s: one epoch: training batches and the selection split's evaluation.
        score_s: the predictions of the selection and test splits, once per trial.
        trial_s: one trial of it at its full epochs (cache builds excluded: they are shared).
        epochs: the epochs it trains unless pruned or stopped early.
        cache_build_s: building its activation cache once (0 without the cache).
        cache_bytes: the disk its activation cache takes (0 without the cache).
        model_params: its parameter count.
        model_bytes: its weights, about the size of a kept model's file.
        peak_memory: GPU peak bytes, or on a CPU the process' peak resident bytes (None: unknown).
    """

    label: str
    params: dict[str, Any]
    setup_s: float
    epoch_s: float
    score_s: float
    trial_s: float
    epochs: int
    cache_build_s: float
    cache_bytes: int
    model_params: int
    model_bytes: int
    peak_memory: int | None


@dataclass(frozen=True)
class Forecast:
    """What a sweep of ``trials`` trials in ``workers`` processes is expected to cost on ``device``.

    Attributes:
        approach, device: what it was measured for and on.
        trials, workers, timeout: the sweep's options (``trials`` None: until ``timeout``).
        parallel: the trials that run side by side: one per device the workers have (``--gpus``), one on a
            CPU or one shared GPU, whose workers share its cores.
        pruner: the ``study.pruner`` the expected epochs were simulated under.
        configs: the representative configurations timed.
        startup_s: a sweep's start before its first trial (imports, data, device).
        epochs_per_trial: the mean epochs a trial trains under the pruner (``max_epochs`` unpruned).
        max_epochs: the most a trial of the space trains.
        trial_s: a trial's expected seconds (the mean over the space's draws).
        cache_keys: the expected number of distinct activation caches the trials build.
        wall_s: the expected wall time of the whole sweep, start-up included.
        fits: with a ``timeout``, how many trials are expected to end within it (None without).
        peak_memory: the largest of the configurations' peaks.
        disk: bytes by what takes them: ``models`` (kept), ``predictions`` (every trial's), ``activation_cache``.
        measured_s: how long the measuring took.
    """

    approach: str
    device: str
    trials: int | None
    workers: int
    timeout: float | None
    pruner: str
    configs: list[ConfigCost]
    startup_s: float
    epochs_per_trial: float
    max_epochs: int
    trial_s: float
    cache_keys: float
    wall_s: float
    fits: int | None
    peak_memory: int | None
    disk: dict[str, int] = field(default_factory=dict)
    measured_s: float = 0.0
    parallel: int = 1

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-able dicts: what ``--json`` prints and the study stores."""
        return asdict(self)

    @classmethod
    def from_dict(cls, stored: dict[str, Any]) -> Forecast:
        """The forecast a study stored (``as_dict``'s form)."""
        values = dict(stored)
        values["configs"] = [ConfigCost(**config) for config in stored["configs"]]
        return cls(**values)


def read(path: str | Path, approach: str) -> Forecast:
    """The forecast ``tinyopt plan APPROACH --json`` wrote to ``path``.

    Raises:
        ConfigError: the file cannot be read, is not such a forecast (damaged, or another program's), or
            is the forecast of another approach.
    """
    fix = f"write it again with `tinyopt plan {approach} ... --json > {path}`"
    try:
        forecast = Forecast.from_dict(json.loads(Path(path).read_text()))
    except OSError as err:
        raise ConfigError(f"cannot read the forecast {path} ({err.strerror or err}); {fix}") from err
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        raise ConfigError(f"{path} is not a forecast of `tinyopt plan --json` (damaged or another file: "
                          f"{type(err).__name__}); {fix}") from err
    numbers = (forecast.trial_s, forecast.wall_s, forecast.startup_s, forecast.epochs_per_trial, forecast.workers)
    if not all(isinstance(n, int | float) and n >= 0 for n in numbers):
        raise ConfigError(f"{path} is not a forecast of `tinyopt plan --json` (a figure is not a number); {fix}")
    if forecast.approach != approach:
        raise ConfigError(f"{path} forecasts a {forecast.approach} sweep, not {approach}; {fix}")
    return forecast


def stored(attr: Any) -> Forecast | None:
    """The forecast a study keeps (user attr ``record.FORECAST``); None where it has none or it is damaged."""
    try:
        return Forecast.from_dict(attr) if attr is not None else None
    except (ValueError, TypeError, KeyError, AttributeError):
        return None  # a forecast is a comparison to show, never a reason to refuse a study


def metrics(forecast: Forecast, actual: Actual) -> dict[str, float]:
    """The forecast and what happened, under the names of the sweep's parent run's metrics.

    The wall time is compared for the trials that ran: a study stopped after 3 of 10 trials is compared
    with the forecast of 3.
    """
    return {record.FORECAST_WALL_SECONDS: forecast.trial_s * actual.trials / max(forecast.parallel, 1),
            record.WALL_SECONDS: actual.wall_s, record.FORECAST_TRIAL_SECONDS: forecast.trial_s,
            record.TRIAL_SECONDS_MEAN: actual.trial_s}


@dataclass(frozen=True)
class Actual:
    """What a study's finished trials cost: the same figures as ``Forecast``'s, measured.

    Attributes:
        trials: finished trials (complete, pruned or failed).
        wall_s: from the first trial's start to the last one's end.
        trial_s: the mean seconds of a trial.
        epochs_per_trial: the mean epochs a trial reported.
    """

    trials: int
    wall_s: float
    trial_s: float
    epochs_per_trial: float

    @classmethod
    def of_study(cls, trials: list[Any]) -> Actual | None:
        """From a study's trials (``FrozenTrial``); None while none has finished."""
        done = [t for t in trials if t.state.is_finished() and t.datetime_start and t.datetime_complete]
        if not done:
            return None
        wall = (max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)).total_seconds()
        seconds = [(t.datetime_complete - t.datetime_start).total_seconds() for t in done]
        return cls(trials=len(done), wall_s=wall, trial_s=sum(seconds) / len(done),
                   epochs_per_trial=sum(len(t.intermediate_values) for t in done) / len(done))


def comparison(forecast: Forecast, actual: Actual) -> list[tuple[str, str, str, str]]:
    """Rows of (figure, forecast, actual, actual/forecast) for a person to read."""
    figures = metrics(forecast, actual)
    rows = [("seconds per trial", figures[record.FORECAST_TRIAL_SECONDS], figures[record.TRIAL_SECONDS_MEAN]),
            ("epochs per trial", forecast.epochs_per_trial, actual.epochs_per_trial),
            (f"wall time of {actual.trials} trials (seconds)", figures[record.FORECAST_WALL_SECONDS],
             figures[record.WALL_SECONDS])]
    return [(name, f"{expected:.1f}", f"{seen:.1f}", f"{seen / expected:.2f}x" if expected > 0 else "-")
            for name, expected, seen in rows]


HEADER = ("figure", "forecast", "actual", "actual / forecast")


def eta(durations: Sequence[float], left: int | None, running_for: float = 0.0, expected: float | None = None,
        until_deadline: float | None = None, workers: int = 1) -> float | None:
    """Seconds until a sweep ends, from its trials so far.

    Args:
        durations: the seconds of the trials this sweep finished.
        left: the trials still to run, the running one included (None: the sweep runs until its deadline).
        running_for: how long the running trial has run (its part is already done).
        expected: a trial's seconds before any has finished (a forecast's), if known.
        until_deadline: the seconds ``--timeout`` leaves, which the sweep never runs past.
        workers: processes running the trials left side by side.

    Returns:
        The seconds left, or None when nothing tells yet.
    """
    per = sum(durations) / len(durations) if durations else expected
    if left is None or per is None:
        return None if until_deadline is None else max(until_deadline, 0.0)
    seconds = max(left * per / max(workers, 1) - running_for, 0.0)
    return seconds if until_deadline is None else min(seconds, max(until_deadline, 0.0))


def format_seconds(seconds: float) -> str:
    """``1h 02m``, ``3m 05s`` or ``12s``."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"
