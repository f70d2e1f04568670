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

import sqlite3
import zipfile
from pathlib import Path

import pytest
from fault_helpers import tinyopt
from sweep_helpers import SMALL

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
