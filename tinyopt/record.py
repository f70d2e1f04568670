"""The names of what a sweep records: Optuna user attrs, MLflow tags and artifacts.

Every module that writes or reads a trial's record uses these names, so that the sweep, the
ensemble, ``best``, ``export`` and ``report`` agree on them.
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

# MLflow metrics of a trial's run that are not scores.
PEAK_GPU_MEMORY = "peak_gpu_memory_mb"

# MLflow artifacts of a trial's run.
PREDICTIONS = "predictions.npz"
MODEL = "model/model.keras"
CONFIG_FILE = "config.json"
CLASSES_FILE = "classes.tsv"
TRACEBACK_FILE = "traceback.txt"
LEARNING_CURVE = "learning_curve.png"
