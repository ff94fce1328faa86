"""Distributed training with real torchrun processes (gloo on CPU, sockets on 127.0.0.1 only).

Covers resuming after a worker is killed, a two-agent c10d rendezvous, the check for a taken
rendezvous port, concurrent standalone runs, fp16 loss scaling and torch.compile state dicts.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest
import torch
import yaml

from conftest import make_training_workdir
from unet.cli import torchrun_command, torchrun_environment

TINY = {
    "data": {"test_cases": ["BraTS2021_00006"]},
    "preprocess": {"num_workers": 1},
    "model": {"base_channels": 4},
    "train": {"epochs": 1, "steps_per_epoch": 2, "batch_size": 2, "patch_size": 32, "log_every": 1,
              "nproc_per_node": 2, "precision": "fp32"},
}


@pytest.fixture(scope="module")
def workdir(cropped_source, tmp_path_factory) -> Path:
    """A folder with ingested and preprocessed crops of real cases, and a tiny params.yaml."""
    return make_training_workdir(tmp_path_factory.mktemp("train-distributed"), cropped_source, TINY)


def _params(workdir: Path, name: str, model: dict | None = None, **train) -> Path:
    """Write workdir/<name>.yaml: the tiny params with train overrides, outputs under workdir/<name>/."""
    raw = yaml.safe_load((workdir / "params.yaml").read_text())
    raw["model"].update(model or {})
    raw["train"].update({"out_dir": str(workdir / name), **train})
    raw["evaluate"] = {"report_dir": str(workdir / name / "reports")}
    raw["tracking"]["experiment"] = name  # one experiment per test, so runs can be counted
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "MLFLOW_TRACKING_URI")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return torchrun_environment(env)


def _start(command: list[str], cwd: Path, log_path: Path) -> subprocess.Popen:
    # Output goes to a file: a full pipe would block the workers. A new session lets
    # _stop end torchrun and its workers together when a test fails.
    with log_path.open("w") as stream:
        return subprocess.Popen(command, cwd=cwd, env=_environment(), stdout=stream, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _stop(process: subprocess.Popen) -> None:
    """Kill torchrun and every worker it started; workers run in sessions of their own, out of its group."""
    if process.poll() is not None:
        return
    try:
        workers = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        workers = []
    os.killpg(process.pid, signal.SIGKILL)
    for worker in workers:
        try:
            worker.kill()
        except psutil.NoSuchProcess:
            continue
    process.wait()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _history_rows(workdir: Path, name: str) -> int:
    return len((workdir / name / "reports" / "train_history.csv").read_text().splitlines()) - 1


def _mlflow_runs(workdir: Path, experiment: str) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    return client.search_runs([client.get_experiment_by_name(experiment).experiment_id])


def _worker(torchrun: subprocess.Popen, rank: int) -> psutil.Process:
    """The worker process of the given rank among torchrun's children."""
    for child in psutil.Process(torchrun.pid).children():
        if child.environ().get("RANK") == str(rank):
            return child
    raise AssertionError(f"no worker with RANK={rank} under torchrun (pid {torchrun.pid})")


@pytest.fixture(scope="module")
def killed_run(workdir):
    """A 2-process run with 2 allowed restarts whose rank-0 worker is SIGKILLed after the first checkpoint.

    An epoch takes about a second here, so the kill lands while later epochs remain.
    """
    epochs = 5
    params = _params(workdir, "killed", model={"base_channels": 8}, epochs=epochs, steps_per_epoch=12, batch_size=4,
                     patch_size=64, max_restarts=2, log_every=100)
    torchrun = _start(torchrun_command(str(params)), workdir, workdir / "killed.log")
    latest = workdir / "killed" / "checkpoint_latest.pt"
    try:
        deadline = time.monotonic() + 90
        while not latest.is_file() and torchrun.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        running_at_kill = torchrun.poll() is None
        run_before = yaml.safe_load((workdir / "killed" / "run.json").read_text())["run_id"]
        if running_at_kill:
            _worker(torchrun, rank=0).send_signal(signal.SIGKILL)
        try:
            returncode = torchrun.wait(timeout=150)
        except subprocess.TimeoutExpired:
            returncode = None  # reported with the log tail by test_kill_run_exits_zero
    finally:
        _stop(torchrun)
    return {"epochs": epochs, "running_at_kill": running_at_kill, "returncode": returncode, "run_before": run_before,
            "output": (workdir / "killed.log").read_text(), "latest": torch.load(latest, weights_only=False)}


def test_kill_happened_mid_training(killed_run):
    assert killed_run["running_at_kill"]


def test_kill_run_exits_zero(killed_run):
    assert killed_run["returncode"] == 0, killed_run["output"][-4000:]


def test_kill_run_resumed(killed_run):
    assert "resumed from" in killed_run["output"]


