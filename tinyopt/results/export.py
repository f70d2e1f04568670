"""Export a study's best trial, or the best ensemble of the members' models, as a bundle (``tinyopt.results.bundle``).

Keras is imported inside the functions that need it.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tinyopt.core import record
from tinyopt.core.damage import MLFLOW_FIX
from tinyopt.core.errors import StudyError, TinyoptError
from tinyopt.core.summary import MemberRecord, StudySummary
from tinyopt.core.urls import redact
from tinyopt.objectives.ensemble import weights_of
from tinyopt.objectives.voting import PROBABILITY_FLOOR, normalise_weights
from tinyopt.results.bundle import MODEL_FILE, WHAT, check_destination, load_model_file, read_classes, write_bundle
from tinyopt.stores import storage
from tinyopt.train import backend


def ensemble_model(member_models: Sequence[Any], weights: Sequence[float],
                   temperatures: Sequence[float | None] | None = None) -> Any:
    """One Keras model computing the weighted soft vote of its (calibrated) members.

    A member with a temperature ``T`` votes with ``softmax(log(p) / T)``, ``p`` floored at
    ``tinyopt.objectives.voting.PROBABILITY_FLOOR``, as ``tinyopt.objectives.voting.calibrate`` computes it; one
    without (None: an ensemble trial recorded before calibration) votes with ``p``. Each vote is
    scaled by its normalised weight (a ``Rescaling`` layer) and summed (``Add``). Built-in layers and
    ``keras.ops`` only, in float32 (so that a mixed-precision policy cannot round the probabilities
    to float16): the saved model loads without tinyopt. Members with weight 0 are left out. The
    members are renamed ``member_<i>`` so their names are unique.

    Args:
        member_models: Keras models taking the same uint8 image input and giving the same classes.
        weights: one non-negative weight per member; normalised to sum 1.
        temperatures: one temperature (or None) per member; None: no member is calibrated.

    Raises:
        TinyoptError: the members disagree on their input or output shape.
    """
    import keras


    temperatures = [None] * len(member_models) if temperatures is None else list(temperatures)
    if not len(member_models) == len(weights) == len(temperatures):
        raise ValueError(f"{len(member_models)} member models but {len(weights)} weights "
                         f"and {len(temperatures)} temperatures")
    shapes = {(tuple(m.inputs[0].shape[1:]), tuple(m.outputs[0].shape[1:])) for m in member_models}
    if len(shapes) != 1:
        raise TinyoptError(f"ensemble members disagree on input/output shapes {sorted(shapes)}; "
                           "they must be trained on the same images and classes")
    (input_shape, _), = shapes
    image = keras.Input(input_shape, dtype="uint8", name="image")
    votes = []
    for i, (model, weight, temperature) in enumerate(zip(member_models, normalise_weights(weights), temperatures,
                                                         strict=True)):
        if weight == 0:
            continue
        model.name = f"member_{i}"
        probs = keras.ops.cast(model(image), "float32")
        if temperature is not None:
            probs = keras.ops.softmax(keras.ops.log(keras.ops.maximum(probs, PROBABILITY_FLOOR)) / float(temperature))
        votes.append(keras.layers.Rescaling(float(weight), dtype="float32", name=f"weight_{i}")(probs))
    output = votes[0] if len(votes) == 1 else keras.layers.Add(dtype="float32", name="soft_vote")(votes)
    return keras.Model(image, output, name="soft_vote_ensemble")



def export_best(summary: StudySummary, dst: str | Path, *, storage_url: str, tracking_uri: str,
                overwrite: bool = False) -> Path:
    """Write the bundle of a study's best trial from the model(s) its MLflow run(s) kept.

    For an ensemble study, the kept models of the members with a weight above 0 are combined by
    ``ensemble_model`` with the best trial's weights and temperatures. Nothing is retrained.

    Args:
        summary: the study (``tinyopt.results.report.summarize_studies``).
        dst: the bundle folder (see ``write_bundle``).
        storage_url: the Optuna storage (read for ensemble members' params).
        tracking_uri: the MLflow store holding the runs.
        overwrite: replace a non-empty ``dst``.

    Raises:
        StudyError: no complete trial, or a model that was not kept.
    """

    best = summary.best
    if best is None:
        raise StudyError(f"study {summary.name!r} has no complete trial to export")
    check_destination(dst, overwrite)  # before the models are read from MLflow
    backend.load()
    where = f"trial {best.number} of study {summary.name!r}"
    with tempfile.TemporaryDirectory(prefix="tinyopt-export-") as tmp:
        if best.members:
            members, weights, temperatures = weights_of(best.members)
            # A member of weight 0 is left out of the model, so only the voting members need theirs.
            voting = [i for i, weight in enumerate(weights) if weight > 0]
            lost = [f"{members[i].study} trial {members[i].trial_number}" for i in voting if not members[i].model_kept]
            if lost:
                raise StudyError(f"{where} votes with {', '.join(lost)}, whose model was not kept (only a trial "
                                 "among its study's best study.keep_models when it finished keeps its model); "
                                 "export cannot rebuild it: sweep the approach with study.keep_models at least "
                                 "ensemble.top_k, or the ensemble with ensemble.top_k=1")
            run_ids = [members[i].run_id for i in voting]
            classes = _run_classes(run_ids, tracking_uri, Path(tmp))
            model = ensemble_model([_run_model(run_id, tracking_uri, Path(tmp)) for run_id in run_ids],
                                   [weights[i] for i in voting], [temperatures[i] for i in voting])
            params = {"members": _member_params(best.members, storage_url)}
            calibrated = all(temperatures[i] is not None for i in voting)
            what = (f"A weighted soft vote of {len(voting)} models, each taking the same images"
                    + (", each calibrated first by temperature scaling (its probabilities p become "
                       "softmax(log(p) / T), T fitted on the selection split)" if calibrated else "")
                    + ": " + "; ".join(_member_text(best.members[i]) for i in voting) + ".")
        else:
            if not best.model_kept or not best.run_id:
                raise StudyError(f"{where} did not keep its model (MLflow run {best.run_id}): only a trial among "
                                 "its study's best study.keep_models (or on its Pareto front) when it finished keeps "
                                 f"one; retrain it with `tinyopt best {summary.name} --trial {best.number} --refit "
                                 "--export DIR` (finetune, scratch), or sweep again with a larger study.keep_models")
            run_ids = [best.run_id]
            classes = _run_classes(run_ids, tracking_uri, Path(tmp))
            model = _run_model(best.run_id, tracking_uri, Path(tmp))
            params = best.params
            what = WHAT.get(summary.approach, f"A model of the {summary.approach} approach.")
        description = {
            "title": f"tinyopt {summary.approach}: study {summary.name}, trial {best.number}",
            "what": what,
            "how_chosen": f"{summary.chosen}: a stratified slice of the training images held out from training.",
            "provenance": {"Optuna storage": redact(storage_url), "study": summary.name, "trial": best.number,
                           "objective value": f"{best.value:.4f}", "MLflow tracking URI": redact(tracking_uri),
                           "MLflow run": best.run_id,
                           "Keras backend of the training": _trained_with(run_ids, tracking_uri)},
        }
        return write_bundle(dst, model=model, classes=classes, params=params, metrics=best.scores,
                            description=description, overwrite=overwrite)



def _trained_with(run_ids: Sequence[str], tracking_uri: str) -> str:
    """The Keras backend(s) the runs' models were trained with, from their tags."""
    from tinyopt.track import store

    found = {store.get_run(r, tracking_uri).data.tags.get(record.TAG_BACKEND, "unknown") for r in run_ids}
    return ", ".join(sorted(found))


def _run_model(run_id: str, tracking_uri: str, tmp: Path) -> Any:
    from tinyopt.track import store

    return load_model_file(store.download_model(run_id, tracking_uri, tmp / run_id),
                           label=f"{MODEL_FILE} of the model MLflow run {run_id} kept", fix=MLFLOW_FIX)


def _run_classes(run_ids: Sequence[str], tracking_uri: str, tmp: Path) -> list[tuple[int, str, str]]:
    """The classes of the runs, which must agree: the models' output columns are summed by index."""
    from tinyopt.track import store

    found = [read_classes(store.download_artifact(r, record.CLASSES_FILE, tracking_uri, tmp / f"{r}-classes"),
                          label=f"{record.CLASSES_FILE} of MLflow run {r}", fix=MLFLOW_FIX)
             for r in run_ids]
    if any(classes != found[0] for classes in found):
        raise StudyError(f"the runs {', '.join(run_ids)} were trained on different classes; "
                         "sweep every member on the same data cache")
    return found[0]


def _member_text(member: MemberRecord) -> str:
    return f"{member.label} (weight {member.weight:.3f}" + (
        f", temperature {member.temperature:.3g})" if member.temperature is not None else ")")


def _member_params(members: Sequence[MemberRecord], storage_url: str) -> list[dict[str, Any]]:
    rows = []
    for member in members:
        trial = storage.load_study(member.study, storage_url).get_trials(deepcopy=False)[member.trial_number]
        shown = {"label": member.label, "study": member.study, "trial_number": member.trial_number,
                 "run_id": member.run_id, "weight": member.weight}
        if member.temperature is not None:  # members recorded before calibration have none
            shown["temperature"] = member.temperature
        rows.append({**shown, "params": trial.user_attrs.get(record.PARAMS, trial.params)})
    return rows
