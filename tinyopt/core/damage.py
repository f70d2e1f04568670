"""How a damaged file that tinyopt reads back (a bundle's model, an artifact from MLflow) is reported.

Low in the flow, so that the MLflow adapter and the bundle code both use it without importing each other.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

from tinyopt.core.urls import first_line

# A run's artifact cannot be logged again: its trial is over.
MLFLOW_FIX = "restore the MLflow artifacts from a backup, or sweep the study again to retrain the trial"


def damage_message(label: str, path: Path, err: Exception, fix: str) -> str:
    """The one-line message for a zip-based file (``.keras``, ``.npz``) its loader failed on with ``err``.

    The loaders' own words mislead (Keras says "File not found" of a truncated file that exists), so
    what the file is comes first; the loader's error only when the file is a whole zip archive.
    """
    if path.is_dir():
        problem = "it is a folder, not a file"
    elif not path.exists():
        problem = "it does not exist"
    elif path.stat().st_size == 0:
        problem = "it is empty (0 bytes)"
    elif not zipfile.is_zipfile(path):
        problem = "it is not a whole zip archive (truncated or overwritten)"
    else:
        problem = f"its content cannot be read ({type(err).__name__}: {first_line(err)})"
    return f"{label} is damaged: {problem}; {fix}"