def test_kill_run_completes_all_epochs(killed_run, workdir):
    assert _history_rows(workdir, "killed") == killed_run["epochs"]


def test_kill_run_history_epochs_in_order(killed_run):
    assert [row["epoch"] for row in killed_run["latest"]["history"]] == list(range(1, killed_run["epochs"] + 1))


def test_kill_run_checkpoint_has_rng_of_each_rank(killed_run):
    assert len(killed_run["latest"]["rng"]) == 2


def test_kill_run_ranks_have_different_rng(killed_run):
    first, second = killed_run["latest"]["rng"]
    assert not torch.equal(first["torch"], second["torch"])


def test_kill_run_keeps_mlflow_run(killed_run, workdir):
    assert [run.info.run_id for run in _mlflow_runs(workdir, "killed")] == [killed_run["run_before"]]


def test_kill_run_logs_each_epoch_once(killed_run, workdir):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    steps = [metric.step for metric in client.get_metric_history(killed_run["run_before"], "train_loss")]
    assert sorted(steps) == list(range(1, killed_run["epochs"] + 1))


def test_kill_run_mlflow_run_finished(killed_run, workdir):
    assert _mlflow_runs(workdir, "killed")[0].info.status == "FINISHED"


def test_two_agents_rendezvous_over_c10d(workdir, monkeypatch):
    port = _free_port()
    monkeypatch.setenv("UNET_RDZV_ID", f"test-{uuid.uuid4().hex[:8]}")
    params = _params(workdir, "two_nodes", nnodes=2, nproc_per_node=1, rdzv_endpoint=f"127.0.0.1:{port}", epochs=2)
    command = torchrun_command(str(params))
    agents = [_start(command, workdir, workdir / f"two_nodes_{index}.log") for index in range(2)]
    try:
        returncodes = [agent.wait(timeout=120) for agent in agents]
    finally:
        for agent in agents:
            _stop(agent)
    output = "".join((workdir / f"two_nodes_{index}.log").read_text() for index in range(2))
    assert "--rdzv_backend=c10d" in command
    assert returncodes == [0, 0], output[-4000:]
    assert "(world size 2)" in output
    assert _history_rows(workdir, "two_nodes") == 2
    assert _mlflow_runs(workdir, "two_nodes")[0].data.tags["world_size"] == "2"


def test_taken_port_fails_fast(workdir):
    params = _params(workdir, "taken", nnodes=2, rdzv_endpoint="127.0.0.1:0")
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        params.write_text(params.read_text().replace("127.0.0.1:0", f"127.0.0.1:{port}"))
        started = time.monotonic()
        result = subprocess.run([sys.executable, "-m", "unet.cli", "train", "--params", str(params)], cwd=workdir,
                                env=_environment(), capture_output=True, text=True, timeout=60)
        elapsed = time.monotonic() - started
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1
    assert len(lines) == 1, result.stderr
    assert f"port {port}" in lines[0]
    assert "already in use" in lines[0]
    assert "--standalone" in lines[0]
    assert elapsed < 30


def test_standalone_runs_side_by_side(workdir):
    runs = [_start([sys.executable, "-m", "unet.cli", "train", "--params", str(_params(workdir, name))], workdir,
                   workdir / f"{name}.log") for name in ("side_a", "side_b")]
    try:
        returncodes = [run.wait(timeout=120) for run in runs]
    finally:
        for run in runs:
            _stop(run)
    output = (workdir / "side_a.log").read_text() + (workdir / "side_b.log").read_text()
    assert returncodes == [0, 0], output[-4000:]
    assert (workdir / "side_a" / "checkpoint.pt").is_file()
    assert (workdir / "side_b" / "checkpoint.pt").is_file()


def _train_alone(workdir: Path, name: str, **train) -> subprocess.CompletedProcess:
    params = _params(workdir, name, nproc_per_node=1, **train)
    return subprocess.run([sys.executable, "-m", "unet.train", "--params", str(params)], cwd=workdir,
                          env=_environment(), capture_output=True, text=True, timeout=180)


def test_fp16_checkpoint_has_scaler_state(workdir):
    result = _train_alone(workdir, "fp16", precision="fp16")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "with GradScaler" in result.stdout
    assert "scale" in torch.load(workdir / "fp16" / "checkpoint_latest.pt", weights_only=False)["scaler"]


def test_unwrap_removes_compile_and_ddp_prefixes():
    # A compiled training run takes about 90 s of inductor compilation on 2 cores, too slow
    # for this suite; torch.compile wraps lazily, so the wrapper's keys can be checked at once.
    from unet.train import unwrap

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3))
    compiled = torch.compile(model)
    assert list(compiled.state_dict())[0].startswith("_orig_mod.")
    assert list(unwrap(compiled).state_dict()) == list(model.state_dict())
