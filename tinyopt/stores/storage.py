"""Optuna storages from URLs: checked before anything is created, opened, locked, and shared by workers.

URLs:

- ``sqlite:///FILE.db``: the embedded default, for one process.
- ``postgresql+psycopg://USER@HOST/DB`` or ``mysql+...://``: several processes or machines. Workers
  send heartbeats, so that the trial of a killed worker is failed and retried.
- ``journal:PATH``: Optuna's journal file, for several processes on one machine.

Optuna never recommends SQLite for several processes (it cannot lock a waiting trial while one
worker takes it, and writers time out); for several workers on one machine it recommends its
journal file. So when ``tinyopt sweep --workers K`` is given a SQLite URL, the study moves into a
journal file beside the database (``FILE.db.workers/STUDY.journal``) and lives there from then on;
every tinyopt command that opens a study by name from that SQLite URL finds it there.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sqlite3
import urllib.parse
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tinyopt.core.errors import StudyError
from tinyopt.core.locks import file_lock
from tinyopt.core.urls import first_line, redact, sqlite_path

CONNECT_TIMEOUT = 10  # seconds: an unreachable database fails fast, well before a sweep starts
_SQLITE_BUSY_TIMEOUT = 60  # seconds a writer waits for the file lock before "database is locked"
_DATABASES = ("postgresql", "mysql")
_FIX = "check --storage (sqlite:///FILE.db, postgresql+psycopg://USER@HOST/DB or journal:PATH)"


def _scheme(url: str) -> str:
    """``sqlite``, ``journal``, ``postgresql``, ``mysql``, or what else the URL starts with."""
    if url.startswith("journal:"):
        return "journal"
    return url.split(":", 1)[0].split("+", 1)[0].lower()


def _file(url: str) -> Path | None:
    """The file of a SQLite or journal URL; None for a database server."""
    if url.startswith("sqlite:///"):
        return sqlite_path(url)
    if url.startswith("journal:"):
        return Path(url.removeprefix("journal:"))
    return None


def is_database(url: str) -> bool:
    """Whether the URL names a database server (several machines may share it)."""
    return _scheme(url) in _DATABASES


def check(url: str, study_name: str | None = None) -> None:
    """Make sure a storage URL can be opened and written, without creating or changing anything.

    A SQLite or journal file that exists must be intact and writable (and so must the journal a
    study of a SQLite storage moved to, ``home``); one that does not exist yet needs a folder that
    can hold it. A database server must answer.

    Raises:
        StudyError: an unsupported URL, a path that cannot hold the file, a damaged or read-only file,
            a missing database driver or a database that does not answer within ``CONNECT_TIMEOUT`` seconds.
    """
    scheme = _scheme(url)
    path = _file(url)
    if path is not None:
        check_file(path, "the Optuna storage", _FIX, writable=True, read=_reader(scheme))
        moved = _workers_journal(url, study_name) if study_name is not None else None
        if moved is not None and moved.exists():
            check_file(moved, "the Optuna storage", _FIX, writable=True, read=_read_journal)
        return
    if scheme not in _DATABASES:
        raise StudyError(f"unsupported storage URL {redact(url)!r}; {_FIX}")
    probe_database(url, "the Optuna storage", _FIX)


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
    connection = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=_SQLITE_BUSY_TIMEOUT)
    try:
        found = [row[0] for row in connection.execute("PRAGMA quick_check")]
    finally:
        connection.close()
    if found != ["ok"]:
        raise sqlite3.DatabaseError("; ".join(map(str, found[:3])))


def _read_journal(path: Path) -> None:
    """Replay an Optuna journal file to its end, raising if a line of it is damaged."""
    _journal(path).get_all_studies()


def _reader(scheme: str) -> Callable[[Path], None]:
    return _read_journal if scheme == "journal" else read_sqlite


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
        fix = "pip install 'tinyopt[postgres]'" if _scheme(url) == "postgresql" else "install the driver the URL names"
        raise StudyError(f"{what} {redact(url)} needs a database driver that is not installed ({err}); {fix}"
                         ) from err
    except Exception as err:  # noqa: BLE001 - drivers raise their own types for refused or unknown hosts
        raise StudyError(f"cannot reach {what} {redact(url)} ({first_line(err)}); {fix}") from err


def open_storage(url: str, heartbeat_interval: int = 60, on_stale: Callable[[Any], None] | None = None) -> Any:
    """An Optuna storage for a URL, created if it does not exist.

    Database storages send a heartbeat every ``heartbeat_interval`` seconds while a trial runs; a
    trial whose heartbeat stops for two intervals is failed and queued again with the same params
    (``RetryHeartbeatStaleTrialCallback``), then given to ``on_stale`` (which closes its MLflow run).
    SQLite and journal files need no heartbeat: a trial whose process died on this machine is found
    by ``tinyopt.sweep.recovery``.

    Raises:
        StudyError: an unsupported URL, or a storage that cannot be opened.
    """
    import optuna
    import sqlalchemy.exc

    scheme = _scheme(url)
    path = _file(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    if scheme == "journal":
        return _journal(path)
    kwargs: dict[str, Any] = {}
    if scheme == "sqlite":
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": _SQLITE_BUSY_TIMEOUT}}
    elif scheme in _DATABASES:
        kwargs = {
            "heartbeat_interval": heartbeat_interval,
            "grace_period": 2 * heartbeat_interval,
            "heartbeat_stale_trial_callback": _StaleTrial(on_stale),
            "engine_kwargs": {"pool_pre_ping": True, "connect_args": {"connect_timeout": CONNECT_TIMEOUT}},
        }
    else:
        raise StudyError(f"unsupported storage URL {redact(url)!r}; {_FIX}")
    try:
        with optuna_experimental():
            return optuna.storages.RDBStorage(url, **kwargs)
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError) as err:
        raise StudyError(f"cannot open Optuna storage {redact(url)} ({first_line(err)}); {_FIX}") from err


def _journal(path: Path) -> Any:
    import optuna
    from optuna.storages.journal import JournalFileBackend

    return optuna.storages.JournalStorage(JournalFileBackend(str(path)))


class _StaleTrial:
    """What Optuna calls for a trial whose heartbeat stopped: queue it again, then ``on_stale`` (if any)."""

    def __init__(self, on_stale: Callable[[Any], None] | None):
        self.retry = retry_callback()
        self.on_stale = on_stale

    def __call__(self, study: Any, trial: Any) -> None:
        self.retry(study, trial)
        if self.on_stale is not None:
            self.on_stale(trial)


def retry_callback() -> Any:
    """What happens to a trial whose worker died: queued again with the same params, at most twice."""
    import optuna

    with optuna_experimental():
        return optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2)


def open_existing(url: str) -> Any:
    """The Optuna storage at ``url``, refusing to create an empty SQLite or journal file where none was swept.

    Raises:
        StudyError: the file does not exist or is damaged, or the storage cannot be opened.
    """
    path = _file(url)
    if path is None:
        return open_storage(url)
    if not path.is_file():
        raise StudyError(f"no Optuna storage at {path}; run `tinyopt sweep APPROACH` first or pass --storage")
    check_file(path, "the Optuna storage", _FIX, writable=False, read=_reader(_scheme(url)))
    # A sweep may be creating this file's tables right now, under its lock (see study_lock): opening it
    # meanwhile would create them a second time. (No lock file: no tinyopt sweep ever made this file.)
    lock = _lock_file(path)
    with file_lock(lock) if lock.exists() else contextlib.nullcontext():
        return open_storage(url)


def _workers_folder(url: str) -> Path | None:
    """The folder of a SQLite storage's workers' journals, one file per study (None for other storages)."""
    path = _file(url)
    return path.parent / f"{path.name}.workers" if path is not None and _scheme(url) == "sqlite" else None


def _workers_journal(url: str, study_name: str) -> Path | None:
    """Where a study of a SQLite storage lives once it has been swept by several workers."""
    folder = _workers_folder(url)
    return folder / f"{urllib.parse.quote(study_name, safe='')}.journal" if folder is not None else None


def home(url: str, study_name: str) -> str:
    """The URL that holds the study: ``url`` itself, or the journal it moved to (see the module notes)."""
    journal = _workers_journal(url, study_name)
    return f"journal:{journal}" if journal is not None and journal.is_file() else url


def needs_journal(url: str, workers: int) -> bool:
    """Whether K workers on this URL should share a journal file instead (SQLite serves one process)."""
    return workers > 1 and _scheme(url) == "sqlite"


def move_to_journal(url: str, study_name: str) -> str:
    """Move a study of a SQLite storage into its workers' journal file (once); return the journal URL.

    The copy is written under a temporary name and renamed into place, then the SQLite copy is
    deleted: an interruption at any point leaves one complete copy that ``home`` finds.
    Call it holding ``study_lock(url, study_name)``.
    """
    import optuna

    current = home(url, study_name)
    if current != url:
        _drop_stale_copy(url, study_name)
        return current
    journal = _workers_journal(url, study_name)
    journal.parent.mkdir(parents=True, exist_ok=True)
    sqlite = open_storage(url) if _file(url).is_file() else None
    if sqlite is not None and study_name in optuna.get_all_study_names(sqlite):
        partial = journal.with_name(f".{journal.name}.{uuid.uuid4().hex[:8]}")
        try:
            optuna.copy_study(from_study_name=study_name, from_storage=sqlite, to_storage=_journal(partial),
                              to_study_name=study_name)
            partial.replace(journal)
        finally:
            partial.unlink(missing_ok=True)
        _drop_stale_copy(url, study_name)
    else:
        journal.touch()
    return f"journal:{journal}"


def _drop_stale_copy(url: str, study_name: str) -> None:
    """Delete the SQLite copy of a moved study (left there if the move was cut after the journal was complete)."""
    import optuna

    if not _file(url).is_file():
        return
    sqlite = open_storage(url)
    if study_name in optuna.get_all_study_names(sqlite):
        optuna.delete_study(study_name=study_name, storage=sqlite)


def study_names(url: str) -> list[str]:
    """Every study of a storage, those moved to the workers' journals of a SQLite file included.

    Raises:
        StudyError: there is no such storage.
    """
    import optuna

    folder = _workers_folder(url)
    moved = {urllib.parse.unquote(journal.stem) for journal in folder.glob("*.journal")} if folder else set()
    if moved and not _file(url).is_file():  # every study of this storage was swept by several workers from the start
        return sorted(moved)
    return sorted(set(optuna.get_all_study_names(open_existing(url))) | moved)


def study_attr(url: str, study_name: str, key: str) -> Any:
    """A user attr of an existing study; None where the storage holds no such study. Creates nothing.

    Raises:
        StudyError: the storage is damaged or cannot be opened.
    """
    import optuna
    import sqlalchemy

    where = home(url, study_name)
    path = _file(where)
    if path is not None and not path.is_file():
        return None
    if path is None:
        engine = sqlalchemy.create_engine(where, connect_args={"connect_timeout": CONNECT_TIMEOUT},
                                          poolclass=sqlalchemy.pool.NullPool)
        try:
            if not sqlalchemy.inspect(engine).has_table("studies"):  # Optuna would create its tables
                return None
        finally:
            engine.dispose()
    try:
        return optuna.load_study(study_name=study_name, storage=open_existing(where)).user_attrs.get(key)
    except KeyError:
        return None


def load_study(name: str, url: str) -> Any:
    """An existing study, wherever it lives (``home``).

    Raises:
        KeyError: no study of that name.
    """
    import optuna

    return optuna.load_study(study_name=name, storage=open_existing(home(url, name)))


def _lock_file(path: Path) -> Path:
    # Not PATH.lock: Optuna's journal file takes that name for a lock of its own.
    return path.with_name(f"{path.name}.tinyopt-lock")


@contextlib.contextmanager
def study_lock(url: str, study_name: str) -> Iterator[None]:
    """Hold a lock that every tinyopt process sharing this study takes before creating or changing its set-up.

    A file lock beside a SQLite or journal file (processes on this machine), an advisory lock in a
    PostgreSQL or MySQL database (processes on every machine).
    """
    path = _file(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(_lock_file(path)):
            yield
        return
    import sqlalchemy

    digest = hashlib.sha256(f"tinyopt:{study_name}".encode()).digest()
    if _scheme(url) == "postgresql":  # advisory locks take a 64-bit key; MySQL's named locks, a short name
        take, give, key = "SELECT pg_advisory_lock(:k)", "SELECT pg_advisory_unlock(:k)", int.from_bytes(
            digest[:8], "big", signed=True)
    else:
        take, give, key = "SELECT GET_LOCK(:k, -1)", "SELECT RELEASE_LOCK(:k)", digest.hex()[:60]
    engine = sqlalchemy.create_engine(url, connect_args={"connect_timeout": CONNECT_TIMEOUT},
                                      poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text(take), {"k": key})
            try:
                yield
            finally:
                connection.execute(sqlalchemy.text(give), {"k": key})
    finally:
        engine.dispose()


@contextlib.contextmanager
def optuna_experimental() -> Iterator[None]:
    """Silence Optuna's ExperimentalWarning: heartbeats and retries are how it recovers a dead worker's trial."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield

