"""Shared by the fault-injection tests: run the real CLI, hash what the user had, check the one line."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path


def snapshot(*folders: Path) -> dict[str, str]:
    """Every file under the folders with the hash of its bytes (folders that do not exist are absent)."""
    found = {}
    for folder in folders:
        for path in sorted(Path(folder).rglob("*")) if Path(folder).exists() else ():
            found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return found


def tinyopt(*args, cwd: Path, timeout: float = 300, env: dict[str, str] | None = None, prefix: list[str] = (),
            **popen) -> subprocess.CompletedProcess:
    """``python -m tinyopt ARGS`` in a real process, its output as a wide terminal would show it.

    ``prefix`` runs it under another command (e.g. ``setpriv`` to drop root's override of file modes).
    """
    return subprocess.run([*prefix, sys.executable, "-m", "tinyopt", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "COLUMNS": "400", **(env or {})}, **popen)


def one_error_line(done: subprocess.CompletedProcess, *fragments: str) -> str:
    """The one line a failed command printed; asserts a non-zero exit, no traceback, and each fragment in it."""
    output = done.stdout + done.stderr
    lines = [line for line in output.splitlines() if line.strip()]
    assert done.returncode != 0, output
    assert "Traceback" not in output, output
    assert len(lines) == 1, output
    for fragment in fragments:
        assert fragment in lines[0], output
    return lines[0]
