"""Warm start: the best trials of an earlier study, filtered against the current space, queued once per study."""

from __future__ import annotations

from types import SimpleNamespace

import optuna
import pytest
from click.testing import CliRunner
from sweep_helpers import SMALL, earlier_study, trials_of

from tinyopt.cli import cli
from tinyopt.core import record
from tinyopt.core.config import load_config
from tinyopt.core.errors import StudyError
from tinyopt.stores import retries
from tinyopt.stores import storage as storages
from tinyopt.sweep import runner, warmstart, workers


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    """One storage of earlier studies for the tests that only read them (each test sweeps its own later study)."""
    url = f"sqlite:///{tmp_path_factory.mktemp('warm')}/studies.db"
    earlier_study(url)
    earlier_study(url, name="earlier-min", direction="minimize")
    earlier_study(url, name="other")
    earlier_study(url, name="finetune", approach="finetune")
    earlier_study(url, name="empty", values=())
    pareto = optuna.create_study(study_name="pareto", storage=url, directions=["maximize", "minimize"])
    pareto.set_user_attr(record.APPROACH, "scratch")
    dropout = optuna.distributions.FloatDistribution(0.0, 0.5)
    for number, values in enumerate(((0.2, 1.0), (0.6, 9.0), (0.4, 0.5))):
        pareto.add_trial(optuna.trial.create_trial(values=list(values), params={"dropout": number / 10},
                                                   distributions={"dropout": dropout}))
    return url


def config(*overrides, k=3):
    return load_config("scratch", overrides=(*SMALL["scratch"], f"study.warm_start_trials={k}", *overrides))


@pytest.mark.parametrize("earlier, best", [("earlier", [1, 3, 2]), ("earlier-min", [0, 4, 2])])
def test_the_best_k_complete_trials_by_the_earlier_study_s_direction(url, earlier, best):
    warm = warmstart.plan("scratch", "later", config(), url, earlier)
    assert [number for number, _ in warm.candidates] == best
    assert warm.storage == url and warm.study == earlier


def test_a_study_of_accuracy_and_latency_is_ranked_by_its_first_objective(url):
    warm = warmstart.plan("scratch", "later", config(k=2), url, "pareto")
    assert warm.candidates == ((1, {"dropout": 0.1}), (2, {"dropout": 0.2}))


def test_values_outside_the_changed_space_are_dropped_with_one_note(url):
    # The space changed: dropout now at most 0.1, so trial 3's 0.15 is dropped (the sampler draws it).
    warm = warmstart.plan("scratch", "later", config('space.dropout={type="float", low=0.0, high=0.1}'), url,
                          "earlier")
    assert dict(warm.candidates) == {1: {"dropout": 0.05, "augment": "flip", "stem_stride": 2},
                                     3: {"augment": "flip", "stem_stride": 2},
                                     2: {"dropout": 0.1, "augment": "flip", "stem_stride": 2}}
    later = optuna.create_study(study_name="later-changed")  # in memory
    assert warmstart.queue(later, warm) == (
        "warm start from study earlier: queued trials 1, 3, 2; dropped epochs=30 (fixed at 2 here), "
        "head=gone (not in this space) and dropout=0.15 (trial 3: outside 0..0.1)")
    waiting = later.get_trials(deepcopy=False)
    assert [t.user_attrs[record.WARM_START_FROM] for t in waiting] == [
        {"study": "earlier", "trial": number} for number in (1, 3, 2)]
    assert [t.system_attrs["fixed_params"] for t in waiting] == [params for _, params in warm.candidates]


def test_the_note_groups_what_was_dropped_and_names_what_was_not_queued():
    gone = "not among 128, 96, 160"
    drops = [warmstart.Drop(4, "input_size", 224, gone), warmstart.Drop(7, "input_size", 192, gone),
             *(warmstart.Drop(number, "head_width", 256, "not in this space") for number in (4, 7, 1))]
    warm = warmstart.WarmStart("a", "sqlite:///a.db", ((4, {"lr": 0.1}), (7, {}), (1, {"lr": 0.1})), tuple(drops))
    assert warmstart.note(warm, [4], empty=[7], repeated=[1]) == (
        "warm start from study a: queued trial 4; dropped input_size=224/192 (trials 4, 7: not among 128, 96, 160) "
        "and head_width=256 (not in this space); not queued: trial 7 (no value fits here), trial 1 (the same params "
        "as a trial here)")
    assert warmstart.note(warm, []).startswith("warm start from study a: queued nothing; dropped")


def test_queued_once_however_often_the_study_is_opened(url):
    warm = warmstart.plan("scratch", "later", config(), url, "earlier")
    later = optuna.create_study(study_name="later-once")  # in memory
    first = warmstart.queue(later, warm)
    assert first.startswith("warm start from study earlier: queued trials 1, 3, 2; dropped")
    assert later.user_attrs[record.WARM_STARTED_FROM] == {"study": "earlier", "storage": url, "trials": [1, 3, 2]}
    assert warmstart.queue(later, warm) == ("warm start from study earlier: its trials 1, 3, 2 were queued when the "
                                            "study was first warm-started; nothing queued again")
    assert warmstart.queue(later, warmstart.plan("scratch", "later", config(), url, "other")) == (
        f"study later-once was warm-started from study earlier ({url}) already: --warm-start other queued nothing")
    assert len(later.get_trials(deepcopy=False)) == 3


