"""One readable line and the documented exit code for inputs users get wrong."""

import subprocess
import sys

import pytest


def _unet(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "unet.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_predict_missing_input_folder(tmp_path):
    result = _unet("predict", "-i", str(tmp_path / "absent"), "-o", str(tmp_path / "out"), "--model", "x.pt")
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: input folder {tmp_path / 'absent'} not found; pass the folder that contains the cases"


@pytest.fixture()
def one_case(cropped_source):
    return cropped_source


def test_predict_model_not_a_checkpoint(one_case, tmp_path):
    bogus = tmp_path / "notes.txt"
    bogus.write_text("# not a checkpoint\n")
    result = _unet("predict", "-i", str(one_case), "-o", str(tmp_path / "out"), "--model", str(bogus))
    assert result.returncode == 1
    assert f"{bogus} is not a checkpoint written by `unet train`" in result.stderr
    assert "Traceback" not in result.stderr


def test_predict_model_uri_without_version(one_case, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("tracking: {tracking_uri: 'sqlite:///mlflow.db', artifact_location: mlartifacts}\n")
    result = _unet("predict", "-i", str(one_case), "-o", str(tmp_path / "out"), "--model", "models:/brain-tumor-unet",
                   "--params", str(params))
    assert result.returncode == 1
    assert "names no version or alias; use models:/brain-tumor-unet@staging" in result.stderr


def test_predict_output_is_a_file(one_case, tmp_path):
    target = tmp_path / "file"
    target.write_text("")
    result = _unet("predict", "-i", str(one_case), "-o", str(target), "--model", "x.pt")
    assert result.returncode == 1
    assert f"output {target} is a file; pass a folder for the masks" in result.stderr


def test_promote_without_version_is_usage_error(tmp_path):
    result = _unet("promote", "brain-tumor-unet", cwd=tmp_path)
    assert result.returncode == 2
    assert "pass --version N to promote, or --rollback" in result.stderr


def test_ingest_runs_dvc_without_venv_on_path(cropped_source, tmp_path):
    # `.venv/bin/unet` is often run without the virtual environment on PATH; dvc must still be found.
    project = tmp_path / "project"
    project.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=project, check=True)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "DVC_NO_ANALYTICS": "1"}
    result = subprocess.run([sys.executable, "-m", "unet.cli", "ingest", str(cropped_source), "data"], cwd=project,
                            env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (project / "data.dvc").is_file()
