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
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tinyopt.core.errors import StudyError
from tinyopt.core.locks import file_lock
from tinyopt.core.urls import first_line, redact, sqlite_path
from tinyopt.stores.checks import (
    CONNECT_TIMEOUT,
    DATABASES,
    SQLITE_BUSY_TIMEOUT,
    check_file,
    probe_database,
    read_sqlite,
    scheme,
)
from tinyopt.stores.retries import optuna_experimental, retry_callback

_FIX = "check --storage (sqlite:///FILE.db, postgresql+psycopg://USER@HOST/DB or journal:PATH)"


def _file(url: str) -> Path | None:
    """The file of a SQLite or journal URL; None for a database server."""
    if url.startswith("sqlite:///"):
        return sqlite_path(url)
    if url.startswith("journal:"):
        return Path(url.removeprefix("journal:"))
    return None


def check(url: str, study_name: str | None = None) -> None:
    """Make sure a storage URL can be opened and written, without creating or changing anything.

    A SQLite or journal file that exists must be intact and writable (and so must the journal a
    study of a SQLite storage moved to, ``home``); one that does not exist yet needs a folder that
    can hold it. A database server must answer.

    Raises:
        StudyError: an unsupported URL, a path that cannot hold the file, a damaged or read-only file,
            a missing database driver or a database that does not answer within ``CONNECT_TIMEOUT`` seconds.
    """
    kind = scheme(url)
    path = _file(url)
    if path is not None:
        check_file(path, "the Optuna storage", _FIX, writable=True, read=_reader(kind))
        moved = _workers_journal(url, study_name) if study_name is not None else None
        if moved is not None and moved.exists():
            check_file(moved, "the Optuna storage", _FIX, writable=True, read=_read_journal)
        return
    if kind not in DATABASES:
        raise StudyError(f"unsupported storage URL {redact(url)!r}; {_FIX}")
    probe_database(url, "the Optuna storage", _FIX)


def _read_journal(path: Path) -> None:
    """Replay an Optuna journal file to its end, raising if a line of it is damaged."""
    _journal(path).get_all_studies()


def _reader(kind: str) -> Callable[[Path], None]:
    return _read_journal if kind == "journal" else read_sqlite


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

    kind = scheme(url)
    path = _file(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "journal":
        return _journal(path)
    kwargs: dict[str, Any] = {}
    if kind == "sqlite":
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT}}
    elif kind in DATABASES:
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


def checkpoint_dir(setting: str | None, url: str) -> Path:
    """Where trials keep their checkpoints: ``train.checkpoint_dir``, or where it is ``""``, ``checkpoints/``
    beside a SQLite or journal file storage (the folder that holds the study), else ``./checkpoints``."""
    if setting:
        return Path(setting).expanduser()
    path = _file(url)
    return (path.parent if path is not None else Path.cwd()) / "checkpoints"


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
    check_file(path, "the Optuna storage", _FIX, writable=False, read=_reader(scheme(url)))
    # A sweep may be creating this file's tables right now, under its lock (see study_lock): opening it
    # meanwhile would create them a second time. (No lock file: no tinyopt sweep ever made this file.)
    lock = _lock_file(path)
    with file_lock(lock) if lock.exists() else contextlib.nullcontext():
        return open_storage(url)


def _workers_folder(url: str) -> Path | None:
    """The folder of a SQLite storage's workers' journals, one file per study (None for other storages)."""
    path = _file(url)
    return path.parent / f"{path.name}.workers" if path is not None and scheme(url) == "sqlite" else None


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
    return workers > 1 and scheme(url) == "sqlite"


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
    if scheme(url) == "postgresql":  # advisory locks take a 64-bit key; MySQL's named locks, a short name
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
