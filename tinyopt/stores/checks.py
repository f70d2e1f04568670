"""Whether a store can be used, checked before anything is created in it.

A store kept in one file (Optuna's SQLite or journal file, MLflow's SQLite file) must be intact and,
when the command writes, writable with its folder; a database server must answer within seconds.
Every failure is one line naming the store, what is wrong and the fix.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from pathlib import Path

from tinyopt.core.errors import StudyError
from tinyopt.core.urls import first_line, redact

CONNECT_TIMEOUT = 10  # seconds: an unreachable database fails fast, well before a sweep starts
SQLITE_BUSY_TIMEOUT = 60  # seconds a writer waits for the file lock before "database is locked"
DATABASES = ("postgresql", "mysql")


def scheme(url: str) -> str:
    """``sqlite``, ``journal``, ``postgresql``, ``mysql``, or what else the URL starts with."""
    if url.startswith("journal:"):
        return "journal"
    return url.split(":", 1)[0].split("+", 1)[0].lower()


def is_database(url: str) -> bool:
    """Whether the URL names a database server (several machines may share it)."""
    return scheme(url) in DATABASES


def check_file(path: Path, what: str, fix: str, *, writable: bool, read: Callable[[Path], None]) -> None:
    """Check a store kept in one file (Optuna's or MLflow's) before anything is created or changed in it.

    A file that does not exist yet needs a folder that can hold it; one that exists must be a file
    that ``read`` can read to its end (a damaged SQLite page, a garbage header, a broken journal line
    raise there) and, when tinyopt will write it, writable along with its folder (SQLite writes its
    journal beside the file).

    Args:
        path: the file.
        what: the store, as a message names it (``the Optuna storage``, ``the MLflow store``).
        fix: how to name another store, for a path that cannot be one.
        writable: the command will write to it.
        read: reads the whole file, raising if it is damaged.

    Raises:
        StudyError: one line naming the file, what is wrong with it and the fix.
    """
    if path.is_dir():
        raise StudyError(f"{what} {path} is a folder; {fix}")
    if not path.exists():
        parent = next((p for p in (path.parent, *path.parent.parents) if p.exists()), Path("."))
        if not parent.is_dir():
            raise StudyError(f"{what} {path} cannot be created: {parent} is not a folder; {fix}")
        if writable and not os.access(parent, os.W_OK | os.X_OK):
            raise StudyError(f"{what} {path} cannot be created: the folder {parent} is not writable; "
                             f"make it writable, or {fix}")
        return
    if not os.access(path, os.R_OK):
        raise StudyError(f"{what} {path} cannot be read (permission denied); make it readable (chmod u+r) "
                         "or choose another path")
    try:
        read(path)
    except Exception as err:  # noqa: BLE001 - sqlite3, JSON and Optuna each raise their own
        raise StudyError(f"{what} {path} is damaged ({first_line(err)}); restore it from a copy, or move it "
                         "aside to start afresh") from err
    if writable:
        for needed in (path, path.parent):
            if not os.access(needed, os.W_OK):
                raise StudyError(f"{what} {path} cannot be written: {needed} is read-only; make it writable "
                                 f"(chmod u+w {needed}) or choose another path")


def read_sqlite(path: Path) -> None:
    """Read every page of a SQLite file (``PRAGMA quick_check``), raising if one is damaged."""
    connection = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=SQLITE_BUSY_TIMEOUT)
    try:
        found = [row[0] for row in connection.execute("PRAGMA quick_check")]
    finally:
        connection.close()
    if found != ["ok"]:
        raise sqlite3.DatabaseError("; ".join(map(str, found[:3])))


def probe_database(url: str, what: str, fix: str) -> None:
    """Connect to a database server and run ``SELECT 1``, within ``CONNECT_TIMEOUT`` seconds.

    Raises:
        StudyError: a missing driver, or a server that refuses or does not answer; ``what`` and
            ``fix`` complete the message.
    """
    import sqlalchemy

    try:
        engine = sqlalchemy.create_engine(url, connect_args={"connect_timeout": CONNECT_TIMEOUT},
                                          poolclass=sqlalchemy.pool.NullPool)
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text("SELECT 1"))
        engine.dispose()
    except ImportError as err:
        fix = "pip install 'tinyopt[postgres]'" if scheme(url) == "postgresql" else "install the driver the URL names"
        raise StudyError(f"{what} {redact(url)} needs a database driver that is not installed ({err}); {fix}"
                         ) from err
    except Exception as err:  # noqa: BLE001 - drivers raise their own types for refused or unknown hosts
        raise StudyError(f"cannot reach {what} {redact(url)} ({first_line(err)}); {fix}") from err
