"""The objective of the model approaches: build, (train), score and record one trial.

One class serves pretrained, finetune and scratch: an approach module says how to build its model
and whether it trains (``tinyopt.models.approaches``). Every trial gets a clean Keras session, its own
MLflow run, and leaves behind the selection and test probabilities the ensemble study reads.
"""

from __future__ import annotations

import functools
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

from tinyopt.core import record, signals
from tinyopt.core import space as search_space
from tinyopt.core.config.sections import Config
from tinyopt.core.errors import TinyoptError, TrialError
from tinyopt.core.objective import keeps_model, objectives_of
from tinyopt.core.plots import learning_curve
from tinyopt.core.worker import identity as worker_identity
from tinyopt.data.activations import CacheUnavailable, Store, ram_budget
from tinyopt.data.splits import SweepData
from tinyopt.objectives.callbacks import deadline_stop, progress_callback, trial_callback
from tinyopt.objectives.events import Events, QuietEvents
from tinyopt.stores import notes
from tinyopt.stores.retries import retried_from
from tinyopt.track.names import model_name  # pure names: no mlflow loads with it
from tinyopt.train import backend, latency
from tinyopt.train.checkpoints import Checkpoints
from tinyopt.train.feeds import CachedFeed, ImageFeed, cache_refusal, cached_resize
from tinyopt.train.metrics import scores
from tinyopt.train.training import (
    build_model,
    compile_model,
    early_stopping_start,
    inference_model,
    lr_at_epoch,
)


class TrialFailed(Exception):
    """Raised to Optuna for a failed trial whose reason is already recorded (the sweep goes on)."""


