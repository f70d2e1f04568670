"""``tinyopt plan``: what a sweep will cost on this machine, forecast before it runs.

A few batches of representative configurations are timed on the device (``tinyopt.train.timing``):
the space's defaults (the study's first trial), its most expensive corner (the largest input, most
trainable stages, widest, longest) and a few random draws, which stand for the trials the sampler
will propose. The epochs a trial trains under the configured pruner are simulated with Optuna's own
pruner on synthetic learning curves; the activation caches the trials build, and the disk they and the
kept models take, follow from the draws. Nothing is created: no study, no run, no file.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna

from tinyopt.core import space as search_space
from tinyopt.core.config.sections import Config
from tinyopt.core.forecast import ConfigCost, Forecast
from tinyopt.data.splits import SweepData
from tinyopt.models import approaches
from tinyopt.sweep.sampling import make_pruner, max_epochs, pruning_note
from tinyopt.train.feeds import cache_refusal, cached_resize
from tinyopt.train.timing import Timing, time_config

# Random draws of the space timed besides its defaults and its most expensive corner: they stand for
# the trials the sampler proposes. Two keep `tinyopt plan` under a minute on the CPU presets.
SAMPLES = 2
# Draws of the space from which the activation caches and the epochs of the trials are counted.
DRAWS = 200
# Simulated sweeps whose pruned epochs are averaged, of at most SIMULATED_TRIALS trials each (the pruners'
# share of pruned epochs settles well before: each simulated trial costs Optuna milliseconds).
SIMULATIONS = 6
SIMULATED_TRIALS = 50
# What a trial costs besides its batches, not timed here: starting its MLflow run, a clean Keras session,
# the parent run's summary (most of the logging runs in the background). An estimate: the per-trial
# overhead of benchmarks/bench_trial_overhead.py is under a second; benchmarks/bench_plan.py checks the sum.
TRIAL_OVERHEAD_S = 1.2
# Params that size a model's work: the corner of the space with the largest of each is the most expensive.
COSTLY = ("input_size", "trainable_stages", "width", "stages", "blocks", "convs", "head_width", "epochs",
          "batch_size")
# What ``tinyopt plan`` shows of a configuration: the params that change what it costs.
COST_PARAMS = (*COSTLY, "stem_stride", "resize", "augment", "flip_tta", "residual")


def representatives(space: Mapping[str, Any], seed: int, samples: int = SAMPLES) -> list[tuple[str, dict[str, Any]]]:
    """The configurations ``plan`` times: defaults, the most expensive corner, ``samples`` random draws.

    A draw equal to a configuration already listed is left out.
    """
    chosen = [("defaults", search_space.defaults(space))]
    corner = _most_expensive(space)
    if corner != chosen[0][1]:
        chosen.append(("most expensive", corner))
    drawn = 0
    for params in draws(space, seed, samples * 3):
        if drawn < samples and all(params != other for _, other in chosen):
            drawn += 1
            chosen.append((f"sample {drawn}", params))
    return chosen


def draws(space: Mapping[str, Any], seed: int, count: int) -> list[dict[str, Any]]:
    """``count`` params drawn at random from the space, as a sweep's start-up trials are."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    return [search_space.suggest(study.ask(), space) for _ in range(count)]


def _most_expensive(space: Mapping[str, Any]) -> dict[str, Any]:
    """The defaults, with the largest value of every searched param of ``COSTLY`` (conditions follow them)."""
    base, corner = search_space.defaults(space), {}
    for name in COSTLY:
        entry = space.get(name)
        if name in base and search_space.is_distribution(entry):
            numbers = [c for c in entry.get("choices", ()) if isinstance(c, int | float) and not isinstance(c, bool)]
            if entry["type"] != "categorical" or numbers:
                corner[name] = max(numbers) if entry["type"] == "categorical" else entry["high"]
    return search_space.defaults({**space, **corner})