def test_params_the_study_already_holds_are_not_queued_again(url):
    warm = warmstart.plan("scratch", "later", config(k=2), url, "earlier")
    later = optuna.create_study(study_name="later-held")  # in memory
    later.enqueue_trial(dict(warm.candidates)[3])  # e.g. the defaults' first trial
    assert warmstart.queue(later, warm).endswith("; not queued: trial 3 (the same params as a trial here)")
    assert [t.user_attrs.get(record.WARM_START_FROM, {}).get("trial") for t in later.trials] == [None, 1]


def test_a_retry_of_a_warm_started_trial_keeps_where_it_came_from():
    study = optuna.create_study()
    study.enqueue_trial({"dropout": 0.1}, user_attrs={record.WARM_START_FROM: {"study": "earlier", "trial": 3}})
    trial = study.ask()
    trial.suggest_float("dropout", 0, 0.5)
    study.tell(trial, state=optuna.trial.TrialState.FAIL)
    number = retries.requeue(study, trial.number)
    retry = study.trials[number]
    assert retry.user_attrs[record.WARM_START_FROM] == {"study": "earlier", "trial": 3}
    assert record.warm_start_tags(retry.user_attrs) == {record.TAG_WARM_START_FROM: "earlier trial 3"}


@pytest.mark.parametrize("case, fragment", [
    ("missing", "no study 'nope' in {url} to warm-start from (its studies: earlier, earlier-min, empty, finetune, "
                "other, pareto); pass "
                "--warm-start with one of them, or --warm-start-storage URL where the study lives"),
    ("other approach", "study 'finetune' holds finetune trials, not scratch; warm-start from a scratch study"),
    ("no complete trial", "study 'empty' has no complete trial to warm-start from; sweep it until one completes, "
                          "or drop --warm-start"),
    ("itself", "--warm-start earlier names the study being swept; name an earlier study, or sweep into a new one "
               "with --study NAME"),
])
def test_a_study_that_cannot_start_a_sweep_is_refused_in_one_line(url, case, fragment):
    source = {"missing": "nope", "other approach": "finetune", "no complete trial": "empty"}.get(case, "earlier")
    name = "earlier" if case == "itself" else "later"
    with pytest.raises(StudyError) as err:
        warmstart.plan("scratch", name, config(), url, source)
    assert str(err.value) == fragment.format(url=url)


def test_an_ensemble_is_refused_in_one_line_and_nothing_is_created(tmp_path):
    result = CliRunner().invoke(cli, ["sweep", "ensemble", "--warm-start", "earlier", "--storage",
                                      f"sqlite:///{tmp_path}/studies.db", "--tracking-uri",
                                      f"sqlite:///{tmp_path}/mlflow.db"])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines == ["error: --warm-start is for pretrained, finetune and scratch: an ensemble's weights belong to "
                     "its members, so another study's do not carry over; drop --warm-start"]
    assert list(tmp_path.iterdir()) == []


def test_the_options_reach_the_sweep_but_not_the_workers_it_starts(monkeypatch):
    seen = {}

    def run_sweep(approach, **kwargs):
        seen.update(warm_start=kwargs["warm_start"], warm_start_storage=kwargs["warm_start_storage"])
        return SimpleNamespace(exit_code=0, top=[], counts={"COMPLETE": 0, "PRUNED": 0, "FAIL": 0}, notes=[],
                               recovered=[], interrupted=None, new_trials=0, storage="-", ui_command="-")

    monkeypatch.setattr(runner, "run_sweep", run_sweep)
    result = CliRunner().invoke(cli, ["sweep", "scratch", "--trials", "1", "--warm-start", "earlier",
                                      "--warm-start-storage", "postgresql+psycopg://me:secret@db/optuna"])
    assert result.exit_code == 0, result.output
    assert seen == {"warm_start": "earlier", "warm_start_storage": "postgresql+psycopg://me:secret@db/optuna"}
    # The supervisor of --workers queues the warm start; its workers find the study marked.
    args = workers.SweepArgs("scratch", 4, workers=2, warm_start="earlier")
    assert "--warm-start" not in workers._worker_command(args, 2, None)


def test_a_sweep_refused_for_its_warm_start_creates_no_study(tmp_path):
    url = f"sqlite:///{tmp_path}/studies.db"
    earlier_study(url, name="finetune", approach="finetune")
    with pytest.raises(StudyError, match="holds finetune trials"):
        runner.prepare("scratch", study_name="later", overrides=SMALL["scratch"], storage=url,
                       tracking_uri=f"sqlite:///{tmp_path}/mlruns/mlflow.db", warm_start="finetune")
    assert storages.study_names(url) == ["finetune"]


def test_every_opening_of_the_study_after_the_first_queues_nothing(tmp_path):
    """What each sweep, worker or restart does under the study's lock (three commands started together on one
    storage, their trials and runs: tests/sweep/test_workers.py, the --max-trials test)."""
    stores = {"storage": f"sqlite:///{tmp_path}/studies.db", "tracking_uri": f"sqlite:///{tmp_path}/mlruns/mlflow.db"}
    earlier_study(stores["storage"])
    warm = warmstart.plan("scratch", "later", config(), stores["storage"], "earlier")
    notes = []
    for _ in range(2):
        session = runner.open_sweep("scratch", "later", config(), warm_start=warm, **stores)
        session.tracker.end_sweep("FINISHED")
        notes += [note for note in session.notes if note.startswith("warm start")]
    trials = trials_of(stores["storage"], "later")
    # The defaults' first trial, then the earlier study's best 3.
    assert [t.user_attrs.get(record.WARM_START_FROM, {}).get("trial") for t in trials] == [None, 1, 3, 2]
    assert notes[0].startswith("warm start from study earlier: queued trials 1, 3, 2; dropped epochs=30")
    assert notes[1].endswith("nothing queued again") and len(notes) == 2