class TrackedObjective:
    """An objective whose every trial is one MLflow run, closed with the state Optuna gives the trial.

    Subclasses say how a trial's params are chosen (``choose``) and how it is scored (``evaluate``).
    A ``TrialError`` or any unexpected exception fails only this trial (recorded with its reason
    and traceback; the sweep goes on); any other ``TinyoptError`` stops the sweep; a pruned trial's
    run is KILLED, and so is the run of a trial interrupted with Ctrl-C.
    """

    def __init__(self, config: Config, tracker: Any, events: Events | None, device: str):
        self.config = config
        self.tracker = tracker
        self.events = events or QuietEvents()
        self.device = device
        self.retry_of: int | None = None  # the trial the current one was queued to replace (the chain's first)
        self.previous_run: str | None = None  # the run of the attempt it replaces

    def choose(self, trial) -> dict[str, Any]:
        """The trial's params (every value, fixed ones included)."""
        raise NotImplementedError

    def evaluate(self, trial, params: dict[str, Any], run) -> float:
        """Score the trial, log its results to ``run`` and return the value Optuna maximises."""
        raise NotImplementedError

    def epochs(self, params: dict[str, Any]) -> int:
        """Epochs the trial will train, for progress display (0: no training)."""
        return 0

    def logged_params(self, trial, params: dict[str, Any]) -> dict[str, Any]:
        """The params its MLflow run lists: the searched ones (the others are in its config and description)."""
        return dict(trial.params)

    def headline(self, params: dict[str, Any]) -> dict[str, Any]:
        """The params its run name shows: ``study.run_name`` of the config."""
        return headline(self.config, params)

    def __call__(self, trial) -> float:
        import optuna

        # First of all: from here on, a trial whose process dies is recognised as dead (tinyopt.sweep.recovery).
        worker = worker_identity()
        trial.set_user_attr(record.WORKER, worker)
        # A trial queued again carries the run of the attempt it replaces (tinyopt.stores.retries.CARRIED_ON_RETRY).
        self.retry_of = retried_from(trial)
        self.previous_run = trial.user_attrs.get(record.RUN_ID) if self.retry_of is not None else None
        params = self.choose(trial)
        trial.set_user_attr(record.PARAMS, params)
        logged = self.logged_params(trial, params)
        run = self.tracker.start_trial(trial.number, {**params, **logged}, self.config,
                                       tags={record.TAG_DEVICE: self.device, record.TAG_BACKEND: backend.name(),
                                             record.TAG_WORKER: f"{worker['host']}:{worker['pid']}",
                                             **record.warm_start_tags(trial.user_attrs)},
                                       searched=logged, headline=self.headline(params),
                                       system_metrics=system_metrics(self.config, self.device))
        trial.set_user_attr(record.RUN_ID, run.run_id)
        url = self.tracker.run_url(run.run_id)
        trial.set_user_attr(record.RUN_URL, url)
        notes.save(trial, f"[MLflow run of trial {trial.number}]({url})")  # a link in optuna-dashboard
        if self.previous_run:
            self.tracker.link_takeover(self.previous_run, trial.number, url)
        started = time.perf_counter()
        try:
            with signals.interruptible():
                self.events.trial_started(trial.number, self.epochs(params))
                value = self.evaluate(trial, params, run)
        except optuna.TrialPruned as pruned:
            seconds = time.perf_counter() - started
            trial.set_user_attr(record.SECONDS, seconds)
            run.log_metrics({record.TRIAL_SECONDS: seconds})
            run.end("PRUNED", str(pruned) or None)
            self.events.trial_ended(trial.number, "PRUNED", None, str(pruned))
            raise
        except KeyboardInterrupt as stop:
            # Optuna fails the trial and re-raises; the reason says it was stopped, not broken.
            reason = f"interrupted by {stop.name}" if isinstance(stop, signals.Interrupted) else "interrupted"
            if signals.requeues(self.config.study.requeue, stop):
                # A preemption: the sweep queues the trial again when Optuna has failed it (tinyopt.sweep.runner).
                trial.set_user_attr(record.PREEMPTED_BY, stop.name)
                reason += "; queued again, to resume from its last checkpoint"
            trial.set_user_attr(record.FAIL_REASON, reason)
            run.end("KILLED", reason)
            self.events.trial_ended(trial.number, "FAIL", None, reason)
            raise
        except Exception as err:  # noqa: BLE001 - every failure is recorded; only TinyoptErrors stop
            reason = _reason(err)
            run.log_text(traceback.format_exc(), record.TRACEBACK_FILE)
            run.end("FAIL", reason)
            trial.set_user_attr(record.FAIL_REASON, reason)
            self.events.trial_ended(trial.number, "FAIL", None, reason)
            if isinstance(err, TinyoptError) and not isinstance(err, TrialError):
                raise
            raise TrialFailed(reason) from err
        seconds = time.perf_counter() - started
        trial.set_user_attr(record.SECONDS, seconds)
        run.log_metrics({record.TRIAL_SECONDS: seconds})
        run.end("COMPLETE")
        self.events.trial_ended(trial.number, "COMPLETE", value, None)
        return value


