"""From swept studies to results: the ensemble sweep, `best` (and its export), `report`.

The approach studies are made directly (Optuna trials + MLflow runs carrying what the runner
records: user attrs, predictions.npz, classes.tsv, the kept model) from tiny dense models, so the
tests need no training; the ensemble study is swept by the real runner on top of them.
"""

from __future__ import annotations

import datetime
import html
import json

import keras
import numpy as np
import optuna
import pytest
from click.testing import CliRunner
from PIL import Image

from tinyopt.cli import cli
from tinyopt.core import record
from tinyopt.core.config import load_config
from tinyopt.objectives import voting
from tinyopt.results import bundle as bundles
from tinyopt.results import report
from tinyopt.results.predict import predict_images
from tinyopt.stores.storage import open_storage, optuna_experimental
from tinyopt.sweep.runner import run_sweep
from tinyopt.track import names as run_names
from tinyopt.track import store as mlflow_store
from tinyopt.track import tracking
from tinyopt.train.metrics import scores

APPROACH_STUDIES = ("pretrained", "finetune", "scratch")
CLASSES_TSV = "0\tn01443537\tgoldfish\n1\tn01629819\tEuropean fire salamander\n2\tn01641577\tbullfrog\n"
DURATIONS = (10.0, 20.0, 30.0)  # seconds of the complete trials; a pruned one takes 5 s, a failed one 1 s
DISTRIBUTIONS = {"learning_rate": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True),
                 "width": optuna.distributions.IntDistribution(8, 64)}
T0 = datetime.datetime(2025, 1, 1, 12, 0, 0)


