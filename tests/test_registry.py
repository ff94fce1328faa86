"""Registry backends: S3 artifacts on moto's S3 server, and two processes registering at once on SQLite."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import boto3
import numpy as np
import pytest
import torch

from unet.model import UNet

NAME = "brain-tumor-unet"


def _write_checkpoint(path: Path) -> Path:
    model = UNet(4, 3, base_channels=2)
    torch.save({"model": model.state_dict(), "model_config": model.config, "target": "regions",
                "modalities": ["t1", "t1c", "t2", "flair"], "regions": {}, "labels": {}, "preprocessing": {},
                "threshold": 0.5}, path)
    return path


REGISTER_SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path
    import mlflow
    from unet.inference import load_checkpoint
    from unet.registry import log_model

    tracking_uri, artifact_root, checkpoint = sys.argv[1:4]
    mlflow.set_tracking_uri(tracking_uri)
    experiment = mlflow.get_experiment_by_name("registry-test")
    experiment_id = experiment.experiment_id if experiment else mlflow.create_experiment("registry-test", artifact_root)
    _, metadata = load_checkpoint(Path(checkpoint))
    with mlflow.start_run(experiment_id=experiment_id):
        info = log_model(Path(checkpoint), metadata)
    version = mlflow.register_model(info.model_uri, "brain-tumor-unet")
    print("registered", version.version)
""")


def _register(tracking_uri: str, artifact_root: str, checkpoint: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", REGISTER_SCRIPT, tracking_uri, artifact_root, str(checkpoint)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_two_processes_register_concurrently(tmp_path):
    import mlflow
    from mlflow import MlflowClient

    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    checkpoint = _write_checkpoint(tmp_path / "checkpoint.pt")
    # Create the schema and experiment first; two processes migrating one new SQLite file at once is not the case under test.
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.create_experiment("registry-test", (tmp_path / "artifacts").as_uri())
    processes = [_register(tracking_uri, (tmp_path / "artifacts").as_uri(), checkpoint) for _ in range(2)]
    outputs = [process.communicate(timeout=240) for process in processes]
    for process, (stdout, stderr) in zip(processes, outputs):
        assert process.returncode == 0, stderr[-2000:]
    versions = sorted(int(v.version) for v in MlflowClient().search_model_versions(f"name='{NAME}'"))
    assert versions == [1, 2]


def test_s3_artifact_store(tmp_path, moto_endpoint, monkeypatch):
    import mlflow

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    boto3.client("s3", endpoint_url=moto_endpoint).create_bucket(Bucket="models")

    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    checkpoint = _write_checkpoint(tmp_path / "checkpoint.pt")
    process = _register(tracking_uri, "s3://models/mlartifacts", checkpoint)
    stdout, stderr = process.communicate(timeout=240)
    assert process.returncode == 0, stderr[-2000:]

    keys = [o["Key"] for o in boto3.client("s3", endpoint_url=moto_endpoint).list_objects_v2(Bucket="models")["Contents"]]
    assert any(key.endswith("checkpoint.pt") for key in keys)
    mlflow.set_tracking_uri(tracking_uri)
    model = mlflow.pyfunc.load_model(f"models:/{NAME}/1")
    assert model.predict(np.zeros((2, 4, 20, 36), dtype=np.float32)).shape == (2, 3, 20, 36)
