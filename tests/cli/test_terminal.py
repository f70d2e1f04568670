"""`tinyopt best`, `report` and a sweep's top trials read well in 80 and 120 columns: no word split across lines.

The store is made directly (Optuna trials carrying the user attrs a sweep records), without training:
approach studies whose params have long names, an ensemble minimising the selection log loss, and
an ensemble of an older store that maximised minus the selection log loss. Each output is compared
with the same output 1000 columns wide, where nothing wraps.
"""

from __future__ import annotations

import dataclasses
import re

import optuna
import pytest
from click.testing import CliRunner

from tinyopt.cli import cli
from tinyopt.core import record
from tinyopt.results import report
from tinyopt.stores.storage import load_study, optuna_experimental

WIDTHS = (80, 120)
RUN_URL = "http://127.0.0.1:5000/#/experiments/{experiment}/runs/{run}"
PRETRAINED = [  # (params, selection top-1): trial 0 scored over all 1000 ImageNet outputs
    ({"resize": "bilinear", "input_size": 128, "flip_tta": True, "restrict_200": False}, 0.1345),
    ({"resize": "bicubic", "input_size": 160, "flip_tta": False, "restrict_200": True}, 0.3125),
    ({"resize": "zeropad", "input_size": 96, "flip_tta": True, "restrict_200": True}, 0.2500),
]
SCRATCH = [({"learning_rate": 0.00020074099001954847, "width": 32, "stages": 3, "optimizer": "adamw",
             "label_smoothing": 0.1, "warmup_epochs": 2}, 0.2200),
           ({"learning_rate": 0.0031, "width": 64, "stages": 4, "optimizer": "sgd", "label_smoothing": 0.0,
             "warmup_epochs": 0}, 0.2650)]


def _scores(top1: float) -> dict[str, float]:
    return {record.SELECTION_TOP1: top1, record.SELECTION_TOP5: top1 + 0.2, record.TEST_TOP1: top1 - 0.01,
            record.TEST_TOP5: top1 + 0.19}


def _approach(url: str, name: str, trials: list, experiment: int) -> None:
    study = optuna.create_study(study_name=name, storage=url, direction="maximize")
    study.set_user_attr(record.APPROACH, name)
    choices = {key: sorted({params[key] for params, _ in trials}, key=str) for key in trials[0][0]}
    for number, (params, top1) in enumerate(trials):
        run = f"{experiment}{number:031x}"
        attrs = {**_scores(top1), record.PARAMS: params, record.RUN_ID: run, record.MODEL_KEPT: True,
                 record.RUN_URL: RUN_URL.format(experiment=experiment, run=run)}
        study.add_trial(optuna.trial.create_trial(
            value=top1, params=params, user_attrs=attrs,
            distributions={key: optuna.distributions.CategoricalDistribution(choices[key]) for key in params}))
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.PRUNED))
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL))


def _member(study: str, number: int, weight: float, temperature: float, top1: float) -> dict:
    return {"label": f"{study}-{number}", "study": study, "trial_number": number, "run_id": f"{number:032x}",
            "model_kept": True, "weight": weight, "temperature": temperature, **_scores(top1),
            record.SELECTION_LOG_LOSS: 2.5, record.TEST_LOG_LOSS: 2.6}


def _ensemble(url: str, name: str, *, minus: bool) -> None:
    """An ensemble of pretrained trial 0 (0.2800 in the vote, 0.1345 alone) and scratch trial 1."""
    objective = "minus_selection_log_loss" if minus else record.SELECTION_LOG_LOSS
    study = optuna.create_study(study_name=name, storage=url, direction="maximize" if minus else "minimize")
    study.set_user_attr(record.APPROACH, "ensemble")
    with optuna_experimental():
        study.set_metric_names([objective])
    members = [_member("pretrained", 0, 0.404, 1.2345, 0.2800), _member("scratch", 1, 0.596, 0.8765, 0.2650)]
    for number, loss in enumerate((1.8012, 1.7551)):
        params = {f"{record.WEIGHT_PREFIX}{m['label']}": m["weight"] for m in members}
        run = f"{name}-{number}"
        attrs = {**_scores(0.574), record.SELECTION_LOG_LOSS: loss, record.TEST_LOG_LOSS: loss + 0.05,
                 record.MEMBERS: members, record.PARAMS: params, record.RUN_ID: run,
                 record.RUN_URL: RUN_URL.format(experiment=9, run=run), record.MODEL_KEPT: False,
                 record.UNIFORM: {**_scores(0.55), record.SELECTION_LOG_LOSS: 1.9, record.TEST_LOG_LOSS: 1.95},
                 record.BEST_MEMBER: {"label": "pretrained-0", **members[0]}}
        study.add_trial(optuna.trial.create_trial(
            value=-loss if minus else loss, params=params, user_attrs=attrs,
            distributions={key: optuna.distributions.FloatDistribution(0, 1) for key in params}))


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("terminal")
    url = f"sqlite:///{root / 'studies.db'}"
    _approach(url, "pretrained", PRETRAINED, 1)
    _approach(url, "scratch", SCRATCH, 2)
    _ensemble(url, "ensemble", minus=False)
    _ensemble(url, "ensemble-2024", minus=True)
    return {"storage": url, "tracking_uri": f"sqlite:///{root / 'mlflow.db'}", "root": root}


