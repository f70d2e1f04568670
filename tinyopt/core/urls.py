"""Storage and tracking URLs as the user may see them: never with their secrets."""

from __future__ import annotations

import re
from pathlib import Path

# The embedded stores a command uses when given none: the Optuna study storage and the MLflow tracking store.
DEFAULT_STORAGE = "sqlite:///studies/tinyopt.db"
DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"
_SQLITE = "sqlite:///"

_CREDENTIALS = re.compile(r"(?P<scheme>[a-z][a-z0-9+.\-]*://)(?P<user>[^:/@\s]*):(?P<secret>[^/\s]*)@", re.I)
_QUERY_SECRET = re.compile(r"(?P<key>[?&](?:password|passwd|token|secret|api_key)=)[^&\s]*", re.I)


def redact(text: str) -> str:
    """Hide the password of ``scheme://user:password@host`` and ``?password=`` style query values."""
    text = _CREDENTIALS.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)
    return _QUERY_SECRET.sub(lambda m: f"{m['key']}***", text)


def first_line(err: BaseException) -> str:
    """The first line of an error's message, secrets hidden (its type name if it has no message)."""
    text = str(err).strip()
    return redact(text.splitlines()[0]) if text else type(err).__name__


def sqlite_path(url: str) -> Path | None:
    """The file of a ``sqlite:///FILE`` URL (relative to the working folder unless absolute), else None."""
    return Path(url.removeprefix(_SQLITE)) if url.startswith(_SQLITE) else None


# MLflow 3's UI opens an experiment or a run in its GenAI layout ("Evaluation runs") unless the link
# asks for the model-training one: every link tinyopt writes to the UI carries this.
ML_LAYOUT = "workflowType=machine_learning"


def ml_layout(url: str) -> str:
    """An MLflow UI link that opens the model-training layout (links stored before it lack the query)."""
    if not url or ML_LAYOUT in url:
        return url
    return url + ("&" if "?" in url.split("#")[-1] else "?") + ML_LAYOUT