def expected_epochs(config: Config, epochs: list[int], seed: int) -> float:
    """The mean epochs a trial trains when a sweep's trials, of ``epochs`` epochs each, meet the pruner.

    Each simulated trial reports a synthetic learning curve (a final score drawn at random, reached at a
    random pace, with noise) to Optuna's pruner as a sweep's trials report the selection top-1 after each
    epoch; the epochs it reports until pruned are counted. Early stopping is not simulated.
    """
    if not epochs:
        return 0.0
    rng = np.random.default_rng(seed)
    totals = []
    for _ in range(SIMULATIONS):
        pruner = make_pruner(config.study, max_epochs(config.space))
        study = optuna.create_study(direction="maximize", pruner=pruner)
        trained = 0
        for length in epochs:
            trial = study.ask()
            final, pace = rng.uniform(0.1, 0.6), rng.uniform(0.5, 3.0)
            score = 0.0
            for epoch in range(length):
                score = final * (1 - math.exp(-(epoch + 1) / pace)) + rng.normal(0, 0.005)
                trial.report(score, epoch + 1)
                trained += 1
                if epoch + 1 < length and trial.should_prune():
                    break
            study.tell(trial, score)
        totals.append(trained / len(epochs))
    return float(np.mean(totals))


def forecast(approach: str, config: Config, data: SweepData, device: str, *, trials: int | None,
             timeout: float | None, workers: int = 1, devices: int = 1, seed: int = 0,
             startup_s: float = 0.0) -> Forecast:
    """Time the representative configurations and forecast the sweep's cost (see the module's docstring).

    Args:
        approach: ``pretrained``, ``finetune`` or ``scratch``.
        config: the resolved config.
        data: the sweep's data (its splits' sizes are what the trials train and score on).
        device: what ``tinyopt.train.backend.load`` returned.
        trials: the trials the sweep adds (None: as many as ``timeout`` lets).
        timeout: the sweep's ``--timeout`` in seconds.
        workers: processes sharing the trials.
        devices: the GPUs they run on (``--gpus``; 1 on a CPU): workers sharing a device share its time.
        seed: the sweep's ``--seed`` (the draws of the space).
        startup_s: what the sweep's start costs before its first trial (measured by the caller).
    """
    started = time.perf_counter()
    module = approaches.get_approach(approach)
    trains = bool(module.TRAINS)
    images, labels = data.splits["train"]
    sizes = {split: len(data.splits[split][1]) for split in ("train", "selection", "test")}
    costs, timed = [], []
    for label, params in representatives(config.space, seed):
        timing = time_config(module, params, config, images[:512], labels[:512], data.wnids, device)
        costs.append(_cost(label, params, timing, sizes, trains))
        timed.append((params, timing))
    sampled = [c for c in costs if c.label.startswith("sample")] or costs[:1]
    population = draws(config.space, seed + 1, DRAWS)
    cached = [p if cache_refusal(module, p, config) is None else None for p in population]
    epochs = [int(p.get("epochs", 0)) if trains else 0 for p in population]
    # The study's first trial is the defaults, trained to its end (no pruner judges a first trial); the
    # sampler's draws follow, each of the sampled configurations' mean cost.
    first = costs[0]
    simulated = min(trials or DRAWS, SIMULATED_TRIALS)
    pruned = expected_epochs(config, [first.epochs, *epochs[:simulated - 1]], seed) if trains else 0.0
    later_epochs = (pruned * simulated - first.epochs) / (simulated - 1) if simulated > 1 else pruned
    parallel = max(min(workers, devices), 1)
    later = (float(np.mean([c.setup_s + c.score_s for c in sampled])) + TRIAL_OVERHEAD_S
             + later_epochs * float(np.mean([c.epoch_s for c in sampled])))
    count = trials
    if count is None:  # until --timeout: as many as fit, before the caches they build are counted
        count = 1 + int(max(((timeout or 0) - startup_s) * parallel - first.trial_s, 0) // max(later, 1e-9))
    caches = _cache_cost(cached, count, timed, sizes, trains, seed)
    trial_s = (first.trial_s + (count - 1) * later + caches.seconds) / count
    wall = startup_s + trial_s * (trials or 0) / parallel
    fits = None
    if timeout is not None:
        fits = max(int((timeout - startup_s) * parallel // trial_s), 0)
        fits = fits if trials is None else min(fits, trials)
        wall = min(wall, timeout) if trials is not None else timeout
    peaks = [c.peak_memory for c in costs if c.peak_memory is not None]
    disk = {"models": min(config.study.keep_models or 0, count) * int(np.mean([c.model_bytes for c in sampled])),
            # Every trial logs the class probabilities (float32) of each selection and test image.
            "predictions": count * (sizes["selection"] + sizes["test"]) * len(data.wnids) * 4,
            "activation_cache": int(caches.bytes)}
    return Forecast(approach=approach, device=device, trials=trials, workers=workers, timeout=timeout,
                    pruner=config.study.pruner if trains and not pruning_note(config.study) else "none",
                    configs=costs, startup_s=startup_s,
                    epochs_per_trial=pruned, max_epochs=max(epochs, default=0), trial_s=trial_s,
                    cache_keys=caches.keys, wall_s=wall, fits=fits, peak_memory=max(peaks) if peaks else None,
                    disk=disk, measured_s=time.perf_counter() - started, parallel=parallel)


def _cost(label: str, params: dict[str, Any], timing: Timing, sizes: dict[str, int], trains: bool) -> ConfigCost:
    epochs = int(params.get("epochs", 0)) if trains else 0
    epoch_s = timing.epoch_s(sizes["train"], sizes["selection"]) if trains else 0.0
    scored = sizes["selection"] + sizes["test"]
    final = -(-scored // timing.eval_batch) * timing.eval_step_s
    # A training trial caches every view of the train images and the selection and test images once;
    # a scoring one (pretrained) every view of the selection and test images.
    images = timing.views * sizes["train"] + scored if trains else timing.views * scored
    return ConfigCost(label=label, params=params, setup_s=timing.setup_s, epoch_s=epoch_s, score_s=final,
                      trial_s=timing.setup_s + epochs * epoch_s + final + TRIAL_OVERHEAD_S, epochs=epochs,
                      cache_build_s=timing.cache_build_s(images) if timing.cached else 0.0,
                      cache_bytes=images * timing.cache_image_bytes, model_params=timing.model_params,
                      model_bytes=timing.model_bytes, peak_memory=timing.peak_memory)


@dataclass(frozen=True)
class _Caches:
    """The activation caches a sweep is expected to build: their seconds, how many, their bytes."""

    seconds: float
    keys: float
    bytes: float


def _cache_cost(cached: list[dict[str, Any] | None], trials: int, timed: list[tuple[dict[str, Any], Timing]],
                sizes: dict[str, int], trains: bool, seed: int) -> _Caches:
    """Build the caches ``trials`` draws of the space need, each once, on average over simulated sweeps.

    ``cached`` holds draws of the space (None where the draw reads no cache). A cache is built per key
    and view (``_units``); its cost per image grows with the pixels of its input size, at the rate the
    timed configurations measured, and so do its bytes.
    """
    measured = [(params, timing) for params, timing in timed if timing.cached]
    if not measured or not any(cached):
        return _Caches(0.0, 0.0, 0.0)
    per_pixel = np.mean([t.prefix_image_s / p["input_size"] ** 2 for p, t in measured])
    bytes_per_pixel = np.mean([t.cache_image_bytes / p["input_size"] ** 2 for p, t in measured])
    trace = np.mean([t.prefix_trace_s for _, t in measured])
    rng = np.random.default_rng(seed)
    runs = []
    for _ in range(SIMULATIONS):
        units: dict[tuple, tuple[int, int]] = {}
        for index in rng.integers(0, len(cached), trials):
            if cached[index] is not None:
                units.update(_units(cached[index], sizes, trains))
        pixels = sum(images * size ** 2 for images, size in units.values())
        keys = len({unit[0] for unit in units})
        runs.append((keys * trace + pixels * per_pixel, keys, pixels * bytes_per_pixel))
    seconds, keys, size = np.mean(runs, axis=0)
    return _Caches(float(seconds), float(keys), float(size))


def _units(params: dict[str, Any], sizes: dict[str, int], trains: bool) -> dict[tuple, tuple[int, int]]:
    """The caches a trial of ``params`` reads, by (key, split, view): (their images, the input size).

    The key is what ``tinyopt.objectives.model`` caches by besides what all trials share: the input size,
    the resize (none at the images' own size), and where the frozen stages end. A flip (``augment =
    "flip"`` while training, ``flip_tta`` while scoring) adds the mirrored view.
    """
    size = int(params["input_size"])
    key = (size, cached_resize(params), params.get("trainable_stages"))
    views = range(2 if params.get("augment") == "flip" or params.get("flip_tta") else 1)
    if trains:
        needs = [("train", view) for view in views] + [("selection", 0), ("test", 0)]
    else:
        needs = [(split, view) for split in ("selection", "test") for view in views]
    return {(key, split, view): (sizes[split], size) for split, view in needs}
