"""tinyopt's saved view of each experiment's runs table in the MLflow UI, and the links that open it."""

from __future__ import annotations

import json

from tinyopt.core import record
from tinyopt.track.names import experiment_name
from tinyopt.track.store import open_client

# link's viewStateShareKey and opens its plain runs table.
RUNS_VIEW = "tinyopt"
_RUNS_VIEW_TAG = f"mlflow.sharedViewState.{RUNS_VIEW}"


def experiment_urls(tracking_uri: str, base_url: str) -> list[tuple[str, str]]:
    """Each tinyopt experiment and the URL of its runs table in the MLflow UI at ``base_url``.

    Saves tinyopt's view of the runs table in each experiment that lacks it. MLflow 3 opens an
    experiment without ``workflowType=machine_learning`` on its GenAI overview, not on its runs.
    """
    client = open_client(tracking_uri)
    experiments = client.search_experiments(filter_string=f"name LIKE '{experiment_name('')}%'",
                                            order_by=["name ASC"])
    urls = []
    for experiment in experiments:
        view = _runs_view(experiment.creation_time or 0)
        if experiment.tags.get(_RUNS_VIEW_TAG) != view:
            client.set_experiment_tag(experiment.experiment_id, _RUNS_VIEW_TAG, view)
        urls.append((experiment.name, f"{base_url}/#/experiments/{experiment.experiment_id}/runs"
                                      f"?workflowType=machine_learning&viewStateShareKey={RUNS_VIEW}"))
    return urls


def _runs_view(created_ms: int) -> str:
    """The saved view, as MLflow 3.17's UI writes one (its state holds only what differs from the defaults)."""
    metrics = (record.BEST_SO_FAR, record.final(record.OBJECTIVE_NAME))
    tags = (record.TAG_TRIAL_STATE, record.TAG_BEST)
    columns = ["attributes.`Models`", *(f"metrics.`{key}`" for key in metrics), *(f"tags.`{key}`" for key in tags)]
    state = {"orderByKey": f"metrics.`{record.BEST_SO_FAR}`", "orderByAsc": False, "selectedColumns": columns}
    return json.dumps({"name": RUNS_VIEW, "createdAt": created_ms, "updatedAt": created_ms,
                       "state": json.dumps(state)})
