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

# Trial user attrs.
PARAMS = "params"  # every value the trial ran with, fixed ones included (trial.params holds the searched)
RUN_ID = "mlflow_run_id"
RUN_URL = "mlflow_run_url"  # the trial's run in the MLflow UI, shown by optuna-dashboard
WORKER = "worker"  # {"host", "pid", "started"}: tells whether the process running the trial is still alive
FAIL_REASON = "fail_reason"
SECONDS = "seconds"
MODEL_KEPT = "model_kept"
SCORES = ("selection_top1", "selection_top5", "test_top1", "test_top5")
MEMBERS = "members"  # an ensemble trial's members and their weights (see tinyopt.ensemble)
UNIFORM = "uniform"  # the scores of the ensemble's uniform vote

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
# built | reused (the frozen layers' activations, see tinyopt.activations) | off: <why>
TAG_ACTIVATION_CACHE = "activation_cache"
TAG_WORKER = "worker"
TAG_PARENT = "tinyopt.parent"
TAG_BEST = "best"  # "true" on the study's current best trial run only
TAG_MODEL_KEPT = "model_kept"  # "true" | "false"
TAG_MODEL_URI = "model_uri"  # models:/<id> of the kept model, an MLflow logged model
TAG_DESCRIPTION = "mlflow.note.content"  # the run's markdown description in the MLflow UI
# Tags of the parent run.
TAG_BEST_TRIAL = "best_trial"
TAG_BEST_RUN = "best_run_id"
TAG_BEST_RUN_URL = "best_run_url"

# MLflow params of every run, beside the searched ones: approach, backbone, weights, data and this,
# the resolved config's digest (the config itself is the config.json artifact).
CONFIG_HASH = "config_hash"

# The metric the studies maximise, as Optuna and optuna-dashboard name it.
OBJECTIVE_NAME = "selection_top1"

# MLflow metrics of a trial's run: per epoch, step = epoch counted from 1.
TRAIN_LOSS = "train_loss"
TRAIN_TOP1 = "train_top1"
TRAIN_TOP5 = "train_top5"
SELECTION_LOSS = "selection_loss"
SELECTION_TOP1 = "selection_top1"
SELECTION_TOP5 = "selection_top5"
LR = "lr"
EPOCH_SECONDS = "epoch_seconds"
IMAGES_PER_SECOND = "images_per_second"
EPOCH_METRICS = (TRAIN_LOSS, TRAIN_TOP1, TRAIN_TOP5, SELECTION_LOSS, SELECTION_TOP1, SELECTION_TOP5, LR,
                 EPOCH_SECONDS, IMAGES_PER_SECOND)
# ... and logged once, at the end: ``final_`` + a score key (``final_selection_top1``, ``final_test_log_loss``).
FINAL_PREFIX = "final_"
TRIAL_SECONDS = "trial_seconds"


def final(score: str) -> str:
    """The MLflow metric of a final score: ``final_test_top1`` for ``test_top1``."""
    return f"{FINAL_PREFIX}{score}"


# MLflow metrics of the parent run, re-logged after every trial.
BEST_SO_FAR = "best_selection_top1"  # step = trial number: the experiment's chart is the optimisation history
COUNT_PREFIX = "trials_"  # trials_complete, trials_pruned, trials_failed, trials_running
COMPUTE_SECONDS = "compute_seconds"

# MLflow metrics of a trial's run that are not scores.
PEAK_GPU_MEMORY = "peak_gpu_memory_mb"

# MLflow artifacts of a trial's run.
PREDICTIONS = "predictions.npz"
CONFIG_FILE = "config.json"
CLASSES_FILE = "classes.tsv"
TRACEBACK_FILE = "traceback.txt"
LEARNING_CURVE = "learning_curve.png"
LOGGED_MODEL = "model"  # name of a kept trial's MLflow logged model
# ... and of the parent run.
HISTORY = "history.png"
IMPORTANCE = "importance.png"

# classes.tsv (a trial's run, an exported bundle): a header line, then "index<TAB>wnid<TAB>name" per class.
CLASSES_COLUMNS = ("index", "wnid", "name")


def classes_tsv(classes) -> str:
    """The text of a ``classes.tsv`` from ``(index, wnid, name)`` rows (``tinyopt.export.read_classes`` reads it)."""
    return "\t".join(CLASSES_COLUMNS) + "\n" + "".join(f"{int(i)}\t{wnid}\t{name}\n" for i, wnid, name in classes)
