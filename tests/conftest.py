"""Shared fixtures: the real sample cases (never copied into the repository) and small crops of them.

The samples are read from $UNET_SAMPLES, by default ../shared/data/real beside the repository.
Tests that need them are skipped when the folder is absent.
"""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


# Params for end-to-end runs of the whole pipeline that finish in about a minute on 2 cores.
TINY_PIPELINE_PARAMS = {
    "data": {"test_cases": ["BraTS2021_00006"]},
    "preprocess": {"num_workers": 1},
    "model": {"base_channels": 4},
    "train": {"epochs": 2, "steps_per_epoch": 3, "batch_size": 4, "patch_size": 32, "log_every": 1},
    "evaluate": {"batch_size": 8},
}


def samples_dir() -> Path:
    return Path(os.environ.get("UNET_SAMPLES", REPO.parent / "shared" / "data" / "real"))


@pytest.fixture(scope="session")
def samples() -> Path:
    folder = samples_dir()
    if not (folder / "brain-tumor-segmentation-gp" / "BraTS2021_00006").is_dir():
        pytest.skip(f"real sample cases not found in {folder}; set UNET_SAMPLES")
    return folder


# Real four-modality cases with BraTS 2017-2022 labels: (folder, t1, t1c, t2, flair, label) relative to the samples.
REAL_CASES = {
    "BraTS2021_00006": ("brain-tumor-segmentation-gp/BraTS2021_00006", "BraTS2021_00006_t1.nii.gz",
                        "BraTS2021_00006_t1ce.nii.gz", "BraTS2021_00006_t2.nii.gz", "BraTS2021_00006_flair.nii.gz",
                        "BraTS2021_00006_seg.nii.gz"),
    "TCGA-DU-7294": ("brainlesion-tutorials/TCGA-DU-7294", "raw_bet/TCGA-DU-7294_t1_bet.nii.gz",
                     "raw_bet/TCGA-DU-7294_t1c_bet.nii.gz", "raw_bet/TCGA-DU-7294_t2_bet.nii.gz",
                     "raw_bet/TCGA-DU-7294_fla_bet.nii.gz", "fusion/mav.nii.gz"),
    "OtherEXampleFromTCIA": ("brainlesion-tutorials/OtherEXampleFromTCIA", "raw_bet/OtherEXampleFromTCIA_t1_bet.nii.gz",
                             "raw_bet/OtherEXampleFromTCIA_t1c_bet.nii.gz", "raw_bet/OtherEXampleFromTCIA_t2_bet.nii.gz",
                             "raw_bet/OtherEXampleFromTCIA_fla_bet.nii.gz", "fusion/mav.nii.gz"),
}


def write_cropped_brats_case(samples: Path, case_id: str, dest: Path, size: tuple[int, int, int] = (64, 64, 24)) -> Path:
    """Write a crop of a real case, centred on its tumour, in BraTS 2021 naming under dest/<case_id>/.

    The crop goes through nibabel's slicer, so each file keeps a correct affine.
    """
    folder, *files = REAL_CASES[case_id]
    label_image = nib.load(str(samples / folder / files[4]))
    label = np.asarray(label_image.dataobj)
    centre = np.argwhere(label > 0).mean(axis=0).astype(int)
    window = tuple(
        slice(max(0, min(c - s // 2, label.shape[axis] - s)), max(0, min(c - s // 2, label.shape[axis] - s)) + s)
        for axis, (c, s) in enumerate(zip(centre, size))
    )
    out = dest / case_id
    out.mkdir(parents=True, exist_ok=True)
    for suffix, name in zip(("t1", "t1ce", "t2", "flair", "seg"), files):
        image = nib.load(str(samples / folder / name))
        cropped = image.slicer[window]
        nib.save(cropped, str(out / f"{case_id}_{suffix}.nii.gz"))
    return out


@pytest.fixture(scope="session")
def cropped_source(samples: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three real cases cropped around their tumours, in BraTS 2021 naming (recognised without a spec)."""
    dest = tmp_path_factory.mktemp("cropped-source")
    for case_id in REAL_CASES:
        write_cropped_brats_case(samples, case_id, dest)
    return dest


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_answers(port: int, server: subprocess.Popen, log_path: Path, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"moto_server exited with code {server.returncode}: {log_path.read_text()[-2000:]}")
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            connection.request("GET", "/")
            connection.getresponse().read()
            connection.close()
            return
        except OSError:
            time.sleep(0.1)
    pytest.fail(f"moto_server did not answer on 127.0.0.1:{port} within {timeout_s} s")


@pytest.fixture(scope="module")
def moto_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of moto's S3 server, started on 127.0.0.1 for this test module and stopped after it."""
    executable = Path(sys.executable).with_name("moto_server")
    command = [str(executable)] if executable.is_file() else [sys.executable, "-m", "moto.server"]
    port = free_port()
    log_path = tmp_path_factory.mktemp("moto") / "moto_server.log"
    with open(log_path, "wb") as log_file:
        server = subprocess.Popen([*command, "-H", "127.0.0.1", "-p", str(port)], stdout=log_file, stderr=subprocess.STDOUT)
    try:
        wait_until_answers(port, server, log_path)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process(server, timeout_s=10)


def stop_process(process: subprocess.Popen, timeout_s: float) -> None:
    """Terminate `process`, and kill it if it has not exited after `timeout_s` seconds."""
    process.terminate()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def copy_project(dest: Path, params: dict | None = None) -> None:
    """Copy this project's files (tracked or new, not ignored) into `dest`, without data.dvc, dvc.lock, tests and docs.

    `params` maps params.yaml blocks to keys that override the copied values.
    """
    import shutil

    import yaml

    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.splitlines()
    for name in listed:
        source = REPO / name
        if not source.is_file() or name in ("data.dvc", "dvc.lock") or name.startswith(("tests/", "docs/", "benchmarks/")):
            continue
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
    if params:
        merged = yaml.safe_load((dest / "params.yaml").read_text())
        for block, values in params.items():
            merged[block].update(values)
        (dest / "params.yaml").write_text(yaml.safe_dump(merged, sort_keys=False))


def make_training_workdir(root: Path, cropped_source: Path, tiny: dict) -> Path:
    """Ingest and preprocess the cropped cases under `root` and write root/params.yaml from the `tiny` blocks."""
    import yaml

    from unet.config import params_from_dict
    from unet.ingest import ingest
    from unet.preprocess import run as preprocess

    ingest(cropped_source, root / "data", use_dvc=False)
    raw = {block: dict(values) for block, values in tiny.items()}
    raw["data"]["dir"] = str(root / "data")
    raw["preprocess"]["out_dir"] = str(root / "preprocessed")
    preprocess(params_from_dict(raw))
    raw["tracking"] = {"tracking_uri": f"sqlite:///{root / 'mlflow.db'}", "artifact_location": str(root / "mlartifacts")}
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    return root


@pytest.fixture(scope="module")
def aws_settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Dummy credentials, and no AWS config file, profile, endpoint or HTTP proxy from the machine running the tests."""
    settings = tmp_path_factory.mktemp("aws")
    with pytest.MonkeyPatch.context() as patch:
        for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_MAX_ATTEMPTS",
                     "AWS_RETRY_MODE", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
            patch.delenv(name, raising=False)
        patch.setenv("AWS_ACCESS_KEY_ID", "testing")
        patch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        patch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        patch.setenv("AWS_CONFIG_FILE", str(settings / "config"))
        patch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(settings / "credentials"))
        patch.setenv("AWS_EC2_METADATA_DISABLED", "true")
        patch.setenv("NO_PROXY", "127.0.0.1,localhost")
        yield