class ModelObjective(TrackedObjective):
    """``objective(trial) -> selection top-1`` for one of the model approaches (and its latency, where the
    study's objectives are both: ``study.objectives``).

    Args:
        approach: the approach module (``tinyopt.models.approaches.get_approach(name)``).
        config: the resolved config.
        data: the splits (``train`` only needed when the approach trains).
        tracker: a ``tinyopt.track.tracking.Tracker`` with its sweep started.
        seed: base seed; trial ``n`` runs with ``seed + n``.
        events: progress listener.
        device: what ``tinyopt.train.backend.load`` returned, recorded on every run.
        deadline: ``time.monotonic()`` at which a trial still training stops after its current batch,
            is scored on selection and ends pruned (``--timeout``); None: no deadline.
        checkpoint_dir: where training trials keep their checkpoints (``<dir>/<study>/trial-<n>``, ``n``
            the trial a retry replaces), as ``train.checkpoint`` says; None: nowhere.
    """

    def __init__(self, approach: Any, config: Config, data: SweepData, tracker: Any, seed: int,
                 events: Events | None = None, device: str = "cpu", deadline: float | None = None,
                 checkpoint_dir: Path | None = None):
        super().__init__(config, tracker, events, device)
        self.approach = approach
        self.data = data
        self.seed = seed
        self.deadline = deadline
        self.checkpoint_dir = checkpoint_dir
        self.notes: list[str] = []  # shown when the sweep ends (a damaged checkpoint, say)
        self._store = None  # tinyopt.data.activations.Store, made by the first trial that caches

    def choose(self, trial) -> dict[str, Any]:
        return search_space.suggest(trial, self.config.space)

    def __call__(self, trial) -> float | tuple[float, ...]:
        value = super().__call__(trial)
        objectives = objectives_of(trial.study)
        # Several objectives: each one's value, as the trial recorded it (its scores and costs).
        return value if len(objectives) == 1 else tuple(o.value_of(trial.user_attrs) for o in objectives)

    def epochs(self, params: dict[str, Any]) -> int:
        return int(params.get("epochs", 0)) if self.approach.TRAINS else 0

    def evaluate(self, trial, params: dict[str, Any], run) -> float:
        # A fresh graph per trial: without it layers and memory pile up across trials.
        backend.free_memory()
        backend.reset_peak_memory()
        # A retry trains with the seed of the trial it replaces: resumed, it goes on where that one stopped.
        seed = trial.user_attrs.get(record.SEED) if self.retry_of is not None else None
        seed = self.seed + trial.number if seed is None else seed
        trial.set_user_attr(record.SEED, seed)
        backend.seed(seed)
        checkpoints = self._checkpoints(trial)
        keep = False
        try:
            return self._run(trial, params, run, seed, checkpoints)
        except KeyboardInterrupt as stop:
            keep = signals.requeues(self.config.study.requeue, stop)  # its retry resumes from them
            raise
        finally:
            if checkpoints is not None and not keep:
                checkpoints.clear()

    def _checkpoints(self, trial) -> Checkpoints | None:
        setting = self.config.train.checkpoint or "off"  # a study stored before checkpoints: none
        if self.checkpoint_dir is None or not self.approach.TRAINS or setting == "off":
            return None
        origin = self.retry_of
        checkpoints = Checkpoints(self.checkpoint_dir / self.tracker.study_name
                                  / f"trial-{trial.number if origin is None else origin}")
        if origin is None:
            checkpoints.clear()  # a new trial resumes nothing: what is there was left by another study of the name
        return checkpoints

    def _run(self, trial, params: dict[str, Any], run, seed: int, checkpoints: Checkpoints | None) -> float:
        import optuna

        model, policy, batch = build_model(self.approach, params, self.config, self.data.wnids, self.device)
        feed, cache_note = self._feed(model, params, policy)
        history: dict[str, list[float]] = {}
        if self.approach.TRAINS:
            history = self._fit(trial, feed, params, run, batch, seed, checkpoints)
        results: dict[str, Any] = {}
        arrays: dict[str, np.ndarray] = {}
        for split in ("selection", "test"):
            y = self.data.splits[split][1]
            probs = feed.predict(split, batch)
            results[split] = scores(probs, y)
            arrays[f"{split}_probs"], arrays[f"{split}_labels"] = probs, np.asarray(y)
            if not params.get("restrict_200", True):
                # The 1000-way baseline is scored as the report scored it: argmax over every ImageNet class.
                results[split]["top1"] = self.approach.full_top1(feed.inputs(split, batch), wnids=self.data.wnids,
                                                                 labels=y)
        # What ran, not what was asked: Keras turns XLA off for a model with a layer that cannot be
        # compiled (RandomTranslation and RandomZoom, under JAX), with a warning only.
        jit_compile = (feed.trainee() or model).jit_compile
        tags = {record.TAG_PRECISION: policy, record.TAG_JIT_COMPILE: str(jit_compile), record.TAG_EVAL_BATCH: batch}
        if cache_note or isinstance(feed, CachedFeed):
            tags[record.TAG_ACTIVATION_CACHE] = cache_note or feed.note()
        run.set_tags(tags)
        value = results["selection"]["top1"]
        final = {f"{split}_{name}": v for split, r in results.items() for name, v in r.items()}
        served = inference_model(model)  # what a bundle holds: what it costs is recorded whatever the objectives
        recorded = {**final, **latency.measure(served, bool(jit_compile))}
        run.log_metrics({key: recorded[key] for key in record.COSTS})
        for key in (*record.SCORES, *record.COSTS):
            trial.set_user_attr(key, recorded[key])
        objectives = objectives_of(trial.study)
        complete = trial.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        kept = keeps_model([o.value_of(recorded) for o in objectives], complete, self.config.study.keep_models,
                           objectives)
        # A kept model's scores are logged once, with the model (linked to it), not again on the run.
        carried = {record.final(key): final[key] for key in record.SCORES} if kept else {}
        run.log_metrics({record.final(key): v for key, v in final.items() if record.final(key) not in carried})
        peak = backend.peak_memory()
        if peak is not None:
            run.log_metrics({record.PEAK_GPU_MEMORY: peak / 2**20})
        run.log_predictions(arrays)
        run.log_text(record.classes_tsv((c.index, c.wnid, c.name) for c in self.data.classes), record.CLASSES_FILE)
        if history:
            run.log_figure(lambda: learning_curve(history), record.LEARNING_CURVE)  # drawn in the background
        if kept:
            run.log_model(served, self.tracker.experiment_id,
                          model_name(self.tracker.study_name, trial.number), params=dict(trial.params),
                          metrics=carried)
        trial.set_user_attr(record.MODEL_KEPT, kept)
        return value

    def _feed(self, model, params: dict[str, Any], policy: str):
        """How the trial's data reaches its model, and its ``activation_cache`` tag when it is not shared.

        A model with frozen layers trains and predicts on their activations, shared with every other
        trial of the same key, unless the approach or ``train.activation_cache`` says it cannot, or the
        disk cannot hold them. A model that only reads them (pretrained) reads them once per trial then.
        """
        from tinyopt.models.backbones import weights_digest

        if getattr(self.approach, "uncached", None) is None:  # nothing frozen: the images, and no tag
            return ImageFeed(model, self.data.splits), None
        model_cfg, train_cfg = self.config.model, self.config.train
        why = cache_refusal(self.approach, params, self.config)
        if why is not None and self.approach.TRAINS:
            return ImageFeed(model, self.data.splits), f"off: {why}"
        cut = self.approach.split(model, params, model=model_cfg)
        # Training draws from every view; a trained model is scored on the images themselves.
        needs = {"train": cut.views, "selection": 1, "test": 1} if self.approach.TRAINS else \
            {"selection": cut.views, "test": cut.views}
        finish = None if cut.suffix is not None else functools.partial(self.approach.outputs, params,
                                                                       wnids=self.data.wnids)

        def feed(store: Store, key: dict[str, Any]) -> CachedFeed:
            return CachedFeed(model, self.data.splits, cut, store, key, needs, self.data.digest, finish)

        if why is None:
            if self._store is None:
                folder = None if self.data.cache_dir is None else self.data.cache_dir / "activations"
                self._store = Store(folder, ram_budget(train_cfg.activation_cache_gb))
            shared = feed(self._store, {
                "backbone": model_cfg.backbone, "alpha": model_cfg.alpha,
                "weights": weights_digest(model_cfg), "input_size": params["input_size"],
                "resize": cached_resize(params),
                "precision": policy, "keras_backend": backend.name()})
            try:
                shared.check_room()
                return shared, None
            except CacheUnavailable as err:
                why = str(err)
        if finish is None:
            return ImageFeed(model, self.data.splits), f"off: {why}"
        # Each view's logits once, for this trial alone.
        return feed(Store(None, ram_bytes=2**62), {}), f"off: {why}"

    def _fit(self, trial, feed, params: dict[str, Any], run, eval_batch: int, seed: int,
             checkpoints: Checkpoints | None) -> dict[str, list[float]]:
        import keras

        model = feed.trainee()
        compile_model(model, params, self.config.train.jit_compile)
        resumed = self._resume(trial, model, run, checkpoints)
        first = resumed.epoch if resumed is not None else 0
        train, steps = feed.training(int(params["batch_size"]), seed, first_epoch=first)
        selection = feed.batches("selection", eval_batch)
        stopping = keras.callbacks.EarlyStopping(monitor="val_accuracy", mode="max", restore_best_weights=True,
                                                 patience=self.config.train.early_stopping_patience,
                                                 start_from_epoch=early_stopping_start(params))
        progress = progress_callback(checkpoints, self.config.train.checkpoint or "off", stopping, resumed)
        # A per-batch hook only with a deadline: Keras calls every batch hook of every step.
        deadline = None if self.deadline is None else deadline_stop(self.deadline)
        reported = frozenset(trial.study.get_trials(deepcopy=False)[trial.number].intermediate_values)
        callbacks = [
            keras.callbacks.LearningRateScheduler(lr_at_epoch(params)),
            keras.callbacks.TerminateOnNaN(),
            stopping,
            *([deadline] if deadline is not None else []),
            progress,  # after early stopping has judged the epoch, before a pruner may end the trial
            trial_callback(trial, run, self.events, len(self.data.splits["train"][1]), deadline, reported),
        ]
        # A trial that early stopping had ended before it was interrupted trains no further epoch.
        epochs = first if resumed is not None and resumed.stopping.get("stopped_epoch") else int(params["epochs"])
        model.fit(train, steps_per_epoch=steps, validation_data=selection, initial_epoch=first, epochs=epochs,
                  verbose=0, shuffle=False, callbacks=callbacks)
        history = progress.history
        if progress.saves:
            run.log_metrics({record.CHECKPOINT_SECONDS: sum(progress.saves) / len(progress.saves)})
        if any(not np.isfinite(v) for v in history.get("loss", [])):
            raise TrialError(f"loss became NaN/inf at epoch {len(history['loss'])} "
                             f"(learning_rate={params['learning_rate']:.3g}); the search will try others")
        trial.set_user_attr(record.BEST_EPOCH, int(stopping.best_epoch) + 1)
        return history

    def _resume(self, trial, model, run, checkpoints: Checkpoints | None):
        """Restore a retried trial's last checkpoint into ``model``, and carry its earlier epochs into ``run``."""
        resumed = checkpoints.load(model) if checkpoints is not None else None
        for note in resumed.notes if resumed is not None else ():
            self.notes.append(f"trial {trial.number}: {note}")
        if resumed is None or not resumed.epoch:
            return None
        trial.set_user_attr(record.RESUMED_FROM_EPOCH, resumed.epoch)
        run.set_tags({record.TAG_RESUMED_FROM_EPOCH: resumed.epoch})
        if self.previous_run:
            # One curve from epoch 1 in this run: the epochs the earlier attempt trained, as it logged them.
            run.carry_epochs(self.previous_run, resumed.epoch)
        return resumed


def headline(config: Config, params: dict[str, Any]) -> dict[str, Any]:
    """The params a run's name shows, from ``study.run_name`` of the config, in its order."""
    return {key: params[key] for key in config.study.run_name or () if key in params}


def system_metrics(config: Config, device: str) -> bool:
    """Whether trial runs log MLflow's system metrics: ``train.system_metrics``, ``auto`` meaning with a GPU."""
    if config.train is None:  # the ensemble trains nothing: its trials are a moment of numpy on the CPU
        return False
    setting = config.train.system_metrics
    return device != "cpu" if setting == "auto" else bool(setting)


def _reason(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__