def _model(seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    image = keras.Input((64, 64, 3), dtype="uint8")
    x = keras.layers.Flatten()(keras.layers.Rescaling(1 / 255)(image))
    return keras.Model(image, keras.layers.Dense(3, activation="softmax")(x))


def _frozen(state, value, params, user_attrs, seconds):
    return optuna.trial.FrozenTrial(
        number=0, state=state, value=value, datetime_start=T0,
        datetime_complete=T0 + datetime.timedelta(seconds=seconds), params=params,
        distributions={k: DISTRIBUTIONS[k] for k in params}, user_attrs=user_attrs, system_attrs={},
        intermediate_values={}, trial_id=0)


def _sweep_approach(name: str, storage: str, tracking_uri: str, images: dict, labels: dict, seed: int) -> None:
    """Three complete trials (the best-so-far ones keep their model), one pruned, one failed."""
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize")
    study.set_user_attr("approach", name)
    tracker = tracking.Tracker(tracking_uri, name, name)
    tracker.start_sweep({"approach": name}, {}, tags={})
    best_so_far = -1.0
    for number, seconds in enumerate(DURATIONS):
        params = {"learning_rate": 10.0 ** -(number + 1), "width": 8 * (number + 1)}
        model = _model(seed + number)
        probs = {split: model.predict(images[split], verbose=0) for split in ("selection", "test")}
        final = {f"{split}_{key}": value for split in probs
                 for key, value in scores(probs[split], labels[split]).items()}
        run = tracker.start_trial(number, params, load_config("scratch"),
                                  tags={record.TAG_BACKEND: keras.backend.backend()})
        run.log_predictions({"selection_probs": probs["selection"], "selection_labels": labels["selection"],
                             "test_probs": probs["test"], "test_labels": labels["test"]})
        run.log_text(CLASSES_TSV, "classes.tsv")
        value = final["selection_top1"] + 0.001 * number  # no ties: one best trial per study
        kept = value > best_so_far
        if kept:
            run.log_model(model, tracker.experiment_id, run_names.model_name(name, number))
            best_so_far = value
        run.end("COMPLETE")
        attrs = {"mlflow_run_id": run.run_id, "model_kept": kept, "params": {**params, "epochs": 2},
                 "seconds": seconds, **{k: final[k] for k in report.SCORES}}
        study.add_trial(_frozen(optuna.trial.TrialState.COMPLETE, value, params, attrs, seconds))
    study.add_trial(_frozen(optuna.trial.TrialState.PRUNED, None, {"learning_rate": 0.1, "width": 8}, {}, 5))
    study.add_trial(_frozen(optuna.trial.TrialState.FAIL, None, {"learning_rate": 0.1, "width": 64},
                            {"fail_reason": "TrialError: loss became NaN"}, 1))
    tracker.end_sweep()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    rng = np.random.default_rng(0)
    images = {split: rng.integers(0, 256, (24, 64, 64, 3), dtype=np.uint8) for split in ("selection", "test")}
    labels = {split: np.arange(24, dtype=np.int64) % 3 for split in images}
    stores = {"storage": f"sqlite:///{root / 'studies.db'}", "tracking_uri": f"sqlite:///{root / 'mlruns.db'}"}
    for i, name in enumerate(APPROACH_STUDIES):
        _sweep_approach(name, **stores, images=images, labels=labels, seed=10 * i)
    # One member per study: only the best trial of each keeps its model here, and export needs them.
    run_sweep("ensemble", trials=6, progress=False, overrides=("ensemble.top_k=1",), **stores)
    pngs = []
    for i, pixels in enumerate(images["test"][:4]):
        pngs.append(root / f"test_{i}.png")
        Image.fromarray(pixels).save(pngs[-1])  # lossless, so predict sees the recorded pixels
    return {**stores, "root": root, "pngs": pngs}


def _study(store, name):
    return optuna.load_study(study_name=name, storage=store["storage"])


def _options(store):
    return ["--storage", store["storage"], "--tracking-uri", store["tracking_uri"]]


def _invoke(args):
    return CliRunner().invoke(cli, args, env={"COLUMNS": "250"})


def test_ensemble_sweep_records_the_contract(store):
    study = _study(store, "ensemble")
    trials = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(trials) == 6
    best = study.best_trial
    members = best.user_attrs[record.MEMBERS]
    expected = [(name, _study(store, name).best_trial) for name in APPROACH_STUDIES]
    assert [(m["study"], m["trial_number"], m["run_id"], m["model_kept"]) for m in members] == [
        (name, t.number, t.user_attrs["mlflow_run_id"], True) for name, t in expected]
    assert sum(m["weight"] for m in members) == pytest.approx(1.0)
    assert set(best.params) == {f"weight_{name}-{t.number}" for name, t in expected}
    assert study.direction.name == "MINIMIZE" and study.metric_names == [record.SELECTION_LOG_LOSS]
    assert best.value == best.user_attrs["selection_log_loss"]
    assert set(best.user_attrs[record.UNIFORM]) == {*report.SCORES, *record.LOG_LOSSES}
    assert best.user_attrs[record.BEST_MEMBER]["label"] in {m["label"] for m in members}
    assert best.user_attrs["model_kept"] is False
    run = mlflow_store.get_run(best.user_attrs["mlflow_run_id"], store["tracking_uri"])
    assert run.info.status == "FINISHED"
    # Weights read the same everywhere: each member's share of the vote, in MLflow as in the members attr.
    for member in members:
        share = float(run.data.params[f"weight_{member['label']}"])
        assert share == pytest.approx(member["weight"], abs=5e-4)
    assert run.info.run_name == f"t{best.number} w=" + "/".join(f"{m['weight']:.2f}" for m in members)
    assert run.data.metrics[record.final("test_top1")] == pytest.approx(best.user_attrs["test_top1"], abs=5e-5)
    rows = json.loads(mlflow_store.download_artifact(run.info.run_id, "ensemble_members.json", store["tracking_uri"],
                                                 store["root"] / "dl").read_text())
    assert [r["name"] for r in rows][-2:] == ["uniform vote", "weighted vote"]
    assert mlflow_store.download_artifact(run.info.run_id, "ensemble_comparison.png", store["tracking_uri"],
                                      store["root"] / "dl").stat().st_size > 0


def test_best_prints_each_study(store):
    result = _invoke(["best", *_options(store)])
    assert result.exit_code == 0, result.output
    for name in (*APPROACH_STUDIES, "ensemble"):
        best = _study(store, name).best_trial
        assert name in result.output
        assert best.user_attrs["mlflow_run_id"] in result.output
        assert f"{best.user_attrs['test_top1']:.4f}" in result.output
    assert "learning_rate=" in result.output
    rows = [line.split("│")[1].strip() for line in result.output.splitlines() if line.strip().startswith("│")]
    assert {"weighted vote", "uniform vote"} <= set(rows) and any(row.startswith("best member ") for row in rows)


def test_exported_approach_predicts_what_its_trial_recorded(store, tmp_path):
    result = _invoke(["best", "finetune", "--export", str(tmp_path / "bundle"), *_options(store)])
    assert result.exit_code == 0, result.output
    best = _study(store, "finetune").best_trial
    assert f"exported finetune trial {best.number}" in result.output
    recorded = mlflow_store.load_predictions(best.user_attrs["mlflow_run_id"], store["tracking_uri"])["test_probs"]
    predicted = predict_images(tmp_path / "bundle", store["pngs"], top=3)
    for row, prediction in zip(recorded[: len(predicted)], predicted, strict=True):
        np.testing.assert_allclose([p for _, _, p in prediction.top], np.sort(row)[::-1], rtol=1e-5)
    assert json.loads((tmp_path / "bundle" / "params.json").read_text()) == best.user_attrs["params"]
    metrics = json.loads((tmp_path / "bundle" / "metrics.json").read_text())
    assert metrics == {k: best.user_attrs[k] for k in report.SCORES}
    readme = (tmp_path / "bundle" / "MODEL.md").read_text()
    assert f"trial {best.number}" in readme and best.user_attrs["mlflow_run_id"] in readme
    assert "fine-tuned" in readme and "The best of 3 complete trials (1 pruned, 1 failed)" in readme
    provenance = json.loads((tmp_path / "bundle" / "provenance.json").read_text())
    assert provenance["Keras backend of the training"] == provenance["Keras backend of the export"] \
        == keras.backend.backend()
    assert provenance["MLflow run"] == best.user_attrs["mlflow_run_id"]
    assert f"Keras backend of the training: {keras.backend.backend()}" in readme


def test_exported_ensemble_is_the_weighted_vote_of_the_kept_models(store, tmp_path):
    result = _invoke(["best", "ensemble", "--export", str(tmp_path / "bundle"), *_options(store)])
    assert result.exit_code == 0, result.output
    members = _study(store, "ensemble").best_trial.user_attrs[record.MEMBERS]
    recorded = [mlflow_store.load_predictions(m["run_id"], store["tracking_uri"])["test_probs"] for m in members]
    assert any(abs(m["temperature"] - 1) > 0.01 for m in members if m["weight"] > 0)
    calibrated = [voting.calibrate(p, m["temperature"]) for p, m in zip(recorded, members, strict=True)]
    expected = voting.soft_vote(calibrated, [m["weight"] for m in members])
    model = keras.models.load_model(tmp_path / "bundle" / "model.keras")
    pixels = np.stack([np.asarray(Image.open(path)) for path in store["pngs"]])
    np.testing.assert_allclose(model.predict(pixels, verbose=0), expected[:4], rtol=1e-5, atol=1e-7)
    params = json.loads((tmp_path / "bundle" / "params.json").read_text())
    assert [m["params"]["epochs"] for m in params["members"]] == [2, 2, 2]
    assert bundles.read_classes(tmp_path / "bundle" / "classes.tsv")[0] == (0, "n01443537", "goldfish")


def test_best_export_refuses_a_non_empty_folder(store, tmp_path):
    (tmp_path / "mine.txt").write_text("keep")
    result = _invoke(["best", "scratch", "--export", str(tmp_path), *_options(store)])
    assert result.exit_code == 1 and "pass --force" in result.output
    assert [p.name for p in tmp_path.iterdir()] == ["mine.txt"]


def test_best_registers_the_exported_model(store, tmp_path):
    result = _invoke(["best", "scratch", "--export", str(tmp_path / "b"), "--register", "tiny", *_options(store)])
    assert result.exit_code == 0, result.output
    assert "registered as tiny version 1" in result.output


def test_report_files_hold_the_numbers_of_the_studies(store, tmp_path):
    result = report.write_report(store["storage"], store["tracking_uri"], tmp_path)
    studies = (*APPROACH_STUDIES, "ensemble")
    expected_files = {"report.md", "report.html", "report.json", "comparison.png",
                      *(f"history_{n}.png" for n in studies),
                      *(f"importance_{n}.png" for n in studies)}
    assert {p.name for p in tmp_path.iterdir()} == expected_files == {p.name for p in result.files}
    numbers = json.loads((tmp_path / "report.json").read_text())
    by_name = {s["name"]: s for s in numbers["studies"]}
    assert list(by_name) == [*APPROACH_STUDIES, "ensemble"]
    for name in (*APPROACH_STUDIES, "ensemble"):
        best = _study(store, name).best_trial
        assert by_name[name]["best"]["scores"] == {k: best.user_attrs[k] for k in report.SCORES}
        assert by_name[name]["best"]["number"] == best.number
    assert by_name["finetune"]["counts"] == {"COMPLETE": 3, "PRUNED": 1, "FAIL": 1, "RUNNING": 0}
    assert by_name["finetune"]["compute_seconds"] == pytest.approx(sum(DURATIONS) + 5 + 1)
    ensemble_best = _study(store, "ensemble").best_trial.user_attrs
    best_member = ensemble_best[record.BEST_MEMBER]
    gains = numbers["gains"]["ensemble"]
    assert gains["test_top1_over_best_member"] == pytest.approx(ensemble_best["test_top1"] - best_member["test_top1"])
    assert gains["selection_top1_over_uniform"] == pytest.approx(
        ensemble_best["selection_top1"] - ensemble_best["uniform"]["selection_top1"])
    assert set(numbers["importances"]["finetune"]) == {"learning_rate", "width"}
    markdown = (tmp_path / "report.md").read_text()
    finetune = _study(store, "finetune").best_trial.user_attrs
    assert f"| {finetune['test_top1']:.4f} |" in markdown and "| 3 | 1 | 1 | 1m 06s |" in markdown
    run = mlflow_store.get_run(result.mlflow_run_id, store["tracking_uri"])
    assert run.data.metrics["finetune.test_top1"] == pytest.approx(finetune["test_top1"], abs=5e-5)
    assert mlflow_store.download_artifact(result.mlflow_run_id, "comparison.png", store["tracking_uri"],
                                      tmp_path / "dl").stat().st_size > 0
    # What MLflow shows is the HTML, every plot inline (its markdown view would not resolve image links).
    page = mlflow_store.download_artifact(result.mlflow_run_id, "report.html", store["tracking_uri"],
                                      tmp_path / "dl").read_text()
    pngs = [name for name in expected_files if name.endswith(".png")]
    assert page.count("src='data:image/png;base64,") == len(pngs)
    assert f"<td>{finetune['test_top1']:.4f}</td>" in page and "![" not in page


def test_report_ranks_params_as_optuna_dashboard_does(store, tmp_path):
    from optuna_dashboard._importance import get_param_importance_from_trials_cache
    from optuna_dashboard._inmemory_cache import InMemoryCache

    report.write_report(store["storage"], store["tracking_uri"], tmp_path, log_to_mlflow=False)
    numbers = json.loads((tmp_path / "report.json").read_text())
    storage = optuna.storages.get_storage(store["storage"])
    for name in ("finetune", "ensemble"):
        study = _study(store, name)
        shown = get_param_importance_from_trials_cache(InMemoryCache(), storage, study._study_id, 0,
                                                       study.get_trials(deepcopy=False))
        dashboard = {row["name"]: row["importance"] for row in shown}
        total = sum(dashboard.values())
        ours = numbers["importances"][name]
        assert list(ours) == sorted(dashboard, key=dashboard.get, reverse=True)
        assert ours == pytest.approx({key: value / total for key, value in dashboard.items()})


def test_report_command(store, tmp_path):
    result = _invoke(["report", "--out", str(tmp_path / "out"), *_options(store)])
    assert result.exit_code == 0, result.output
    assert "selection top-1 over uniform" in result.output
    [finetune] = [line for line in result.output.splitlines() if line.startswith("│ finetune ") and "1m 06s" in line]
    assert [cell.strip() for cell in finetune.split("│")[1:-1]] == ["finetune", "3", "1", "1", "1m 06s"], finetune
    assert (tmp_path / "out" / "report.md").is_file()


def _linked_storage(tmp_path) -> str:
    """A pretrained trial that scored 0.1345 top-1 alone, and an ensemble where it scores 0.2800 in the vote."""
    storage = f"sqlite:///{tmp_path / 'linked.db'}"
    own = {"selection_top1": 0.1345, "test_top1": 0.1245}
    pretrained = optuna.create_study(study_name="pretrained", storage=storage, direction="maximize")
    pretrained.add_trial(optuna.trial.create_trial(value=0.1345, user_attrs={
        **own, "mlflow_run_id": "p0", "mlflow_run_url": "http://mlflow.test/#/experiments/1/runs/p0"}))
    member = {"label": "pretrained-0", "study": "pretrained", "trial_number": 0, "run_id": "p0", "model_kept": True,
              "weight": 1.0, "temperature": 1.5, "selection_top1": 0.28, "test_top1": 0.27}
    ensemble = optuna.create_study(study_name="ensemble", storage=storage, direction="minimize")
    with optuna_experimental():
        ensemble.set_metric_names([record.SELECTION_LOG_LOSS])
    ensemble.add_trial(optuna.trial.create_trial(value=1.7551, user_attrs={
        "members": [member], "selection_top1": 0.574, "test_top1": 0.56, "selection_log_loss": 1.7551,
        "uniform": {"selection_top1": 0.28, "test_top1": 0.27}, "mlflow_run_url": "http://mlflow.test/#/experiments/2/runs/e0"}))
    return storage


def test_report_links_each_best_trial_titles_its_plots_and_explains_member_scores(tmp_path):
    report.write_report(_linked_storage(tmp_path), "", tmp_path, log_to_mlflow=False)
    markdown, page = (tmp_path / "report.md").read_text(), (tmp_path / "report.html").read_text()
    for experiment, run in ((1, "p0"), (2, "e0")):
        url = f"http://mlflow.test/#/experiments/{experiment}/runs/{run}?workflowType=machine_learning"
        assert f"| [0]({url}) |" in markdown
        assert f"<td><a href='{url}' target='_blank'>0</a></td>" in page
    assert "| ensemble | ensemble | " in markdown and " | selection log loss (lower is better) | 1.7551 | " in markdown
    titles = ["Optimisation history of pretrained: selection top-1 by trial, and the best so far",
              "Optimisation history of ensemble: selection log loss by trial, and the best so far",
              "Best trial of each study: selection and test scores"]
    for title in titles:
        assert f"### {title}" in markdown and f"<h3>{title}</h3>" in page
    assert f"![{titles[0]}](history_pretrained.png)" in markdown
    assert "<h3>history_" not in page and "<h3>comparison" not in page
    note = ("pretrained-0 scores selection top-1 0.2800 and test top-1 0.2700 in the vote (calibrated, restricted to "
            "the 200 classes), 0.1345 and 0.1245 as pretrained trial 0 in its own study")
    assert f"- {note}" in markdown and f"<p>{html.escape(note)}</p>" in page
    assert "A member's scores are those of its calibrated probabilities over the 200 classes, as they vote" in markdown


def _unkept_storage(tmp_path) -> str:
    storage = f"sqlite:///{tmp_path / 'unkept.db'}"
    scratch = optuna.create_study(study_name="scratch", storage=storage, direction="maximize")
    scratch.add_trial(optuna.trial.create_trial(value=0.5, user_attrs={"mlflow_run_id": "r1", "model_kept": False}))
    member = {"label": "scratch-0", "study": "scratch", "trial_number": 0, "run_id": "r1", "model_kept": False,
              "weight": 1.0, "selection_top1": 0.5, "selection_top5": 1.0, "test_top1": 0.4, "test_top5": 1.0}
    study = optuna.create_study(study_name="ensemble", storage=storage, direction="maximize")
    study.add_trial(optuna.trial.create_trial(value=0.6, user_attrs={"members": [member], "selection_top1": 0.6}))
    return storage


@pytest.mark.parametrize("study, fragment", [("scratch", "did not keep its model"),
                                             ("ensemble", "votes with scratch trial 0, whose model was not kept")])
def test_export_without_a_kept_model_is_a_clear_error(tmp_path, study, fragment):
    storage = _unkept_storage(tmp_path)
    result = _invoke(["best", study, "--export", str(tmp_path / "out"), "--storage", storage,
                      "--tracking-uri", f"sqlite:///{tmp_path / 'none.db'}"])
    assert result.exit_code == 1
    assert fragment in result.output.splitlines()[-1]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("scheme", ["sqlite", "journal"])
def test_summaries_read_every_storage_kind(tmp_path, scheme):
    url = f"sqlite:///{tmp_path / 's.db'}" if scheme == "sqlite" else f"journal:{tmp_path / 'journal.log'}"
    study = optuna.create_study(study_name="scratch", storage=open_storage(url), direction="maximize")
    for value in (0.2, 0.6, 0.4):
        study.add_trial(optuna.trial.create_trial(value=value, user_attrs={"test_top1": value / 2}))
    [summary] = report.summarize_studies(url)
    assert (summary.best.number, summary.best.value, summary.best.scores) == (1, 0.6, {"test_top1": 0.3})
    assert summary.counts["COMPLETE"] == 3


def test_best_names_an_unknown_study(store):
    result = _invoke(["best", "nosuch", *_options(store)])
    assert result.exit_code == 1 and "no study named 'nosuch'" in result.output
    assert "pretrained, finetune, scratch, ensemble" in result.output
