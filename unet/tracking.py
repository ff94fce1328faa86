"""MLflow set-up shared by the train, evaluate and register stages.

The training run's id is written to `<model dir>/run.json`, so evaluate and register add
their metrics and the model to the same MLflow run that trained it.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from unet.config import TrackingConfig

log = logging.getLogger(__name__)

RUN_FILE = "run.json"


def configure_mlflow(tracking: TrackingConfig, base_dir: Path | None = None) -> str:
    """Point MLflow at the configured store, create the experiment if needed, and return its id.

    Relative paths in the settings (a sqlite:/// file, a local artifact folder) are taken
    relative to `base_dir`, the folder of the params file; None means the working directory,
    which is the project root for the dvc.yaml stages.
    """
    # Telemetry and update checks stay off in everything the project starts.
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "true")
    import mlflow

    uri = tracking.resolved_tracking_uri(base_dir)
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.get_experiment_by_name(tracking.experiment)
    if experiment is not None:
        return experiment.experiment_id
    location = tracking.artifact_location
    if "://" not in location:
        location = (Path(base_dir or ".") / location).resolve().as_uri()
    log.info("creating MLflow experiment %s (tracking %s, artifacts %s)", tracking.experiment, uri, location)
    try:
        return mlflow.create_experiment(tracking.experiment, artifact_location=location)
    except mlflow.exceptions.MlflowException:
        # Another process created it in the meantime.
        return mlflow.get_experiment_by_name(tracking.experiment).experiment_id


def write_run_file(model_dir: Path, run_id: str, experiment_id: str) -> None:
    (model_dir / RUN_FILE).write_text(json.dumps({"run_id": run_id, "experiment_id": experiment_id}, indent=2) + "\n")


def read_run_file(model_dir: Path) -> dict[str, Any]:
    path = Path(model_dir) / RUN_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; run the train stage first (`unet train`)")
    return json.loads(path.read_text())


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested params to {"block.key": value} for mlflow.log_params."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
