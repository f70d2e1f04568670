"""Warm start: a new study begins with the best trials of an earlier one (``tinyopt sweep --warm-start STUDY``).

After a change of the data slice, the backbone or the space, the best params of the earlier study are
the obvious first guesses. ``plan`` reads them before anything is created (refusing a study that does
not exist, holds another approach's trials or has no complete trial) and keeps, of each of the best
``study.warm_start_trials``, the values that the current space could have drawn
(``tinyopt.core.space.fitting``). ``queue`` enqueues them once per study, under the study's lock,
however many workers start: the study's ``warm_started_from`` attr tells every later worker, restart
or machine that it is done. Each queued trial carries ``warm_start_from`` (the earlier study and trial),
which its retries keep (``tinyopt.stores.retries.CARRIED_ON_RETRY``) and its MLflow run shows as a tag.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tinyopt.core import record
from tinyopt.core import space as search_space
from tinyopt.core.config.sections import Config
from tinyopt.core.errors import ConfigError, StudyError
from tinyopt.core.objective import of_study as objective_of_study
from tinyopt.core.urls import redact
from tinyopt.stores import storage as storages
from tinyopt.track.names import short_param


@dataclass(frozen=True)
class Drop:
    """A value of an earlier trial that the current space could not have drawn."""

    trial: int
    param: str
    value: Any
    reason: str  # tinyopt.core.space.fitting's: "outside 96..160", "not in this space", ...


@dataclass(frozen=True)
class WarmStart:
    """What a warm start queues, read from the earlier study before the new one is created.

    Attributes:
        study: the earlier study's name.
        storage: its storage URL, redacted (what the study's marker and the notes show).
        candidates: ``(trial number, params that fit here)`` of its best trials, the best first.
        drops: the values of those trials that were left out.
    """

    study: str
    storage: str
    candidates: tuple[tuple[int, dict[str, Any]], ...]
    drops: tuple[Drop, ...]


def plan(approach: str, name: str, config: Config, storage: str, source: str,
         source_storage: str | None = None) -> WarmStart:
    """Read the best ``study.warm_start_trials`` complete trials of study ``source``; create and change nothing.

    Args:
        approach: the approach being swept.
        name: the study being swept (a study cannot start from itself).
        config: its resolved config (its ``[space]`` decides which values fit).
        storage: the sweep's ``--storage``.
        source: the earlier study (``--warm-start``).
        source_storage: where it lives (``--warm-start-storage``; default ``storage``).

    Raises:
        ConfigError: the ensemble, whose weights depend on its members.
        StudyError: no such study (the storage's studies are named), one of another approach, one
            without a complete trial, the study being swept itself, or a storage that cannot be read.
    """
    import optuna

    if approach == "ensemble":
        raise ConfigError("--warm-start is for pretrained, finetune and scratch: an ensemble's weights belong to "
                          "its members, so another study's do not carry over; drop --warm-start")
    url = source_storage or storage
    where = redact(url)
    if source == name and storages.home(url, source) == storages.home(storage, name):
        raise StudyError(f"--warm-start {source} names the study being swept; name an earlier study, or sweep "
                         "into a new one with --study NAME")
    try:
        storages.check(url)
        names = storages.study_names(url)
    except StudyError as err:
        raise StudyError(f"warm start: {err}") from err
    if source not in names:
        known = f"its studies: {', '.join(names)}" if names else "it holds no study"
        raise StudyError(f"no study {source!r} in {where} to warm-start from ({known}); pass --warm-start with one "
                         "of them, or --warm-start-storage URL where the study lives")
    study = storages.load_study(source, url)
    owner = study.user_attrs.get(record.APPROACH)
    if owner is not None and owner != approach:
        raise StudyError(f"study {source!r} holds {owner} trials, not {approach}; warm-start from a {approach} study")
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not complete:
        raise StudyError(f"study {source!r} has no complete trial to warm-start from; sweep it until one completes, "
                         "or drop --warm-start")
    candidates, drops = [], []
    # By its objective; a study of several (accuracy and latency), by the first.
    for trial in objective_of_study(study).ranked(complete)[:config.study.warm_start_trials]:
        # Every value the trial ran with (fixed ones too: a param fixed there may be searched here).
        params = {**trial.user_attrs.get(record.PARAMS, {}), **trial.params}
        kept, dropped = search_space.fitting(config.space, params)
        candidates.append((trial.number, kept))
        drops += [Drop(trial.number, param, params[param], reason) for param, reason in dropped.items()]
    return WarmStart(source, where, tuple(candidates), tuple(drops))


def queue(study: Any, warm: WarmStart) -> str:
    """Enqueue the warm start's params in ``study``, unless it was warm-started before; the note that says so.

    Call it holding the study's lock (``tinyopt.stores.storage.study_lock``), so that of the workers
    starting together one queues and the others find the study's ``warm_started_from``. A params set
    that the study already holds (the defaults' first trial, another earlier trial's) is not queued twice.
    """
    import optuna

    done = study.user_attrs.get(record.WARM_STARTED_FROM)
    if done is not None:
        if (done["study"], done["storage"]) != (warm.study, warm.storage):
            return (f"study {study.study_name} was warm-started from study {done['study']} ({done['storage']}) "
                    f"already: --warm-start {warm.study} queued nothing")
        return (f"warm start from study {warm.study}: its trials {_numbers(done['trials'])} were queued when the "
                "study was first warm-started; nothing queued again")
    held = [trial.system_attrs.get("fixed_params", trial.params) for trial in study.get_trials(deepcopy=False)
            if trial.state != optuna.trial.TrialState.FAIL]
    queued, empty, repeated = [], [], []
    for number, params in warm.candidates:
        if not params or params in held:
            (repeated if params else empty).append(number)
            continue
        study.enqueue_trial(params, user_attrs={record.WARM_START_FROM: {"study": warm.study, "trial": number}})
        held.append(params)
        queued.append(number)
    study.set_user_attr(record.WARM_STARTED_FROM, {"study": warm.study, "storage": warm.storage, "trials": queued})
    return note(warm, queued, empty, repeated)


def note(warm: WarmStart, queued: Sequence[int], empty: Sequence[int] = (), repeated: Sequence[int] = ()) -> str:
    """One line: the trials queued, the values dropped (grouped by param and reason) and the trials not queued:
    those of which no value fits (``empty``) and those whose params the study holds already (``repeated``)."""
    line = f"warm start from study {warm.study}: queued " + (_trials(queued) if queued else "nothing")
    groups: dict[tuple[str, str], list[Drop]] = {}
    for drop in warm.drops:
        groups.setdefault((drop.param, drop.reason), []).append(drop)
    considered = len(warm.candidates)
    parts = []
    for (param, reason), drops in groups.items():
        values = "/".join(dict.fromkeys(short_param(drop.value) for drop in drops))
        trials = [drop.trial for drop in drops]
        which = "" if len(trials) == considered else f"{_trials(trials)}: "
        parts.append(f"{param}={values} ({which}{reason})")
    if parts:
        line += "; dropped " + (", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else parts[0])
    left = [f"{_trials(numbers)} ({why})" for numbers, why in
            ((empty, "no value fits here"), (repeated, "the same params as a trial here")) if numbers]
    return line + ("; not queued: " + ", ".join(left) if left else "")


def _numbers(numbers: Sequence[int]) -> str:
    return ", ".join(map(str, numbers))


def _trials(numbers: Sequence[int]) -> str:
    return f"trial{'s' if len(numbers) > 1 else ''} {_numbers(numbers)}"

