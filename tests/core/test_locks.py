"""Exclusive file locks between processes: held for the body only, and never left held by a killed process."""

from __future__ import annotations

import subprocess
import sys

from tinyopt.core.locks import file_lock

# Tries the lock without waiting, from another process: prints "free" or "held".
_TRY = """
import fcntl, sys
with open(sys.argv[1], "a") as handle:
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print("held")
    else:
        print("free")
"""
# Holds the lock, says so, and waits to be killed.
_HOLD = """
import sys, time
from tinyopt.core.locks import file_lock
with file_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(120)
"""


def _another_process_finds(path) -> str:
    return subprocess.run([sys.executable, "-c", _TRY, str(path)], capture_output=True, text=True, timeout=60,
                          check=True).stdout.strip()


def test_the_lock_excludes_another_process_for_the_body_only(tmp_path):
    path = tmp_path / "store.db.tinyopt-lock"
    with file_lock(path):
        assert path.is_file()  # created when missing
        assert _another_process_finds(path) == "held"
    assert _another_process_finds(path) == "free"
    with file_lock(path):  # and taken again
        assert _another_process_finds(path) == "held"


def test_a_killed_holder_leaves_the_lock_free(tmp_path):
    path = tmp_path / "lock"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert _another_process_finds(path) == "held"
    finally:
        holder.kill()
        holder.wait(timeout=60)
        holder.stdout.close()
    assert _another_process_finds(path) == "free"
    with file_lock(path):
        assert _another_process_finds(path) == "held"
