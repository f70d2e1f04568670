"""Search spaces as data: the one place where a ``[space]`` table becomes ``trial.suggest_*`` calls.

Each entry of a ``[space]`` table is either a plain value (fixed for every trial) or a table::

    learning_rate = { type = "float", low = 1e-4, high = 1e-1, log = true }
    blocks        = { type = "int", low = 1, high = 3 }
    optimizer     = { type = "categorical", choices = ["sgd", "adam"] }
    momentum      = { type = "float", low = 0.8, high = 0.99, when = { optimizer = "sgd" } }

``when`` makes an entry conditional on earlier ones (a value or a list of values); an entry whose
condition fails is left out of the trial's params. ``default`` sets the value used by the first,
enqueued trial and by tests that build a model "with defaults".
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from tinyopt.core.errors import ConfigError

_FIELDS = {
    "float": {"type", "low", "high", "log", "step", "when", "default"},
    "int": {"type", "low", "high", "log", "step", "when", "default"},
    "categorical": {"type", "choices", "when", "default"},
}


def is_distribution(entry: Any) -> bool:
    """True when a space entry is a distribution table rather than a fixed value."""
    return isinstance(entry, dict) and "type" in entry


def _fail(name: str, problem: str) -> ConfigError:
    return ConfigError(f"search space entry {name!r}: {problem}")


def _validate_entry(name: str, entry: Any, earlier: set[str]) -> None:
    if not is_distribution(entry):
        if isinstance(entry, dict):
            raise _fail(name, f"a table needs a 'type' (one of {', '.join(_FIELDS)}), got keys {sorted(entry)}")
        return
    kind = entry["type"]
    if kind not in _FIELDS:
        raise _fail(name, f"unknown type {kind!r}; use one of {', '.join(_FIELDS)}")
    extra = set(entry) - _FIELDS[kind]
    if extra:
        raise _fail(name, f"unknown field(s) {sorted(extra)} for type {kind!r}; allowed: {sorted(_FIELDS[kind])}")
    when = entry.get("when", {})
    if not isinstance(when, dict) or not set(when) <= earlier:
        raise _fail(name, f"'when' must name earlier entries of the space, got {when!r}")
    if kind == "categorical":
        choices = entry.get("choices")
        if not isinstance(choices, list) or not choices:
            raise _fail(name, "categorical needs a non-empty list 'choices'")
        if "default" in entry and entry["default"] not in choices:
            raise _fail(name, f"default {entry['default']!r} is not among the choices {choices}")
        return
    low, high = entry.get("low"), entry.get("high")
    number = int if kind == "int" else (int, float)
    if not isinstance(low, number) or not isinstance(high, number) or isinstance(low, bool):
        raise _fail(name, f"{kind} needs numeric 'low' and 'high', got low={low!r} high={high!r}")
    if low > high:
        raise _fail(name, f"low ({low}) is greater than high ({high}); swap them")
    if entry.get("log") and low <= 0:
        raise _fail(name, f"log scale needs low > 0, got {low}")
    if entry.get("log") and "step" in entry:
        raise _fail(name, "'log' and 'step' cannot be combined; drop one")
    if "default" in entry and not low <= entry["default"] <= high:
        raise _fail(name, f"default {entry['default']} is outside [{low}, {high}]")


def validate_space(space: Mapping[str, Any]) -> None:
    """Check a ``[space]`` table without sampling it.

    Raises:
        ConfigError: naming the first malformed entry and what is wrong with it.
    """
    if not isinstance(space, Mapping):
        raise ConfigError(f"[space] must be a table, got {type(space).__name__}")
    earlier: set[str] = set()
    for name, entry in space.items():
        _validate_entry(name, entry, earlier)
        earlier.add(name)


def combinations(space: Mapping[str, Any]) -> int | None:
    """How many distinct trials a ``[space]`` holds (None: infinitely many, a float without a step).

    Counted as if every conditional entry applied, so a bound when some have ``when``.
    """
    count = 1
    for entry in space.values():
        if not is_distribution(entry):
            continue
        if entry["type"] == "categorical":
            count *= len(entry["choices"])
        elif entry["type"] == "int" or "step" in entry:  # a log scale takes no step: every int counts
            count *= int(round((entry["high"] - entry["low"]) / entry.get("step", 1))) + 1
        else:
            return None
    return count


def _applies(entry: Any, params: dict[str, Any]) -> bool:
    if not is_distribution(entry):
        return True
    for key, wanted in entry.get("when", {}).items():
        allowed = wanted if isinstance(wanted, list) else [wanted]
        if key not in params or params[key] not in allowed:
            return False
    return True


def suggest(trial: Any, space: Mapping[str, Any]) -> dict[str, Any]:
    """Sample one set of hyperparameters from a validated ``[space]`` table.

    Args:
        trial: an ``optuna.Trial`` (anything with ``suggest_float/int/categorical``).
        space: the ``[space]`` table of a resolved config.

    Returns:
        Plain ``{name: value}`` params, fixed values included, inapplicable conditionals left out.
    """
    params: dict[str, Any] = {}
    for name, entry in space.items():
        if not _applies(entry, params):
            continue
        if not is_distribution(entry):
            params[name] = entry
        elif entry["type"] == "categorical":
            params[name] = trial.suggest_categorical(name, entry["choices"])
        elif entry["type"] == "int":
            params[name] = trial.suggest_int(name, entry["low"], entry["high"], step=entry.get("step", 1),
                                             log=entry.get("log", False))
        else:
            params[name] = trial.suggest_float(name, entry["low"], entry["high"], step=entry.get("step"),
                                               log=entry.get("log", False))
    return params


def _default_of(entry: dict[str, Any]) -> Any:
    if "default" in entry:
        return entry["default"]
    if entry["type"] == "categorical":
        return entry["choices"][0]
    low, high = entry["low"], entry["high"]
    middle = math.sqrt(low * high) if entry.get("log") else (low + high) / 2
    if "step" in entry:
        middle = low + round((middle - low) / entry["step"]) * entry["step"]
    return round(middle) if entry["type"] == "int" else middle


def defaults(space: Mapping[str, Any]) -> dict[str, Any]:
    """The default params of a space: explicit ``default``, else first choice or the (log-)midpoint."""
    params: dict[str, Any] = {}
    for name, entry in space.items():
        if _applies(entry, params):
            params[name] = _default_of(entry) if is_distribution(entry) else entry
    return params


def searched(space: Mapping[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """The subset of ``params`` that Optuna samples (for ``study.enqueue_trial``)."""
    return {k: v for k, v in params.items() if is_distribution(space.get(k))}


def in_every_trial(space: Mapping[str, Any]) -> list[str]:
    """The searched entries every trial samples: the distributions without a ``when``."""
    return [name for name, entry in space.items() if is_distribution(entry) and "when" not in entry]


def distribution(entry: Mapping[str, Any]) -> Any:
    """The Optuna distribution ``suggest`` draws a distribution entry from (``optuna.distributions``)."""
    from optuna import distributions

    if entry["type"] == "categorical":
        return distributions.CategoricalDistribution(entry["choices"])
    if entry["type"] == "int":
        return distributions.IntDistribution(entry["low"], entry["high"], log=entry.get("log", False),
                                             step=entry.get("step", 1))
    return distributions.FloatDistribution(entry["low"], entry["high"], log=entry.get("log", False),
                                           step=entry.get("step"))


def _outside(entry: Mapping[str, Any]) -> str:
    if entry["type"] == "categorical":
        return f"not among {', '.join(map(str, entry['choices']))}"
    step = f" step {entry['step']:g}" if entry.get("step", 1) != 1 else ""
    return f"outside {entry['low']:g}..{entry['high']:g}{step}"


def fitting(space: Mapping[str, Any], params: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """Which of ``params`` (another space's trial) this space could have drawn, for ``study.enqueue_trial``.

    Walks the space as ``suggest`` does. A searched entry takes its value from ``params`` when the value
    lies in its distribution; a searched entry that ``params`` lacks is left to the sampler, and so is the
    decision of an entry whose ``when`` names one (its value is kept if it fits: Optuna ignores a queued
    value that the trial never asks for).

    Returns:
        The kept values (searched entries only, as Optuna stores them), and for every other param of
        ``params`` why it was dropped: ``outside 96..160``, ``not among sgd, adam``, ``fixed at 3 here``,
        ``not used here with optimizer=adam``, ``not in this space``. A param fixed here at the value
        it had is neither.
    """
    known: dict[str, Any] = {}  # the values a trial of this space would run with, as far as they are known
    open_: set[str] = set()  # searched entries whose value the sampler will choose
    kept: dict[str, Any] = {}
    dropped = {name: "not in this space" for name in params if name not in space}
    for name, entry in space.items():
        if not is_distribution(entry):
            known[name] = entry
            if name in params and params[name] != entry:
                dropped[name] = f"fixed at {entry} here"
            continue
        undecided = bool(set(entry.get("when", {})) & open_)
        if not undecided and not _applies(entry, known):
            if name in params:
                dropped[name] = "not used here with " + ", ".join(f"{key}={known.get(key, '(unset)')}"
                                                                  for key in entry["when"])
            continue
        if name not in params:
            open_.add(name)
            continue
        drawn = distribution(entry)
        try:
            value = drawn.to_external_repr(drawn.to_internal_repr(params[name]))
            fits = drawn._contains(drawn.to_internal_repr(value))  # Optuna's own test of a queued value
        except (ValueError, TypeError):
            fits = False
        if fits:
            kept[name] = known[name] = value
        else:
            dropped[name] = _outside(entry)
            open_.add(name)
    return kept, {name: dropped[name] for name in params if name in dropped}
