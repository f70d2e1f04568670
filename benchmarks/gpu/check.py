"""The one-line results of run.sh's steps, each read back from what the step left behind.

Each subcommand prints one line for ``[ok] STEP: LINE``; when what it reads is wrong it prints why
and exits 1, which run.sh reports as ``[FAIL]``. The sweeps' records and the bundle are read with
Optuna, MLflow and Keras themselves rather than through tinyopt, so the check does not take tinyopt's
word for them.

    python benchmarks/gpu/check.py env
    python benchmarks/gpu/check.py data CACHE
    python benchmarks/gpu/check.py sweep STUDY TRIALS STORAGE TRACKING_URI
    python benchmarks/gpu/check.py bundle DIR
    python benchmarks/gpu/check.py sample SLICE_ZIP FOLDER
    python benchmarks/gpu/check.py predicted PREDICT_JSON TRUE_WNID
"""

from __future__ import annotations

import json
import os
import platform
import sys
import zipfile
from pathlib import Path
from typing import NoReturn

import deps


def env() -> str:
    try:
        import alembic
        import keras
        import mlflow
        import optuna
        import sqlalchemy

        import tinyopt
    except ImportError as err:
        backend = os.environ.get("KERAS_BACKEND", "tensorflow (the default)")
        fail(f"{err} (KERAS_BACKEND={backend}); install tinyopt's dependencies, pass --install-wheels DIR, "
             f"or set KERAS_BACKEND to an installed backend")

    line = (f"Python {platform.python_version()}, Keras {keras.__version__} ({keras.backend.backend()}), "
            f"Optuna {optuna.__version__}, MLflow {mlflow.__version__}, SQLAlchemy {sqlalchemy.__version__}, "
            f"Alembic {alembic.__version__}, tinyopt from {Path(tinyopt.__file__).parent}")
    unmet = deps.unmet()
    return line + (f"; unmet requirements (may still work): {'; '.join(unmet)}" if unmet else "")


def data(cache: str) -> str:
    from tinyopt.data.cache import info

    found = info(cache)
    splits = ", ".join(f"{count:,} {split}" for split, count in found["splits"].items())
    return f"{found['classes']} classes, {splits} images"


def sweep(study_name: str, trials: str, storage: str, tracking_uri: str) -> str:
    import optuna
    from mlflow import MlflowClient

    from tinyopt.core import record

    study = optuna.load_study(study_name=study_name, storage=storage)
    # The MLflow status of the run of a trial in each state a finished sweep may leave.
    expected = {"COMPLETE": "FINISHED", "PRUNED": "KILLED"}
    counts = {state: sum(t.state.name == state for t in study.trials) for state in expected}
    summary = ", ".join(f"{count} {state.lower()}" for state, count in counts.items() if count)
    if len(study.trials) != int(trials):
        fail(f"the study holds {len(study.trials)} trials ({summary}), expected {trials}")
    for trial in study.trials:
        if trial.state.name == "FAIL":
            fail(f"trial {trial.number} failed: {trial.user_attrs.get(record.FAIL_REASON, '(no reason recorded)')}")
        if trial.state.name not in expected:
            fail(f"trial {trial.number} is {trial.state.name} after the sweep ended")
    if not counts["COMPLETE"]:
        fail(f"no trial completed ({summary})")
    client = MlflowClient(tracking_uri=tracking_uri)
    for trial in study.trials:
        run_id = trial.user_attrs.get(record.RUN_ID)
        if run_id is None:
            fail(f"trial {trial.number} has no MLflow run id")
        status = client.get_run(run_id).info.status
        if status != expected[trial.state.name]:
            fail(f"trial {trial.number} is {trial.state.name} but its MLflow run {run_id} is {status}")
    best = study.best_trial
    run = client.get_run(best.user_attrs[record.RUN_ID])
    final = record.final("selection_top1")
    if final not in run.data.metrics:
        fail(f"the best trial's MLflow run {run.info.run_id} has no {final} metric")
    tags = run.data.tags
    where = ", ".join(tags[key] for key in (record.TAG_DEVICE, record.TAG_PRECISION) if key in tags)
    return (f"{len(study.trials)} trials ({summary}), best selection top-1 {best.value:.3f} (trial {best.number}), "
            f"{len(study.trials)} MLflow runs with matching status{f', ran on {where}' if where else ''}")


def bundle(folder: str) -> str:
    import keras

    path = Path(folder)
    missing = [name for name in ("model.keras", "classes.tsv", "params.json", "metrics.json", "MODEL.md")
               if not (path / name).is_file()]
    if missing:
        fail(f"{path} lacks {', '.join(missing)}")
    model = keras.models.load_model(path / "model.keras", compile=False)  # plain Keras, no tinyopt
    metrics = json.loads((path / "metrics.json").read_text())
    top1 = metrics.get("selection_top1")
    score = f", selection top-1 {top1:.3f}" if isinstance(top1, float) else ""
    title = (path / "MODEL.md").read_text().splitlines()[0].lstrip("# ")
    return (f"{title} -> {path} ({(path / 'model.keras').stat().st_size / 1e6:.1f} MB model, "
            f"{model.count_params():,} params, input {model.input_shape[1:]}{score})")


def sample(slice_zip: str, folder: str) -> str:
    """Copy the slice's first val image into ``folder``; print its path and true wnid."""
    with zipfile.ZipFile(slice_zip) as archive:
        annotations = next(n for n in archive.namelist() if n.endswith("val/val_annotations.txt"))
        image, wnid = archive.read(annotations).decode().splitlines()[0].split("\t")[:2]
        out = Path(folder) / image
        out.write_bytes(archive.read(annotations.replace("val_annotations.txt", f"images/{image}")))
    return f"{out} {wnid}"


def predicted(predict_json: str, true_wnid: str) -> str:
    results = json.loads(Path(predict_json).read_text())
    if not results or not results[0].get("top"):
        fail(f"{predict_json} holds no prediction")
    top = results[0]["top"]
    first = top[0]
    hit = next((rank for rank, entry in enumerate(top, 1) if entry["wnid"] == true_wnid), None)
    truth = f"true {true_wnid} at rank {hit}" if hit else f"true {true_wnid} not in the top {len(top)}"
    image = Path(results[0]["image"]).name
    return f"{image} -> {first['wnid']} ({first['name']}) p={first['probability']:.3f}; {truth}"


def fail(reason: str) -> NoReturn:
    print(reason)
    sys.exit(1)


COMMANDS = {"env": env, "data": data, "sweep": sweep, "bundle": bundle, "sample": sample, "predicted": predicted}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        raise SystemExit(__doc__.rsplit("\n\n", 1)[1])
    print(COMMANDS[sys.argv[1]](*sys.argv[2:]))


if __name__ == "__main__":
    main()