def _output(stores, command: str, width: int) -> str:
    args = {"best": ["best"], "report": ["report", "--out", str(stores["root"] / "report")]}[command]
    result = CliRunner().invoke(cli, [*args, "--storage", stores["storage"], "--tracking-uri", stores["tracking_uri"]],
                                env={"COLUMNS": str(width)})
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def outputs(stores) -> dict[tuple[str, int], str]:
    """What ``best`` and ``report`` print at each width, and at a width where nothing wraps."""
    # The report is written once, without MLflow (tests/results/test_report.py logs one): each width prints it.
    written = dataclasses.replace(report.write_report(stores["storage"], "", stores["root"] / "report",
                                                      log_to_mlflow=False), mlflow_run_id="f" * 32)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(report, "write_report", lambda *args, **kwargs: written)
        return {(command, width): _output(stores, command, width) for command in ("best", "report")
                for width in (*WIDTHS, 1000)}


def _whole(word: str, text: str) -> int:
    """How often ``word`` occurs in ``text`` as a whole word (not inside a longer name such as pretrained-0)."""
    return len(re.findall(rf"(?<![\w-]){re.escape(word)}(?![\w-])", text))


def _check_words(shown: str, unwrapped: str, words: list[str], width: int) -> None:
    """Every line of ``shown`` fits ``width``, and each of ``words`` is as often whole there as in ``unwrapped``."""
    for line in shown.splitlines():
        # A link (a run's page, a store's URL) may run past the line, where the terminal wraps it, so that it
        # stays one link to click or copy: what comes before it fits.
        link = re.search(r"\S*://\S+$", line)
        assert len(line[: link.start() if link else None].rstrip()) <= width, line
    for word in words:
        assert _whole(word, unwrapped) > 0, (word, unwrapped)
        # A word cut at a line's end (or shortened to "…") leaves a whole occurrence short.
        assert _whole(word, shown) == _whole(word, unwrapped), (word, shown)


# What the store's studies print, as words that a line break must not cut: names, params, objectives, links.
LINKS = [RUN_URL.format(experiment=experiment, run=run) + "?workflowType=machine_learning"
         for experiment, run in ((1, f"1{1:031x}"), (2, f"2{1:031x}"), (9, "ensemble-1"), (9, "ensemble-2024-1"))]
PRINTED = {
    "both": ["pretrained", "scratch", "ensemble", "ensemble-2024", "selection", "top-1", "pretrained-0", "log", "loss",
             "0.5740", "1.7551"],
    "best": ["scratch-1", "flip_tta=False", "restrict_200=True", "learning_rate=0.0031", "label_smoothing=0",
             "warmup_epochs=0", "weights", "temperatures", "pretrained-0=1.23", "scratch-1=0.876", "minus", "-1.7551",
             "better", *LINKS],
    "report": ["complete", "pruned", "failed", "compute", "0.2800", "0.1345", "restricted", "classes", "uniform"],
}


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("command", ["best", "report"])
def test_no_word_is_split_across_lines(outputs, command, width):
    _check_words(outputs[command, width], outputs[command, 1000], [*PRINTED["both"], *PRINTED[command]], width)


@pytest.mark.parametrize("study, words", [
    ("scratch", ["learning_rate=0.0031", "learning_rate=0.000201", "label_smoothing=0.1", "warmup_epochs=2",
                 "selection", "top-1", "higher", LINKS[1]]),
    ("ensemble", ["weight_pretrained-0=0.404", "weight_scratch-1=0.596", "selection", "log", "loss", "top-1", "lower",
                  "0.5740", "1.7551", LINKS[2]]),
])
def test_the_sweeps_top_trials_keep_words_whole(stores, monkeypatch, study, words):
    from tinyopt.sweep import runner, summary

    result = summary.summarize(load_study(study, stores["storage"]), stores["storage"], stores["tracking_uri"])
    monkeypatch.setattr(runner, "run_sweep", lambda approach, **kwargs: result)
    shown = {}
    for width in (*WIDTHS, 1000):
        invoked = CliRunner().invoke(cli, ["sweep", result.approach, "--study", study, "--trials", "1"],
                                     env={"COLUMNS": str(width)})
        assert invoked.exit_code == 0, invoked.output
        shown[width] = invoked.output
    for width in WIDTHS:
        _check_words(shown[width], shown[1000], words, width)


@pytest.mark.parametrize("width", WIDTHS)
def test_best_names_each_objective_and_never_calls_a_negative_number_top1(outputs, width):
    shown = outputs["best", width]
    [negative] = [line for line in shown.splitlines() if "-1.7551" in line]
    assert "ensemble-2024" in negative and "minus" in negative and "top-1" not in negative, negative
    assert "selection log loss (lower is better) for ensemble" in " ".join(shown.split())


def test_report_says_why_a_member_scores_more_in_the_vote(outputs):
    note = " ".join(outputs["report", 1000].split())
    assert ("pretrained-0 scores selection top-1 0.2800 and test top-1 0.2700 in the vote (calibrated, restricted "
            "to the 200 classes), 0.1345 and 0.1245 as pretrained trial 0 in its own study") in note
    assert "scratch-1 scores" not in note  # its own trial scored what it scores in the vote
