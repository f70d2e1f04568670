"""The names of what a sweep records: Optuna user attrs, MLflow tags, metrics and artifacts.

Every module that writes or reads a trial's record uses these names (the tests too), so that the
sweep, the ensemble, ``best``, ``export``, ``report`` and ``ui`` agree on them.
"""

from __future__ import annotations

# Study user attrs.
APPROACH = "approach"
CONFIG = "config"
EXPERIMENT_ID = "mlflow_experiment_id"
PARENT_RUN_ID = "mlflow_parent_run_id"
# Set once, when a study is warm-started (``tinyopt sweep --warm-start``, tinyopt.sweep.warmstart): {"study": the
# earlier study, "storage": its storage URL (redacted), "trials": the numbers of its trials that were queued}.
# Every later worker, restart or machine finds it and queues nothing again.
WARM_STARTED_FROM = "warm_started_from"
# Set once, when a sweep with --forecast creates the study: tinyopt.core.forecast.Forecast.as_dict().
FORECAST = "forecast"

# Trial user attrs.
PARAMS = "params"  # every value the trial ran with, fixed ones included (trial.params holds the searched)
RUN_ID = "mlflow_run_id"
RUN_URL = "mlflow_run_url"  # the trial's run in the MLflow UI, shown by optuna-dashboard
WORKER = "worker"  # {"host", "pid", "started"}: tells whether the process running the trial is still alive
FAIL_REASON = "fail_reason"
SECONDS = "seconds"
# Whether the trial's model was kept when it ended (it was among the study's best ``study.keep_models``);
# a model that later drops out of them is deleted, and its run's TAG_MODEL_KEPT says "false".
MODEL_KEPT = "model_kept"
SEED = "seed"  # what the trial trained with: the sweep's --seed plus the trial number (a refit repeats it)
BEST_EPOCH = "best_epoch"  # the epoch (from 1) whose weights early stopping kept: what a refit trains for
# A trial still running at the --timeout deadline: {"epochs": epochs trained, fractional, "selection_top1": ...};
# it ends pruned.
DEADLINE_STOP = "stopped_at_deadline"
# A trial queued again after its worker died or was preempted: the epochs it did not train again (its
# checkpoint's), also a tag of its run; and the signal that preempted a trial (queued again, not a failure).
RESUMED_FROM_EPOCH = "resumed_from_epoch"
PREEMPTED_BY = "preempted_by"
# A trial queued by a warm start: {"study": the earlier study, "trial": the number of the trial whose params it
# took there}; also a tag of its run ("STUDY trial N").
WARM_START_FROM = "warm_start_from"
# A complete trial's scores (user attrs, and MLflow metrics as ``final_`` + the name): the selection
# split chose it, the test split (the official val set) is only reported.
SELECTION_TOP1 = "selection_top1"
SELECTION_TOP5 = "selection_top5"
TEST_TOP1 = "test_top1"
TEST_TOP5 = "test_top5"
SELECTION_LOG_LOSS = "selection_log_loss"
TEST_LOG_LOSS = "test_log_loss"
SCORES = (SELECTION_TOP1, SELECTION_TOP5, TEST_TOP1, TEST_TOP5)
LOG_LOSSES = (SELECTION_LOG_LOSS, TEST_LOG_LOSS)  # scores beside SCORES; an ensemble's objective may be one
# How a table, a plot or a line of text names each score.
SCORE_LABELS = {SELECTION_TOP1: "selection top-1", SELECTION_TOP5: "selection top-5", TEST_TOP1: "test top-1",
                TEST_TOP5: "test top-5", SELECTION_LOG_LOSS: "selection log loss", TEST_LOG_LOSS: "test log loss"}
# What serving a complete trial's model costs (user attrs, and MLflow metrics of these names): the median
# milliseconds of one image's prediction on the sweep's device (tinyopt.train.latency), and its parameter count.
# study.objectives may name LATENCY_MS beside SELECTION_TOP1: the study then optimises both.
LATENCY_MS = "latency_ms"
MODEL_PARAMS = "model_params"
COSTS = (LATENCY_MS, MODEL_PARAMS)
MEMBERS = "members"  # an ensemble trial's members and their weights (see tinyopt.objectives.ensemble)
UNIFORM = "uniform"  # the scores of the ensemble's uniform vote
BEST_MEMBER = "best_member"  # the label and scores of the ensemble member with the best selection objective
# An ensemble trial's Optuna and MLflow params: each member's weight (weight_<study>-<trial number>) and, in
# MLflow, its calibration temperature.
WEIGHT_PREFIX = "weight_"
TEMPERATURE_PREFIX = "temperature_"

# MLflow tags of a trial's run (FAIL_REASON is one too).
TAG_APPROACH = "approach"
TAG_STUDY = "study"
TAG_TRIAL_NUMBER = "trial_number"
TAG_TRIAL_STATE = "trial_state"
TAG_DEVICE = "device"
TAG_BACKEND = "keras_backend"
TAG_PRECISION = "precision"  # the Keras dtype policy, e.g. mixed_bfloat16
TAG_JIT_COMPILE = "jit_compile"
TAG_EVAL_BATCH = "eval_batch_size"
# built | reused (the frozen layers' activations, see tinyopt.data.activations) | off: <why>
TAG_ACTIVATION_CACHE = "activation_cache"
TAG_WORKER = "worker"
TAG_PARENT = "tinyopt.parent"
TAG_BEST = "best"  # "true" on the study's current best trial run only
# What happened to the trial, in words: "complete", "pruned after epoch 3 of 10 by MedianPruner (...)",
# "failed: <reason>", "interrupted by SIGTERM".
TAG_OUTCOME = "outcome"
TAG_RESUMED_FROM_EPOCH = RESUMED_FROM_EPOCH
TAG_TAKEN_OVER_BY = "taken_over_by"  # on the run of a trial queued again: the URL of its retry's run
TAG_WARM_START_FROM = WARM_START_FROM
TAG_COLOR = "mlflow.runColor"  # the run's colour in the MLflow UI's charts: the best trial's is its own
TAG_MODEL_KEPT = "model_kept"  # "true" | "false"
TAG_MODEL_URI = "model_uri"  # models:/<id> of the kept model, an MLflow logged model
TAG_DESCRIPTION = "mlflow.note.content"  # the run's markdown description in the MLflow UI
# Tags of the parent run.
TAG_OBJECTIVE = "objective"  # e.g. "selection log loss (lower is better)"
TAG_BEST_TRIAL = "best_trial"
TAG_BEST_RUN = "best_run_id"
TAG_BEST_RUN_URL = "best_run_url"
# Tags of a refit's run (``tinyopt best --refit``): the trial whose configuration it retrained, and that trial's run.
TAG_REFIT_OF = "refit_of_trial"
TAG_REFIT_OF_RUN = "refit_of_run"

