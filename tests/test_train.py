"""Training entry point: one process without torchrun, the non-finite-loss stop, determinism, launch lines."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import make_training_workdir
from unet.cli import torchrun_command

TINY = {
    "data": {"test_cases": ["BraTS2021_00006"]},
    "preprocess": {"num_workers": 1},
    "model": {"base_channels": 4},
    "train": {"epochs": 1, "steps_per_epoch": 2, "batch_size": 2, "patch_size": 32, "log_every": 1,
              "nproc_per_node": 1},
}


@pytest.fixture(scope="module")
def workdir(cropped_source, tmp_path_factory) -> Path:
    """A folder with ingested and preprocessed crops of real cases, and a tiny params.yaml."""
    return make_training_workdir(tmp_path_factory.mktemp("train"), cropped_source, TINY)


def _train(workdir: Path, out_dir: str, preprocessed: Path | None = None, **train_overrides) -> subprocess.CompletedProcess:
    raw = yaml.safe_load((workdir / "params.yaml").read_text())
    if preprocessed is not None:
        raw["preprocess"]["out_dir"] = str(preprocessed)
    raw["train"].update({"out_dir": str(workdir / out_dir), **train_overrides})
    raw["evaluate"] = {"report_dir": str(workdir / out_dir / "reports")}
    params_path = workdir / f"{out_dir}.yaml"
    params_path.write_text(yaml.safe_dump(raw))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MLFLOW_TRACKING_URI")}
    return subprocess.run([sys.executable, "-m", "unet.train", "--params", str(params_path)], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=300)


def test_train_single_process_without_torchrun(workdir):
    result = _train(workdir, "single")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 process(es) on cpu" in result.stdout
    assert (workdir / "single" / "checkpoint.pt").is_file()
    assert (workdir / "single" / "checkpoint_latest.pt").is_file()


def test_train_deterministic_weights_identical(workdir):
    first = _train(workdir, "run_a", deterministic=True, precision="fp32")
    second = _train(workdir, "run_b", deterministic=True, precision="fp32")
    assert first.returncode == 0, first.stdout + first.stderr
    assert second.returncode == 0, second.stdout + second.stderr
    weights_a = torch.load(workdir / "run_a" / "checkpoint.pt", weights_only=False)["model"]
    weights_b = torch.load(workdir / "run_b" / "checkpoint.pt", weights_only=False)["model"]
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[key], weights_b[key]) for key in weights_a)


def test_train_stops_on_non_finite_loss(workdir, tmp_path):
    broken = tmp_path / "preprocessed"
    shutil.copytree(workdir / "preprocessed", broken)
    for image_path in broken.glob("*/image.npy"):
        image = np.load(image_path)
        image[:] = np.nan
        np.save(image_path, image)
    result = _train(workdir, "nan_run", preprocessed=broken)
    assert result.returncode == 1
    assert "loss is nan at epoch 1, step 1" in result.stdout


def test_torchrun_command_standalone(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"train": {"nproc_per_node": 2}}))
    command = torchrun_command(str(params))
    assert "--standalone" in command
    assert "--nproc_per_node=2" in command
    assert command[-4:] == ["-m", "unet.train", "--params", str(params)]


def test_torchrun_command_multi_node(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"train": {"nnodes": 4, "nproc_per_node": 8, "rdzv_endpoint": "node0:29400",
                                                "max_restarts": 3}}))
    command = torchrun_command(str(params))
    assert "--standalone" not in command
    assert "--nnodes=4" in command
    assert "--rdzv_backend=c10d" in command
    assert "--rdzv_endpoint=node0:29400" in command
    assert "--max_restarts=3" in command


def test_train_3d_patches_and_sliding_window(workdir):
    raw = yaml.safe_load((workdir / "params.yaml").read_text())
    raw["model"] = {"base_channels": 2, "spatial_dims": 3}
    raw["train"].update({"out_dir": str(workdir / "three_d"), "patch_size": 16, "steps_per_epoch": 2, "batch_size": 2})
    raw["evaluate"] = {"report_dir": str(workdir / "three_d" / "reports"), "batch_size": 4}
    params_path = workdir / "three_d.yaml"
    params_path.write_text(yaml.safe_dump(raw))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MLFLOW_TRACKING_URI")}
    result = subprocess.run([sys.executable, "-m", "unet.train", "--params", str(params_path)], cwd=workdir, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]

    from unet.inference import load_checkpoint, segment_volume

    model, metadata = load_checkpoint(workdir / "three_d" / "checkpoint.pt")
    assert metadata["model_config"]["spatial_dims"] == 3
    image = np.load(workdir / "preprocessed" / "BraTS2021_00006" / "image.npy")
    labels = segment_volume(model, image, metadata, batch_size=4)
    assert labels.shape == image.shape[1:]
    assert set(np.unique(labels).tolist()) <= {0, 1, 2, 3}


def test_rerun_resumes_unfinished_training(workdir):
    # A first run is killed after its first checkpoint; the same command then continues it.
    raw = yaml.safe_load((workdir / "params.yaml").read_text())
    raw["train"].update({"out_dir": str(workdir / "rerun"), "epochs": 40, "steps_per_epoch": 3, "log_every": 100})
    raw["evaluate"] = {"report_dir": str(workdir / "rerun" / "reports")}
    params_path = workdir / "rerun.yaml"
    params_path.write_text(yaml.safe_dump(raw))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MLFLOW_TRACKING_URI")}
    command = [sys.executable, "-m", "unet.train", "--params", str(params_path)]
    first = subprocess.Popen(command, cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = workdir / "rerun" / "checkpoint_latest.pt"
    deadline = time.monotonic() + 120
    while not latest.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    first.kill()
    first.wait()
    stopped_at = torch.load(latest, weights_only=False)["epoch"]
    assert stopped_at < 40

    second = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    assert f"stopped after epoch {stopped_at} of 40" in second.stdout
    history = (workdir / "rerun" / "reports" / "train_history.csv").read_text().splitlines()
    assert len(history) == 41  # header + every epoch once


def test_rerun_with_other_params_starts_fresh(workdir):
    first = _train(workdir, "changed", epochs=1)
    assert first.returncode == 0, first.stdout + first.stderr
    second = _train(workdir, "changed", epochs=1, lr=0.01)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "starting fresh instead of resuming" in second.stdout
    assert "the train params differ" in second.stdout
