"""Web servers to review sweeps in a browser: the MLflow UI and optuna-dashboard, for ``tinyopt ui``.

Each server is a child process in a process group of its own: Ctrl-C in the terminal reaches
tinyopt alone, which then stops every process of each group (MLflow's server runs uvicorn
workers), so that none is left holding its port. A server is ready once it answers over HTTP;
its own output (a line per request) goes to a temporary file, whose last line explains a server
that stops.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

from tinyopt.core import signals
from tinyopt.core.errors import TinyoptError
from tinyopt.stores.storage import open_existing

READY_TIMEOUT = 120  # seconds: MLflow's server takes about 5 s to start, more on a busy machine
STOP_TIMEOUT = 15  # seconds a server gets to stop after SIGTERM, before SIGKILL
# optuna-dashboard gets the storage URL in its environment: a command line is public (ps), a password in it too.
_STORAGE_VARIABLE = "TINYOPT_DASHBOARD_STORAGE"
# Ends `tinyopt ui`: Ctrl-C, SIGTERM, and a closed terminal (the servers, outside its process group, would outlive it).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@dataclass
class Server:
    """A web server running as the leader of its own process group."""

    name: str
    process: subprocess.Popen
    output: IO[bytes]

    def why_stopped(self) -> str | None:
        """None while it runs; else its exit code and the last line it wrote."""
        code = self.process.poll()
        if code is None:
            return None
        self.output.seek(0)
        lines = [line.strip() for line in self.output.read().decode(errors="replace").splitlines() if line.strip()]
        how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        return how + (f": {lines[-1]}" if lines else "")


def check_free(host: str, port: int, option: str) -> None:
    """Make sure nothing listens on ``host:port`` (a server there would answer in place of ours).

    Raises:
        TinyoptError: the port is taken.
    """
    with socket.socket() as probe:
        # As the servers bind: a port whose last connections are closing (TIME_WAIT) is free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as err:
            raise TinyoptError(f"cannot listen on {host}:{port} ({err.strerror}); "
                               f"stop what runs there or pass another {option}") from err


class Servers:
    """The servers started so far; ``running()`` stops them."""

    def __init__(self) -> None:
        self.started: list[Server] = []

    def mlflow(self, tracking_uri: str, host: str, port: int) -> str:
        """Start the MLflow UI (``mlflow server``; ``mlflow ui`` is its alias) and return its URL once it answers."""
        # One worker (its threads serve the page's parallel requests) for one person: MLflow's
        # default of four takes twice as long to start and 1 GB more memory.
        return self._start("the MLflow UI", [sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                                             tracking_uri, "--host", host, "--port", str(port), "--workers", "1"],
                           host, port, "/health")

    def dashboard(self, storage: str, host: str, port: int) -> str:
        """Start optuna-dashboard on an Optuna storage and return its URL once it answers."""
        return self._start("optuna-dashboard", [sys.executable, "-m", __name__, host, str(port)], host, port,
                           "/api/meta", env={**os.environ, _STORAGE_VARIABLE: storage})

    def wait(self) -> None:
        """Block until a server stops by itself.

        Raises:
            TinyoptError: which server stopped, and why.
        """
        while True:
            for server in self.started:
                why = server.why_stopped()
                if why is not None:
                    raise TinyoptError(f"{server.name} stopped ({why})")
            time.sleep(0.5)

    def _start(self, name: str, command: list[str], host: str, port: int, probe: str,
               env: dict[str, str] | None = None) -> str:
        output = tempfile.TemporaryFile(prefix="tinyopt-ui-")
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                                   env=env, process_group=0)
        server = Server(name, process, output)
        self.started.append(server)
        url = f"http://{host}:{port}"
        deadline = time.monotonic() + READY_TIMEOUT
        while not _answers(url + probe):
            why = server.why_stopped()
            if why is not None:
                raise TinyoptError(f"{name} stopped as it started ({why})")
            if time.monotonic() > deadline:
                raise TinyoptError(f"{name} did not answer on {url} within {READY_TIMEOUT} s")
            time.sleep(0.25)
        return url

    def _stop(self) -> None:
        """Stop every process of every server: SIGTERM, then SIGKILL after ``STOP_TIMEOUT`` seconds."""
        for server in self.started:
            _signal_group(server.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for server in self.started:
            if not _wait_group(server.process, deadline):
                _signal_group(server.process.pid, signal.SIGKILL)
                _wait_group(server.process, time.monotonic() + STOP_TIMEOUT)
            server.output.close()
        self.started.clear()


@contextlib.contextmanager
def running() -> Iterator[Servers]:
    """Servers to start in the body, all stopped when it ends, however it ends.

    In the body, SIGINT, SIGTERM and SIGHUP raise ``KeyboardInterrupt``; while the servers stop,
    they are ignored (a second Ctrl-C would leave servers running).
    """
    servers = Servers()
    with _signals(_interrupt):
        try:
            yield servers
        finally:
            with _signals(signal.SIG_IGN):
                servers._stop()


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except OSError:  # refused, not listening yet, or an HTTP error while it starts
        return False


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signum)


def _wait_group(process: subprocess.Popen, deadline: float) -> bool:
    """Wait until every process of the group led by ``process`` has ended; False at the deadline."""
    while time.monotonic() < deadline:
        process.poll()  # reaps the leader: a zombie would still count as a member
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def _interrupt(signum: int, _frame) -> None:
    raise signals.Interrupted(signum)


@contextlib.contextmanager
def _signals(handler) -> Iterator[None]:
    """Handle ``STOP_SIGNALS`` with ``handler`` in the body (only the main thread has signal handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, handler) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler_before in previous.items():
            signal.signal(signum, handler_before)


def _serve_dashboard(host: str, port: int) -> None:
    """optuna-dashboard on the storage in ``$TINYOPT_DASHBOARD_STORAGE`` (the process ``Servers.dashboard`` starts)."""
    import optuna_dashboard


    # tinyopt's opener: it reads journal:PATH URLs and waits on a SQLite file a sweep is writing.
    optuna_dashboard.run_server(open_existing(os.environ[_STORAGE_VARIABLE]), host=host, port=port)


if __name__ == "__main__":
    _serve_dashboard(sys.argv[1], int(sys.argv[2]))
