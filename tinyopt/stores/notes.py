"""The notes optuna-dashboard shows beside a study and a trial, written into the Optuna storage.

optuna-dashboard renders a note as markdown, so its links can be followed, where it shows a trial's
user attrs (``mlflow_run_url`` among them) as plain text. A study's note is the sweep's summary (the
MLflow parent run's description), a trial's note links its MLflow run. Links here are absolute: the
dashboard is not the MLflow UI.
"""

from __future__ import annotations

import re
import warnings
from typing import Any

_RELATIVE_LINK = re.compile(r"\]\((#/[^)]*)\)")


def absolute_links(markdown: str, ui_base: str) -> str:
    """``markdown`` with its MLflow UI links relative to the UI (``](#/...)``) made absolute at ``ui_base``."""
    return _RELATIVE_LINK.sub(lambda m: f"]({ui_base.rstrip('/')}/{m[1]})", markdown)


def save(study_or_trial: Any, markdown: str) -> None:
    """Save ``markdown`` as the note of an Optuna study or of a running trial (``optuna.Trial``)."""
    # Loaded here: the dashboard package is needed only once a trial or a summary is written.
    from optuna_dashboard import save_note

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # system attrs are "experimental" to some Optuna versions
        save_note(study_or_trial, markdown)