# MLflow params of every run, beside the searched ones: approach, backbone, weights, data and this,
# the resolved config's digest (the config itself is the config.json artifact).
CONFIG_HASH = "config_hash"
# ... and of a refit's run, also in its bundle's params.json: the epochs it trained (the trial's BEST_EPOCH)
# and the images it trained on (train + selection).
REFIT_EPOCHS = "refit_epochs"
TRAIN_IMAGES = "train_images"

# The metric the studies maximise (the first of several objectives), as Optuna and optuna-dashboard name it.
OBJECTIVE_NAME = SELECTION_TOP1

# MLflow metrics of a trial's run: per epoch, step = epoch counted from 1.
TRAIN_LOSS = "train_loss"
TRAIN_TOP1 = "train_top1"
TRAIN_TOP5 = "train_top5"
SELECTION_LOSS = "selection_loss"
LR = "lr"
EPOCH_SECONDS = "epoch_seconds"
IMAGES_PER_SECOND = "images_per_second"
EPOCH_METRICS = (TRAIN_LOSS, TRAIN_TOP1, TRAIN_TOP5, SELECTION_LOSS, SELECTION_TOP1, SELECTION_TOP5, LR,
                 EPOCH_SECONDS, IMAGES_PER_SECOND)
# ... and logged once, at the end: ``final_`` + a score key (``final_selection_top1``, ``final_test_log_loss``).
FINAL_PREFIX = "final_"
TRIAL_SECONDS = "trial_seconds"
CHECKPOINT_SECONDS = "checkpoint_seconds"  # the mean time a trial's per-epoch checkpoint took to write


def final(score: str) -> str:
    """The MLflow metric of a final score: ``final_test_top1`` for ``test_top1``."""
    return f"{FINAL_PREFIX}{score}"


# MLflow metrics of the parent run, re-logged after every trial.
# step = trial number: the experiment's chart is the optimisation history. "best_" + the study's metric
# name: this for the approaches, best_selection_log_loss for an ensemble of that objective.
BEST_SO_FAR = "best_selection_top1"
COUNT_PREFIX = "trials_"  # trials_complete, trials_pruned, trials_failed, trials_running
COMPUTE_SECONDS = "compute_seconds"
# With a forecast (tinyopt sweep --forecast): what it expected and what happened so far, side by side.
FORECAST_WALL_SECONDS = "forecast_wall_seconds"  # the wall time forecast for the trials finished so far
WALL_SECONDS = "wall_seconds"  # the first trial's start to the last one's end
FORECAST_TRIAL_SECONDS = "forecast_trial_seconds"
TRIAL_SECONDS_MEAN = "mean_trial_seconds"

# MLflow metrics of a trial's run that are not scores.
PEAK_GPU_MEMORY = "peak_gpu_memory_mb"
# A complete trial's place by the study's objective (1: the best), brought up to date after every trial
# (step: the complete trials ranked then); the parent run's is 0. Sorted by it, the runs table starts
# with the parent, then the trials from the best; trials without one (pruned, failed) come last.
RANK = "rank"

# MLflow artifacts of a trial's run.
PREDICTIONS = "predictions.npz"
CONFIG_FILE = "config.json"
CLASSES_FILE = "classes.tsv"
TRACEBACK_FILE = "traceback.txt"
LEARNING_CURVE = "learning_curve.png"
LOGGED_MODEL = "model"  # name of a kept trial's MLflow logged model
# ... and of an ensemble trial's run: its members with their scores, and the bar chart comparing them.
ENSEMBLE_MEMBERS_FILE = "ensemble_members.json"
ENSEMBLE_COMPARISON = "ensemble_comparison.png"
# ... and of the parent run.
HISTORY = "history.png"
IMPORTANCE = "importance.png"
PARETO = "pareto.png"  # a study of several objectives: selection top-1 against latency, its Pareto front joined

# classes.tsv (a trial's run, an exported bundle): a header line, then "index<TAB>wnid<TAB>name" per class.
CLASSES_COLUMNS = ("index", "wnid", "name")


def warm_start_tags(attrs) -> dict[str, str]:
    """The run tag of a trial queued by a warm start, from its user attrs (``{}`` for any other trial)."""
    source = attrs.get(WARM_START_FROM)
    return {TAG_WARM_START_FROM: f"{source['study']} trial {source['trial']}"} if source else {}


def classes_tsv(classes) -> str:
    """The text of a ``classes.tsv`` from ``(index, wnid, name)`` rows (``tinyopt.results.bundle.read_classes``)."""
    return "\t".join(CLASSES_COLUMNS) + "\n" + "".join(f"{int(i)}\t{wnid}\t{name}\n" for i, wnid, name in classes)
