"""Refit: the best configuration of a study, retrained on train + selection (``tinyopt best --refit``).

A trial trains on ``train`` and keeps the weights of the epoch where its selection top-1 peaked
(early stopping). Once the study has chosen its configuration, the selection images need not be
held out any more: the refit trains the same recipe (the trial's params, the study's resolved
config, the trial's seed and learning-rate schedule) on both splits, for the epochs early stopping
chose, with no validation data and no early stopping, and scores it on test. It is logged as one
more run of the study's MLflow experiment, nested under its parent run and tagged with the trial it
repeats, and its model is kept there; ``export_dir`` also writes it as a bundle.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tinyopt.core import record, signals
from tinyopt.core.config.sections import Config
from tinyopt.core.errors import DataError, StudyError, TinyoptError
from tinyopt.core.summary import StudySummary, study_config
from tinyopt.core.urls import first_line, redact, sqlite_path
from tinyopt.data.splits import load_sweep_data
from tinyopt.models import approaches
from tinyopt.objectives.model import headline
from tinyopt.results.bundle import WHAT, check_destination, write_bundle
from tinyopt.stores import storage as storages
from tinyopt.track.names import model_name  # pure names: no mlflow loads with it
from tinyopt.train import backend
from tinyopt.train.feeds import ImageFeed
from tinyopt.train.metrics import scores
from tinyopt.train.training import build_model, compile_model, epoch_metrics, inference_model, lr_at_epoch

TRAINED_ON = ("train", "selection")


@dataclass
class Refit:
    """What a refit did, beside the trial it repeats.

    Attributes:
        study: the study's name.
        approach: its approach.
        trial: the number of the trial refit (the study's best).
        trial_run_id: that trial's MLflow run.
        params: every value the trial ran with, fixed ones included.
        seed: the seed the refit (and the trial) trained with.
        epochs: epochs the refit trained (the trial's best epoch).
        trial_epochs: epochs the trial trained.
        train_images: images the refit trained on (train + selection).
        trial_train_images: images the trial trained on (train).
        scores: the refit's ``test_top1``, ``test_top5`` and ``test_log_loss``.
        trial_scores: the trial's ``selection_top1``, ..., ``test_top5``.
        run_id: the refit's MLflow run.
        run_url: its page in the MLflow UI.
        bundle: the bundle written, if asked for.
    """

    study: str
    approach: str
    trial: int
    trial_run_id: str | None
    params: dict[str, Any]
    seed: int
    epochs: int
    trial_epochs: int
    train_images: int
    trial_train_images: int
    scores: dict[str, float] = field(default_factory=dict)
    trial_scores: dict[str, float] = field(default_factory=dict)
    run_id: str = ""
    run_url: str = ""
    bundle: Path | None = None

    @property
    def epochs_text(self) -> str:
        """``1 epoch``, ``12 epochs``: what the refit trained, as a sentence says it."""
        return f"{self.epochs} epoch{'' if self.epochs == 1 else 's'}"


def best_epoch(trial: Any) -> int:
    """The epochs a refit of ``trial`` trains: those whose weights early stopping kept.

    ``record.BEST_EPOCH`` where the trial recorded it; for a trial that did not, the first epoch of its
    best reported selection top-1 (the one early stopping restores), else all of ``params["epochs"]``.
    """
    if record.BEST_EPOCH in trial.user_attrs:
        return int(trial.user_attrs[record.BEST_EPOCH])
    reported = trial.intermediate_values
    if reported:
        return int(max(sorted(reported), key=lambda epoch: reported[epoch]))
    return int(trial.user_attrs.get(record.PARAMS, trial.params)["epochs"])


def refit_best(summary: Any, *, storage_url: str, tracking_uri: str, source: str | None = None,
               cache_dir: str | None = None, export_dir: str | Path | None = None,
               overwrite: bool = False, progress: bool = True, echo: Callable[[str], None] | None = None) -> Refit:
    """Retrain the best trial of a finetune or scratch study (or the one ``tinyopt.core.summary.pick`` chose) on
    train + selection, log it, and export it if asked.

    Everything is checked before anything is written: the study trains, the export folder, the
    tracking store, the data (the same splits as the sweep's, which the trial's saved labels confirm)
    and the pretrained weights. Then the refit's run is created under the study's parent run and
    closed FINISHED, FAILED with the reason (and ``traceback.txt``) or KILLED on SIGINT/SIGTERM.

    Args:
        summary: the study (``tinyopt.results.report.summarize_studies``).
        storage_url: its Optuna storage.
        tracking_uri: the MLflow store of its sweep.
        source: dataset source, as for ``tinyopt sweep --data`` (None: the prepared cache).
        cache_dir: dataset cache folder, as for ``tinyopt sweep --cache``.
        export_dir: write the refit model as a bundle there (``export_refit``).
        overwrite: replace a non-empty ``export_dir``.
        progress: show the data preparation progress bar.
        echo: hears a line when training starts and after every epoch.

    Returns:
        What the refit did and scored.

    Raises:
        StudyError: a study that trains nothing (pretrained, ensemble) or has no complete trial, or a
            tracking store without the study's runs.
        DataError: data other than the sweep's.
        TinyoptError: the export folder is taken, or the refit failed (its run says why).
    """
    from tinyopt.track import tracking

    echo = echo or (lambda line: None)
    study = storages.load_study(summary.name, storage_url)
    config = study_config(study)
    approach = _trainer(summary, config)
    if export_dir is not None:
        check_destination(export_dir, overwrite)
    _check_store(tracking_uri)
    trial = study.get_trials(deepcopy=False)[summary.best.number]  # its best, or the trial --trial picked
    params = dict(trial.user_attrs.get(record.PARAMS, trial.params))
    data = _load_data(config, trial, tracking_uri, source, cache_dir, progress)
    device = backend.load()
    if config.model.backbone is not None:
        from tinyopt.models import backbones

        backbones.check_weights(config.model)

    x = np.concatenate([data.splits[split][0] for split in TRAINED_ON])  # in memory: 1.2 GB of uint8 in all
    y = np.concatenate([data.splits[split][1] for split in TRAINED_ON])
    refit = Refit(study=summary.name, approach=summary.approach, trial=trial.number,
                  trial_run_id=trial.user_attrs.get(record.RUN_ID), params=params,
                  seed=int(trial.user_attrs.get(record.SEED, trial.number)),  # a trial older than the attr: seed 0
                  epochs=best_epoch(trial), trial_epochs=len(trial.intermediate_values) or int(params["epochs"]),
                  train_images=len(y), trial_train_images=len(data.splits["train"][1]),
                  trial_scores={key: trial.user_attrs[key] for key in record.SCORES if key in trial.user_attrs})
    tracker = tracking.Tracker(tracking_uri, summary.name, summary.approach)
    what = (f"Refit of trial {trial.number} of study `{summary.name}` on train + selection ({refit.train_images} "
            f"images) for {refit.epochs_text}, those whose weights early stopping kept for the trial, on the "
            f"trial's learning-rate schedule over {params['epochs']} epochs; seed {refit.seed}.")
    with signals.deferred():
        run = tracker.start_refit(
            trial.number, refit.trial_run_id, params, config,
            {record.TAG_DEVICE: device, record.TAG_BACKEND: backend.name()},
            parent_run_id=study.user_attrs.get(record.PARENT_RUN_ID), searched=dict(trial.params),
            headline=headline(config, params), what=what)
        refit.run_id, refit.run_url = run.run_id, tracker.run_url(run.run_id)
        try:
            with signals.interruptible():
                run.log_params({record.REFIT_EPOCHS: refit.epochs, record.TRAIN_IMAGES: refit.train_images})
                echo(f"refitting {summary.name} trial {trial.number} on train + selection ({refit.train_images} "
                     f"images) for {refit.epochs_text} on {device}")
                model = _train(approach, config, params, data, (x, y), refit, run, device, echo)
                classes = [(c.index, c.wnid, c.name) for c in data.classes]
                run.log_text(record.classes_tsv(classes), record.CLASSES_FILE)
                run.log_model(model, tracker.experiment_id, model_name(summary.name, trial.number, refit=True),
                              params=dict(trial.params),  # its scores: logged on the run, linked to the model
                              metrics={record.final(key): value for key, value in refit.scores.items()})
                if export_dir is not None:
                    refit.bundle = export_refit(summary, refit, export_dir, model=model, classes=classes,
                                                storage_url=storage_url, tracking_uri=tracking_uri,
                                                overwrite=overwrite)
        except KeyboardInterrupt as stop:
            run.end("KILLED", f"interrupted by {stop.name}" if isinstance(stop, signals.Interrupted)
                    else "interrupted")
            raise
        except Exception as err:
            reason = f"{type(err).__name__}: {first_line(err)}"
            run.log_text(traceback.format_exc(), record.TRACEBACK_FILE)
            run.end("FAIL", reason)
            if isinstance(err, TinyoptError):
                raise
            raise TinyoptError(f"the refit of {summary.name} trial {trial.number} failed ({reason}); its traceback "
                               f"is traceback.txt of MLflow run {run.run_id}") from err
        # A signal that comes while the run closes is dropped: the refit is complete and recorded.
        run.end("COMPLETE")
    return refit


def _trainer(summary: Any, config: Config) -> Any:
    """The approach module of a study a refit can retrain, its Keras backend loaded."""

    if summary.approach == "ensemble" or (summary.best is not None and summary.best.members):
        raise StudyError(f"study {summary.name!r} is an ensemble, a vote of models already trained: --refit "
                         "applies to finetune and scratch studies; name one, e.g. `tinyopt best scratch --refit`")
    if summary.best is None:
        raise StudyError(f"study {summary.name!r} has no complete trial to refit; run "
                         f"`tinyopt sweep {summary.approach}` first")
    backend.check()
    backend.set_gpu_memory(config.train.gpu_memory)
    backend.load()  # before the approach module imports Keras, so that the backend loads quietly

    approach = approaches.get_approach(summary.approach)
    if not approach.TRAINS:
        raise StudyError(f"{summary.approach} trains nothing (study {summary.name!r}): --refit applies to "
                         "finetune and scratch studies; name one, e.g. `tinyopt best scratch --refit`")
    return approach


def _check_store(tracking_uri: str) -> None:
    """The tracking store must be the sweep's: opening a missing SQLite store would create an empty one."""
    from tinyopt.track import store

    store.check(tracking_uri)
    local = sqlite_path(tracking_uri)
    if local is not None and not local.is_file():
        raise StudyError(f"no MLflow store at {local}; pass the --tracking-uri "
                         "the study was swept with")


def _load_data(config: Config, trial: Any, tracking_uri: str, source: str | None, cache_dir: str | None,
               progress: bool) -> Any:
    """The splits as the sweep loaded them, checked against the labels the trial saved with its predictions."""
    from tinyopt.track import store

    data = load_sweep_data(config.data, source, cache_dir, progress)
    run_id = trial.user_attrs.get(record.RUN_ID)
    if run_id is None:
        raise StudyError(f"trial {trial.number} has no MLflow run; the study was not swept by tinyopt")
    saved = store.load_predictions(run_id, tracking_uri)
    for split in ("selection", "test"):
        if not np.array_equal(saved[f"{split}_labels"], data.splits[split][1]):
            where = redact(source) if source else cache_dir or "the default cache"
            raise DataError(f"the {split} split of {where} is not the one trial {trial.number} was scored on; "
                            "pass the --data and --cache the study was swept with")
    return data


def _train(approach: Any, config: Config, params: dict[str, Any], data: Any,
           train: tuple[np.ndarray, np.ndarray], refit: Refit, run: Any, device: str,
           echo: Callable[[str], None]) -> Any:
    """Build, train and score the refit model as the trial did, without validation data; return it uncompiled.

    Sets ``refit.scores`` and the run's tags and per-epoch metrics.
    """
    import keras


    backend.seed(refit.seed)
    model, policy, batch = build_model(approach, params, config, data.wnids, device)
    feed = ImageFeed(model, {"train": train, "test": data.splits["test"]})
    compile_model(model, params, config.train.jit_compile)
    # The trial's schedule, over its params["epochs"], stopped where early stopping stopped the trial's.
    train, steps = feed.training(int(params["batch_size"]), seed=refit.seed)
    fitted = model.fit(train, steps_per_epoch=steps, epochs=refit.epochs, verbose=0, shuffle=False,
                       callbacks=[keras.callbacks.LearningRateScheduler(lr_at_epoch(params)),
                                  keras.callbacks.TerminateOnNaN(), _epoch_logger(run, refit, echo)])
    losses = fitted.history.get("loss", [])
    if len(losses) < refit.epochs or not np.all(np.isfinite(losses)):
        raise TinyoptError(f"the loss became NaN/inf at epoch {len(losses)} of the refit, which the trial did not "
                           "meet; refit again with another --seed")
    refit.scores = {f"test_{name}": value
                    for name, value in scores(feed.predict("test", batch), data.splits["test"][1]).items()}
    run.set_tags({record.TAG_PRECISION: policy, record.TAG_JIT_COMPILE: str(model.jit_compile),
                  record.TAG_EVAL_BATCH: batch})
    return inference_model(model)


def _epoch_logger(run: Any, refit: Refit, echo: Callable[[str], None]) -> Any:
    """A Keras callback that logs each epoch to the refit's run (step = epoch, from 1) and echoes it."""
    import keras


    class EpochLogger(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            seconds = time.perf_counter() - self.started
            metrics = epoch_metrics(logs or {}, self.model, seconds=seconds, train_seconds=seconds,
                                    train_images=refit.train_images)
            run.log_metrics(metrics, step=epoch + 1)
            echo(f"epoch {epoch + 1}/{refit.epochs}: train loss {metrics.get(record.TRAIN_LOSS, float('nan')):.4f}, "
                 f"top-1 {metrics.get(record.TRAIN_TOP1, float('nan')):.4f} ({seconds:.0f} s)")

    return EpochLogger()


def export_refit(summary: StudySummary, refit: Refit, dst: str | Path, *, model: Any,
                 classes: Sequence[Sequence[Any]], storage_url: str, tracking_uri: str,
                 overwrite: bool = False) -> Path:
    """Write the bundle of a refit of a study's best trial (``tinyopt.results.refit``).

    ``params.json`` holds the trial's params with ``refit_epochs`` and ``train_images``,
    ``metrics.json`` the refit's test scores, and MODEL.md says how it was trained and what the
    trial it repeats scored.

    Args:
        summary: the study (``tinyopt.results.report.summarize_studies``).
        refit: what the refit did (``tinyopt.results.refit.refit_best``).
        dst: the bundle folder (see ``write_bundle``).
        model: the refit model, uncompiled.
        classes: ``(index, wnid, name)`` per output column, in index order.
        storage_url: the Optuna storage of the study.
        tracking_uri: the MLflow store holding the refit's run.
        overwrite: replace a non-empty ``dst``.
    """

    trial_scores = ", ".join(f"{key.replace('_', ' ')} {value:.4f}" for key, value in refit.trial_scores.items())
    description = {
        "title": f"tinyopt {summary.approach}: study {summary.name}, trial {refit.trial}, refit",
        "what": (f"{WHAT.get(summary.approach, f'A model of the {summary.approach} approach.')} Refit on the "
                 f"train and selection splits together ({refit.train_images} images) for {refit.epochs_text}, as "
                 f"early stopping chose for trial {refit.trial}: no images were held out to stop it."),
        "how_chosen": (f"The configuration of {summary.chosen[0].lower()}{summary.chosen[1:]}: a stratified slice of "
                       "the training images held out from training. That trial, trained on the train split alone, "
                       f"scored {trial_scores}; this model trained on the selection split too, so only its test "
                       "scores are reported."),
        "provenance": {"Optuna storage": redact(storage_url), "study": summary.name, "trial": refit.trial,
                       "MLflow tracking URI": redact(tracking_uri), "MLflow run": refit.run_id,
                       "MLflow run of the trial": refit.trial_run_id, "seed": refit.seed,
                       "Keras backend of the training": backend.name()},
    }
    params = {**refit.params, record.REFIT_EPOCHS: refit.epochs, record.TRAIN_IMAGES: refit.train_images}
    return write_bundle(dst, model=model, classes=classes, params=params, metrics=refit.scores,
                        description=description, overwrite=overwrite)
