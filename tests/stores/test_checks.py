"""Whether a store can be used, before anything is created in it: one line naming the file, the fault and the fix."""

from __future__ import annotations

import os
import sqlite3

import pytest

from tinyopt.core.errors import StudyError
from tinyopt.stores import checks

WHAT, FIX = "the Optuna storage", "pass --storage"


@pytest.mark.parametrize("url, scheme, database", [
    ("sqlite:///studies/tinyopt.db", "sqlite", False),
    ("journal:studies/journal.log", "journal", False),
    ("postgresql+psycopg://bob:pw@db:5432/x", "postgresql", True),
    ("PostgreSQL://db/x", "postgresql", True),
    ("mysql+pymysql://db/x", "mysql", True),
    ("http://127.0.0.1:5000", "http", False),
    ("redis://127.0.0.1/0", "redis", False),
])
def test_scheme_and_is_database(url, scheme, database):
    assert checks.scheme(url) == scheme
    assert checks.is_database(url) is database


def _sqlite(path):
    connection = sqlite3.connect(path)
    connection.execute("CREATE TABLE t (x)")
    connection.executemany("INSERT INTO t VALUES (?)", [(f"row {i} " * 20,) for i in range(400)])  # many pages
    connection.commit()
    connection.close()
    return path


def _check(path, writable=True):
    checks.check_file(path, WHAT, FIX, writable=writable, read=checks.read_sqlite)


def _one_line(err) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_an_intact_file_and_a_file_its_folder_can_hold_pass(tmp_path):
    _check(_sqlite(tmp_path / "ok.db"))
    _check(tmp_path / "new" / "deeper" / "studies.db")  # created later, under a folder that exists
    assert not (tmp_path / "new").exists()


def test_a_damaged_file_is_named_with_the_fix(tmp_path):
    path = _sqlite(tmp_path / "studies.db")
    with open(path, "r+b") as handle:
        handle.write(b"garbage, not the SQLite header")
    with pytest.raises(StudyError) as err:
        _check(path)
    assert _one_line(err).startswith(f"{WHAT} {path} is damaged (")
    assert str(err.value).endswith("); restore it from a copy, or move it aside to start afresh")


def test_a_folder_is_no_store(tmp_path):
    with pytest.raises(StudyError) as err:
        _check(tmp_path)
    assert _one_line(err) == f"{WHAT} {tmp_path} is a folder; {FIX}"


def test_a_file_where_a_folder_should_be(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(StudyError) as err:
        _check(tmp_path / "file" / "studies.db")
    assert _one_line(err) == f"{WHAT} {tmp_path / 'file' / 'studies.db'} cannot be created: {tmp_path / 'file'} " \
                             f"is not a folder; {FIX}"


def _read_only(monkeypatch, *paths):
    """``os.access`` says these paths cannot be written (as for a user without root's override of file modes)."""
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: access(path, mode) and not (
        mode & os.W_OK and os.fspath(path) in {os.fspath(p) for p in paths}))


def test_a_read_only_file_is_refused_only_when_the_command_writes(tmp_path, monkeypatch):
    path = _sqlite(tmp_path / "studies.db")
    _read_only(monkeypatch, path)
    with pytest.raises(StudyError) as err:
        _check(path)
    assert _one_line(err) == (f"{WHAT} {path} cannot be written: {path} is read-only; make it writable "
                              f"(chmod u+w {path}) or choose another path")
    _check(path, writable=False)


def test_a_read_only_folder_is_refused_for_a_file_it_would_hold_or_beside_its_file(tmp_path, monkeypatch):
    path = _sqlite(tmp_path / "studies.db")
    _read_only(monkeypatch, tmp_path)
    with pytest.raises(StudyError) as err:
        _check(tmp_path / "new.db")
    assert _one_line(err) == (f"{WHAT} {tmp_path / 'new.db'} cannot be created: the folder {tmp_path} is not "
                              f"writable; make it writable, or {FIX}")
    with pytest.raises(StudyError, match=f"cannot be written: {tmp_path} is read-only"):
        _check(path)  # SQLite writes its journal beside the file


def test_read_sqlite_reads_every_page(tmp_path):
    path = _sqlite(tmp_path / "ok.db")
    checks.read_sqlite(path)
    page = 4096
    assert path.stat().st_size >= 8 * page
    with open(path, "r+b") as handle:  # scribble over pages 3 to 6 (page 1 holds the header)
        handle.seek(2 * page)
        handle.write(bytes(range(256)) * (4 * page // 256))
    with pytest.raises(sqlite3.DatabaseError):
        checks.read_sqlite(path)


def test_a_missing_database_driver_says_what_to_install():
    with pytest.raises(StudyError) as err:
        checks.probe_database("mysql+nosuchdriver://bob:hunter2@127.0.0.1:1/x", WHAT, FIX)
    message = _one_line(err)
    assert message.startswith(f"cannot reach {WHAT} mysql+nosuchdriver://bob:***@127.0.0.1:1/x (")
    assert "hunter2" not in message and message.endswith(f"; {FIX}")
