"""End to end: ingest crops of real cases, `dvc repro` all stages, check the registry and predict.

Runs in a temporary git repository holding a copy of this project, with real DVC, MLflow on
SQLite and torchrun with two gloo processes; takes about a minute.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from conftest import TINY_PIPELINE_PARAMS, copy_project

REPO = Path(__file__).resolve().parents[1]


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, env=_environment(), capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def _git(cwd: Path, *args: str) -> str:
    return _run(["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid", *args], cwd).stdout.strip()


@pytest.fixture(scope="module")
def pipeline(cropped_source, tmp_path_factory):
    repo = tmp_path_factory.mktemp("project")
    copy_project(repo, TINY_PIPELINE_PARAMS)
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "project")

    ingest = _run(["unet", "ingest", str(cropped_source), "data"], repo)
    _git(repo, "add", "data.dvc", ".gitignore")
    _git(repo, "commit", "-qm", "data")
    first = _run(["dvc", "repro"], repo)
    second = _run(["dvc", "repro"], repo)
    return {"repo": repo, "ingest": ingest, "first": first, "second": second, "commit": _git(repo, "rev-parse", "HEAD")}


def test_pipeline_writes_region_metrics(pipeline):
    metrics = json.loads((pipeline["repo"] / "metrics.json").read_text())
    assert metrics["split"]["test"] == ["BraTS2021_00006"]
    for region in ("WT", "TC", "ET"):
        assert 0.0 <= metrics[region]["dice_mean"] <= 1.0
        assert 0.0 <= metrics[region]["hd95_mean"] <= 373.13
    assert metrics["num_cases"] == 1


def test_pipeline_second_repro_is_noop(pipeline):
    output = pipeline["second"].stdout + pipeline["second"].stderr
    assert "Running stage" not in output
    assert "up to date" in output


def test_pipeline_trained_with_two_processes(pipeline):
    output = pipeline["first"].stdout + pipeline["first"].stderr
    assert "2 process(es) on cpu" in output
    history = (pipeline["repo"] / "reports" / "train_history.csv").read_text().splitlines()
    assert history[0].startswith("epoch,train_loss,lr")
    assert len(history) == 3  # header + 2 epochs


def test_pipeline_registers_staging_with_lineage(pipeline):
    import mlflow
    from mlflow import MlflowClient

    repo = pipeline["repo"]
    registration = json.loads((repo / "registration.json").read_text())
    assert registration["promoted"] is True
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    client = MlflowClient()
    version = client.get_model_version_by_alias("brain-tumor-unet", "staging")
    data_md5 = yaml.safe_load((repo / "data.dvc").read_text())["outs"][0]["md5"]
    assert version.tags["git.commit"] == pipeline["commit"]
    assert version.tags["git.dirty"] == "false"
    assert version.tags["data.dvc_md5"] == data_md5
    assert version.tags["preprocessed.dvc_md5"].endswith(".dir")
    assert version.tags["split.test"] == "BraTS2021_00006"
    runs = client.search_runs([client.get_experiment_by_name("brain-tumor-unet").experiment_id])
    assert len(runs) == 1  # rank 0 alone talks to MLflow
    assert runs[0].data.tags["world_size"] == "2"
    assert "test_mean_dice" in runs[0].data.metrics


def test_pipeline_checkpoint_loads_into_plain_model(pipeline):
    import torch

    from unet.inference import load_checkpoint

    path = pipeline["repo"] / "model" / "checkpoint.pt"
    state = torch.load(path, map_location="cpu", weights_only=False)
    assert not any(key.startswith(("module.", "_orig_mod.")) for key in state["model"])
    model, metadata = load_checkpoint(path)
    assert metadata["modalities"] == ["t1", "t1c", "t2", "flair"]
    assert metadata["target"] == "regions"
    with torch.no_grad():
        assert model(torch.zeros(3, 4, 35, 21)).shape == (3, 3, 35, 21)


@pytest.mark.parametrize("shape", [(1, 4, 32, 32), (3, 4, 37, 51)])
def test_registered_model_serves_any_size(pipeline, shape):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{pipeline['repo'] / 'mlflow.db'}")
    model = mlflow.pyfunc.load_model("models:/brain-tumor-unet@staging")
    logits = model.predict(np.random.default_rng(0).normal(size=shape).astype(np.float32))
    assert logits.shape == (shape[0], 3, *shape[2:])


def test_registered_model_requirements_have_no_local_label(pipeline):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{pipeline['repo'] / 'mlflow.db'}")
    local = Path(mlflow.artifacts.download_artifacts("models:/brain-tumor-unet@staging"))
    requirements = (local / "requirements.txt").read_text().splitlines()
    torch_lines = [line for line in requirements if line.startswith("torch")]
    assert torch_lines == [torch_lines[0]]
    assert "+" not in torch_lines[0]


def test_predict_from_registry_keeps_geometry(pipeline, cropped_source, tmp_path):
    repo = pipeline["repo"]
    out = tmp_path / "masks"
    _run(["unet", "predict", "-i", str(cropped_source), "-o", str(out), "--model", "models:/brain-tumor-unet@staging"], repo)
    for case_dir in sorted(cropped_source.iterdir()):
        mask = nib.load(str(out / f"{case_dir.name}.nii.gz"))
        reference = nib.load(str(case_dir / f"{case_dir.name}_t1.nii.gz"))
        assert mask.shape == reference.shape
        assert np.array_equal(mask.affine, reference.affine)
        assert mask.get_data_dtype() == np.uint8
        # BraTS 2021 file names mean the BraTS 2017-2022 convention: ET is written as 4.
        assert set(np.unique(np.asarray(mask.dataobj)).tolist()) <= {0, 1, 2, 4}


def test_predict_from_other_folder_uses_project_registry(pipeline, cropped_source, tmp_path):
    # A relative sqlite:/// path in params.yaml is the project's registry, wherever the command runs.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    _run(["unet", "predict", "-i", str(cropped_source), "-o", str(tmp_path / "masks"), "--model",
          "models:/brain-tumor-unet@staging", "--params", str(pipeline["repo"] / "params.yaml")], elsewhere)
    assert (tmp_path / "masks" / "BraTS2021_00006.nii.gz").is_file()
    assert not (elsewhere / "mlflow.db").exists()


def test_predict_canonical_on_request(pipeline, cropped_source, tmp_path):
    out = tmp_path / "masks"
    _run(["unet", "predict", "-i", str(cropped_source), "-o", str(out), "--model", "model/checkpoint.pt",
          "--label-convention", "canonical"], pipeline["repo"])
    mask = nib.load(str(out / "BraTS2021_00006.nii.gz"))
    assert set(np.unique(np.asarray(mask.dataobj)).tolist()) <= {0, 1, 2, 3}


def test_register_refuses_dirty_tree(pipeline):
    repo = pipeline["repo"]
    params = repo / "params.yaml"
    original = params.read_text()
    try:
        params.write_text(original.replace("min_improvement: 0.0", "min_improvement: 0.01"))
        result = subprocess.run(["unet", "register"], cwd=repo, env=_environment(), capture_output=True, text=True)
    finally:
        params.write_text(original)
    assert result.returncode == 1
    assert "uncommitted changes in params.yaml" in result.stderr
    assert "--allow-dirty" in result.stderr


def test_reproduce_registered_version(pipeline):
    result = subprocess.run(["unet", "reproduce", "models:/brain-tumor-unet/1"], cwd=pipeline["repo"], env=_environment(),
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "models:/brain-tumor-unet/1 at commit" in result.stdout
    assert ": reproduced" in result.stdout


def test_reproduce_unknown_commit_names_it(pipeline):
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(f"sqlite:///{pipeline['repo'] / 'mlflow.db'}")
    client = MlflowClient()
    source = client.get_model_version("brain-tumor-unet", "1").source
    version = client.create_model_version("brain-tumor-unet", source=source,
                                          tags={"git.commit": "0" * 40, "metric.mean_dice": "0.5"})
    result = subprocess.run(["unet", "reproduce", f"models:/brain-tumor-unet/{version.version}"], cwd=pipeline["repo"],
                            env=_environment(), capture_output=True, text=True)
    assert result.returncode == 1
    assert f"commit {'0' * 40}" in result.stderr
    assert "git fetch" in result.stderr
