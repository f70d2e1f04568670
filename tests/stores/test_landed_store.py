"""A store written by an earlier tinyopt is read, exported, reported and swept on by this one.

``landed_store.zip`` holds ``studies/`` and ``mlruns/`` as tinyopt at commit 6c73ca5 (before the
sub-packages and the typed config) left them, made in ``/tmp/landedstore/work`` with::

    PYTHONPATH=<checkout of 6c73ca5> python -m tinyopt sweep scratch --trials 2 --data <make_tiny_imagenet folder> \\
        --set space.stages=2 --set space.width=8 ... (tests/sweep_helpers.SMALL["scratch"])
    ... sweep scratch --study scratch2 --trials 1 (same settings)
    ... sweep ensemble --trials 3 --set 'ensemble.studies=["scratch","scratch2"]' --set ensemble.top_k=2

MLflow keeps absolute artifact locations, so the copy here has its folder written into them, as a
person who moved their project folder would have to.
"""

from __future__ import annotations

import json
import sqlite3
import zipfile
from pathlib import Path

import pytest
from fault_helpers import one_error_line, tinyopt
from sweep_helpers import SMALL

from tinyopt.core import record
from tinyopt.core.summary import study_config
from tinyopt.results.report import summarize_studies
from tinyopt.stores.storage import load_study

pytestmark = pytest.mark.slow  # a sweep, an export and a report in subprocesses

ARCHIVE = Path(__file__).with_name("landed_store.zip")
MADE_IN = "/tmp/landedstore/work"


def _text_columns(connection: sqlite3.Connection) -> list[tuple[str, str]]:
    tables = [row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    return [(table, column[1]) for table in tables
            for column in connection.execute(f'PRAGMA table_info("{table}")')
            if column[2].upper() in ("TEXT", "") or "CHAR" in column[2].upper()]


@pytest.fixture
def landed(tmp_path) -> Path:
    work = tmp_path / "work"
    with zipfile.ZipFile(ARCHIVE) as archive:
        archive.extractall(work)
    connection = sqlite3.connect(work / "mlruns" / "mlflow.db")
    with connection:
        for table, column in _text_columns(connection):
            connection.execute(f'UPDATE "{table}" SET "{column}" = REPLACE("{column}", ?, ?) '
                               f'WHERE "{column}" LIKE ?', (MADE_IN, str(work), f"%{MADE_IN}%"))
    connection.close()
    return work


def test_the_typed_records_read_a_landed_store(landed):
    storage = f"sqlite:///{landed / 'studies' / 'tinyopt.db'}"
    summaries = {s.name: s for s in summarize_studies(storage)}
    assert set(summaries) == {"scratch", "scratch2", "ensemble"}
    assert summaries["scratch"].counts["COMPLETE"] == 2
    ensemble = summaries["ensemble"].best
    assert {m.study for m in ensemble.members} == {"scratch", "scratch2"}
    assert sum(m.weight for m in ensemble.members) == pytest.approx(1.0)
    assert all(m.temperature is not None and m.model_kept for m in ensemble.members)
    config = study_config(load_study("scratch", storage))
    assert config.approach == "scratch" and config.space["width"] == 8 and config.study.keep_models == 5
    assert study_config(load_study("ensemble", storage)).ensemble.studies == ("scratch", "scratch2")


def test_best_export_report_and_a_new_sweep_work_on_a_landed_store(landed, tiny_folder, tmp_path):
    shown = tinyopt("best", cwd=landed)
    assert shown.returncode == 0, shown.stderr
    assert "ensemble" in shown.stdout and "weights: scratch" in shown.stdout
    exported = tinyopt("best", "--export", "out", cwd=landed)
    assert exported.returncode == 0, exported.stderr
    assert (landed / "out" / "model.keras").is_file() and (landed / "out" / "provenance.json").is_file()
    report = tinyopt("report", "--out", "report", cwd=landed)
    assert report.returncode == 0, report.stderr
    assert "scratch2" in (landed / "report" / "report.md").read_text()
    overrides = [arg for item in SMALL["scratch"] for arg in ("--set", item)]
    swept = tinyopt("sweep", "scratch", "--trials", "1", "--data", str(tiny_folder), "--cache",
                    str(tmp_path / "cache"), *overrides, cwd=landed)
    assert swept.returncode == 0, swept.stderr
    study = load_study("scratch", f"sqlite:///{landed / 'studies' / 'tinyopt.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3


def _set_attr(database: Path, table: str, owner: str, number: int, key: str, value) -> None:
    """Write a user attr straight into an Optuna SQLite storage, as damage (or an old writer) might."""
    connection = sqlite3.connect(database)
    with connection:
        if table == "trial":
            (row,) = connection.execute("SELECT trial_id FROM trials WHERE number = ? AND study_id = (SELECT study_id "
                                        "FROM studies WHERE study_name = ?)", (number, owner)).fetchall()
            connection.execute("UPDATE trial_user_attributes SET value_json = ? WHERE trial_id = ? AND key = ?",
                               (json.dumps(value), row[0], key))
        else:
            connection.execute("UPDATE study_user_attributes SET value_json = ? WHERE key = ? AND study_id = "
                               "(SELECT study_id FROM studies WHERE study_name = ?)", (json.dumps(value), key, owner))
    connection.close()


def test_a_damaged_record_in_a_store_is_one_line(landed):
    database = landed / "studies" / "tinyopt.db"
    storage = f"sqlite:///{database}"
    config = load_study("scratch", storage).user_attrs[record.CONFIG]
    del config["study"]
    _set_attr(database, "study", "scratch", 0, record.CONFIG, config)
    refit = tinyopt("best", "scratch", "--refit", cwd=landed)
    errors = refit.stderr.strip().splitlines()
    assert refit.returncode == 1 and "Traceback" not in refit.stderr and len(errors) == 1, refit.stderr
    assert "the config stored with study 'scratch' is damaged" in errors[0] and "restore" in errors[0]
    ensemble = load_study("ensemble", storage).best_trial
    members = ensemble.user_attrs[record.MEMBERS]
    del members[0]["study"]
    _set_attr(database, "trial", "ensemble", ensemble.number, record.MEMBERS, members)
    one_error_line(tinyopt("best", cwd=landed), f"the members record of ensemble trial {ensemble.number} is damaged",
                   "restore the storage from a copy")
