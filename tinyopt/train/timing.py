"""One configuration's cost on this machine's device, timed on a few real batches: what ``tinyopt plan`` scales up.

``time_config`` builds a trial's model as a sweep would (precision, XLA, the activation cache's cut),
and times its first and its steady training, evaluation and prediction batches. The first of each
traces and compiles; the difference is a cost every trial pays once (``setup_s``), the steady time
one that each batch pays. Nothing is written: the activations of the few images timed stay in memory.
"""

from __future__ import annotations

import resource
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from tinyopt.core.config.sections import Config
from tinyopt.train import backend
from tinyopt.train.feeds import cache_refusal
from tinyopt.train.training import build_model, compile_model

# Steady batches timed after the first (which traces): the median of 3 ignores one disturbed by the machine.
STEADY_BATCHES = 3
# Images of the frozen layers' timed batches (the activation cache is built in batches of the eval batch size).
PREFIX_IMAGES = 64


@dataclass(frozen=True)
class Timing:
    """What one configuration costs, in seconds, bytes and images.

    Attributes:
        setup_s: building the model, compiling, and tracing its training, evaluation and prediction
            functions (what the first batch of each costs beyond a steady one).
        train_step_s: one steady training batch of ``batch_size`` (0 for an approach that does not train).
        eval_step_s: one steady evaluation batch of ``eval_batch`` (after each epoch, and for predictions).
        prefix_image_s: one image through the frozen layers into the activation cache (0 without the cache).
        prefix_trace_s: tracing the frozen layers' function, once per activation cache built.
        views: the views of each image the cache holds (2 with a flip) and a trial reads.
        cached: whether the trial reads cached activations.
        cache_image_bytes: the activations of one image and view (0 without the cache).
        batch_size, eval_batch: the batch sizes timed.
        model_params: the model's parameter count.
        model_bytes: its weights in bytes, about what a kept model's file takes.
        peak_memory: the GPU's peak bytes while timing, or on a CPU the process' peak resident bytes so far.
    """

    setup_s: float
    train_step_s: float
    eval_step_s: float
    prefix_image_s: float
    prefix_trace_s: float
    views: int
    cached: bool
    cache_image_bytes: int
    batch_size: int
    eval_batch: int
    model_params: int
    model_bytes: int
    peak_memory: int | None

    def epoch_s(self, train_images: int, selection_images: int) -> float:
        """One epoch: its training batches, then the selection split's evaluation."""
        return (_batches(train_images, self.batch_size) * self.train_step_s
                + _batches(selection_images, self.eval_batch) * self.eval_step_s)

    def cache_build_s(self, images: int) -> float:
        """Building an activation cache of ``images`` images (every view counted): traced once, then batches."""
        return self.prefix_trace_s + images * self.prefix_image_s


def _batches(images: int, batch: int) -> int:
    return -(-images // batch) if images else 0


def time_config(approach: Any, params: dict[str, Any], config: Config, images: np.ndarray, labels: np.ndarray,
                wnids: list[str], device: str) -> Timing:
    """Time one configuration's batches on real images, as a sweep's trial would run them.

    Args:
        approach: the approach module.
        params: every param of the trial, fixed ones included.
        config: the resolved config (precision, XLA, the activation cache).
        images, labels: uint8 images and their labels to time on (a batch's worth is enough; fewer are repeated).
        wnids: the dataset's classes.
        device: what ``tinyopt.train.backend.load`` returned.
    """
    backend.free_memory()
    backend.reset_peak_memory()
    backend.seed(0)
    started = time.perf_counter()
    model, _policy, eval_batch = build_model(approach, params, config, wnids, device)
    setup = time.perf_counter() - started
    trains = bool(approach.TRAINS)
    batch = int(params["batch_size"]) if trains else eval_batch
    x = _rows(images, max(batch, eval_batch))
    y = _rows(np.asarray(labels), max(batch, eval_batch))
    cached = cache_refusal(approach, params, config) is None
    prefix_image_s, prefix_trace_s, views, image_bytes, trainee = 0.0, 0.0, 1, 0, model
    if cached:
        started = time.perf_counter()
        cut = approach.split(model, params, model=config.model)  # every trial cuts its model (a reused cache too)
        setup += time.perf_counter() - started
        views, trainee = cut.views, cut.suffix
        # Timed on a few images: the time per image is the same, and a CPU takes seconds per batch at 224 px.
        few = min(eval_batch, PREFIX_IMAGES)
        first, steady, x = _timed(lambda: np.asarray(cut.prefix.predict_on_batch(x[:few])).astype(cut.dtype))
        x = _rows(x, max(batch, eval_batch))
        prefix_trace_s = max(first - steady, 0.0)
        prefix_image_s = steady / few
        image_bytes = int(np.prod(x.shape[1:])) * np.dtype(cut.dtype).itemsize
    train_step = eval_step = 0.0
    if trainee is not None:
        if trains:
            compile_model(trainee, params, config.train.jit_compile)
            first, train_step, _ = _timed(lambda: trainee.train_on_batch(x[:batch], y[:batch]))
            setup += first - train_step
            first, eval_step, _ = _timed(lambda: trainee.test_on_batch(x[:eval_batch], y[:eval_batch]))
            setup += first - eval_step
        first, steady, _ = _timed(lambda: trainee.predict_on_batch(x[:eval_batch]))
        setup += first - steady
        eval_step = max(eval_step, steady)
    peak = backend.peak_memory()
    if peak is None:
        peak = _max_rss()
    count = int(model.count_params())
    return Timing(setup_s=setup, train_step_s=train_step, eval_step_s=eval_step, prefix_image_s=prefix_image_s,
                  prefix_trace_s=prefix_trace_s,
                  views=views, cached=cached, cache_image_bytes=image_bytes, batch_size=batch, eval_batch=eval_batch,
                  model_params=count, model_bytes=4 * count, peak_memory=peak)


def _rows(array: np.ndarray, count: int) -> np.ndarray:
    """``count`` rows of ``array``, repeated when it has fewer."""
    array = np.asarray(array[:count])
    return array if len(array) >= count else np.resize(array, (count, *array.shape[1:]))


def _timed(step) -> tuple[float, float, Any]:
    """The first call's seconds, the median of ``STEADY_BATCHES`` more, and the last result."""
    started = time.perf_counter()
    result = step()
    first = time.perf_counter() - started
    steady = []
    for _ in range(STEADY_BATCHES):
        started = time.perf_counter()
        result = step()
        steady.append(time.perf_counter() - started)
    return first, statistics.median(steady), result


def _max_rss() -> int:
    """The process' peak resident bytes (Linux reports kilobytes, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)
