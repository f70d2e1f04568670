"""SIGINT and SIGTERM: how a tinyopt command stops when it is asked to.

Ctrl-C sends SIGINT; ``timeout``, SLURM, Kubernetes and systemd send SIGTERM. Both raise
``Interrupted`` (a ``KeyboardInterrupt``, so Optuna records the running trial as failed and every
``finally`` runs), and the command exits with 128 + the signal number (130, 143).

Inside a sweep the signal is deferred while the process is writing to the study or to MLflow
(between trials, or closing one): raising there could leave a trial RUNNING forever. It is raised
at once only inside ``interruptible()``, the part of a trial that trains and scores; elsewhere it
is remembered (``pending()``) and the sweep stops before the next trial. A second signal while one
is pending is raised at once: the user insists.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

HANDLED = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """The process received SIGINT or SIGTERM."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def name(self) -> str:
        """``SIGINT`` or ``SIGTERM``."""
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        """The shell's code for a process ended by this signal: 130 for SIGINT, 143 for SIGTERM."""
        return 128 + self.signum


class _State:
    """Set and read in the main thread only: that is where Python runs signal handlers."""

    deferring = False
    immediate = False
    pending: Interrupted | None = None


_state = _State()


def _handler(signum: int, _frame) -> None:
    received = Interrupted(signum)
    if not _state.deferring or _state.immediate or _state.pending is not None:
        raise received
    _state.pending = received


def install() -> None:
    """Make SIGINT and SIGTERM raise ``Interrupted`` in this process (main thread only)."""
    for signum in HANDLED:
        signal.signal(signum, _handler)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Defer signals for the body (a sweep), except inside ``interruptible()``; restore the old handlers after."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers belong to the main thread; a sweep in another thread keeps the defaults
        return
    previous = {signum: signal.getsignal(signum) for signum in HANDLED}
    install()
    _state.deferring, _state.pending = True, None
    try:
        yield
    finally:
        _state.deferring = False
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """A signal received before or during the body is raised in it at once (training, scoring)."""
    raise_pending()
    _state.immediate = True
    try:
        yield
    finally:
        _state.immediate = False


def pending() -> Interrupted | None:
    """The signal received while deferred and not raised yet, if any."""
    return _state.pending


def raise_pending() -> None:
    """Raise the deferred signal now, if there is one."""
    if _state.pending is not None:
        raise _state.pending


def requeues(setting: str | None, stop: BaseException) -> bool:
    """Whether ``study.requeue`` (sigterm | sigterm+sigint | never) queues again a trial ``stop`` interrupted.

    SIGTERM is how a cluster preempts, requeues, evicts or ends a job at its time limit: no fault of the
    trial, which resumes from its checkpoint. SIGINT is a person's Ctrl-C: the trial stops for good,
    unless the setting says otherwise. ``None`` (a study stored before the setting) queues nothing.
    """
    name = getattr(stop, "name", None) if isinstance(stop, Interrupted) else None
    return name == "SIGTERM" and setting in ("sigterm", "sigterm+sigint") or \
        name == "SIGINT" and setting == "sigterm+sigint"
