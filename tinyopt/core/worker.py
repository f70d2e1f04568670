"""The process that runs a trial, as its record names it (``record.WORKER``), and whether it is gone.

Every trial records its process first thing (the objective), so that recovery and the supervisor of
``--workers`` can tell a trial whose process died from one still running.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any


def identity() -> dict[str, Any]:
    """This process, as recorded on the trials it runs."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": _start_time(os.getpid())}


def _start_time(pid: int) -> int | None:
    """When the process started (clock ticks since boot, Linux), so that a reused pid is not mistaken for it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The second field, the command name, may hold spaces and parentheses: count from its end.
    return int(stat.rsplit(")", 1)[1].split()[19])


def is_dead(worker: dict[str, Any]) -> bool:
    """Whether the process that ran a trial is known to be gone (only a process of this machine can be known)."""
    if worker.get("host") != socket.gethostname():
        return False
    pid = int(worker["pid"])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, under another user
        return False
    started = _start_time(pid)
    return started is not None and worker.get("started") is not None and started != worker["started"]
