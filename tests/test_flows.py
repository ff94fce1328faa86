"""Prefect flows against Prefect's real local server (the test harness), with real git, DVC and processes.

The training flow runs on crops of real cases in a temporary git repository holding a
copy of this project, like tests/test_pipeline.py. It reads them once from a folder and once
from a bucket on moto's S3 server, which this module starts on 127.0.0.1 (boto3 is not
mocked). The other tests use a small DVC project whose stages are shell commands and
torchrun with `--no-python` workers. The cancellation
test serves the deployments with `python -m flows.serve` and cancels a run through the API,
as the UI does. The deployment tests register prefect.yaml with `prefect deploy`.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from uuid import UUID

import boto3
import psutil
import pytest
import yaml
from prefect import get_client
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterName,
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterId,
)
from prefect.client.schemas.objects import StateType
from prefect.deployments import run_deployment
from prefect.settings import PREFECT_API_URL
from prefect.states import Cancelling
from prefect.testing.utilities import prefect_test_harness

from flows.config import IngestFlowConfig, IngestSettings, RetrainFlowConfig, TrainFlowConfig
from flows.pipeline import ingest_flow, retrain_on_new_data, train_flow
from flows.process import run_command
from test_s3_ingest import FlakyProxy
from conftest import TINY_PIPELINE_PARAMS, copy_project, stop_process
from unet import s3

REPO = Path(__file__).resolve().parents[1]
STAGES = ("preprocess", "train", "evaluate", "register")
TORCHRUN = "python -m torch.distributed.run --standalone --nproc_per_node=2 --no-python"
# A number no other process on the machine has on its command line: the cancellation test finds its processes by it.
MARKER = f"3000.{random.randint(10**5, 10**6)}"


@pytest.fixture(scope="session")
def prefect_server():
    """Prefect's local server for the whole session; yields its API URL for subprocesses."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        patch.setenv("DO_NOT_TRACK", "true")
        # Commits made by the flows need an identity; the machine's git config may have none.
        for role in ("AUTHOR", "COMMITTER"):
            patch.setenv(f"GIT_{role}_NAME", "test")
            patch.setenv(f"GIT_{role}_EMAIL", "test@example.invalid")
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        with prefect_test_harness(server_startup_timeout=60):
            yield PREFECT_API_URL.value()


def _environment(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env.update(extra)
    return env


def _run(command: list[str], cwd: Path, **extra: str) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, env=_environment(**extra), capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def _git(cwd: Path, *args: str) -> str:
    return _run(["git", *args], cwd).stdout.strip()


def _wait_for(condition, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _task_runs(flow_run_id: UUID, expected: int) -> dict[str, object]:
    """Task runs of a flow run by name; waits until `expected` of them reached a final state.

    The server records task runs from events, shortly after the flow returns. Names are
    the task's name and a random suffix, or the task_run_name (run-stage-<stage>).
    """
    def final_runs():
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        done = {run.name: run for run in runs if run.state is not None and run.state.is_final()}
        return done if len(done) >= expected else None

    return _wait_for(final_runs, 30, f"{expected} finished task runs of flow run {flow_run_id}")


def _task_run_named(runs: dict[str, object], task_name: str):
    return next(run for name, run in runs.items() if name.startswith(f"{task_name}-"))


def _flow_run_count(flow_name: str) -> int:
    with get_client(sync_client=True) as client:
        return len(client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name]))))


def _training_project(tmp_path_factory) -> tuple[Path, Path]:
    """A committed git + DVC copy of this project with tiny training params and a local default remote.

    Returns the checkout and the remote's folder.
    """
    repo = tmp_path_factory.mktemp("project")
    copy_project(repo, TINY_PIPELINE_PARAMS)
    remote = tmp_path_factory.mktemp("dvc-remote")
    _git(repo, "init", "-q")
    _run([sys.executable, "-m", "dvc", "remote", "add", "-d", "local", str(remote)], repo)
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "project")
    return repo, remote


def _registered_version(repo: Path):
    """The model version that the register stage recorded in the checkout's registration.json."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{repo / 'mlflow.db'}"
    registration = json.loads((repo / "registration.json").read_text())
    return MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version(
        registration["model_name"], str(registration["version"]))


# --- the training flow on real cases ---------------------------------------------------------


@pytest.fixture(scope="module")
def trained(prefect_server, cropped_source, tmp_path_factory):
    repo, remote = _training_project(tmp_path_factory)
    ingested = ingest_flow(IngestFlowConfig(source=str(cropped_source), project_dir=repo), return_state=True)
    training_runs_before = _flow_run_count("train-flow")
    training = train_flow(TrainFlowConfig(project_dir=repo), return_state=True)
    retrain = retrain_on_new_data(
        RetrainFlowConfig(project_dir=repo, ingest=IngestSettings(source=str(cropped_source))), return_state=True)
    return {"repo": repo, "remote": remote, "ingested": ingested, "training": training, "retrain": retrain,
            "training_runs": _flow_run_count("train-flow") - training_runs_before}


def test_ingest_reports_new_data(trained):
    assert trained["ingested"].result().changed is True


def test_ingest_commits_data_version(trained):
    repo = trained["repo"]
    assert _git(repo, "status", "--porcelain", "--", "data.dvc") == ""
    assert _git(repo, "log", "-1", "--format=%s").startswith("Ingest 3 new or changed case(s)")


def test_ingest_pushes_to_remote(trained):
    assert any(path.is_file() for path in trained["remote"].rglob("*"))


def test_train_runs_every_stage(trained):
    runs = _task_runs(trained["training"].state_details.flow_run_id, len(STAGES))
    for stage in STAGES:
        assert runs[f"run-stage-{stage}"].state.type == StateType.COMPLETED, stage


def test_train_writes_metrics_and_registration(trained):
    repo = trained["repo"]
    assert (repo / "metrics.json").is_file()
    assert (repo / "registration.json").is_file()


def test_retrain_skips_without_new_cases(trained):
    assert trained["retrain"].result() is False


def test_retrain_starts_no_training(trained):
    assert trained["training_runs"] == 1  # the direct train_flow call only


# --- ingestion from S3: moto's server, and a proxy in front of it that fails requests ---------------

BUCKET = "incoming"
S3_SOURCE = f"s3://{BUCKET}/raw/"
CASES = ["BraTS2021_00006", "OtherEXampleFromTCIA", "TCGA-DU-7294"]
# Attempts that unet.s3 makes at one object before it gives up; ingest() uses the default.
S3_ATTEMPTS = inspect.signature(s3.download_prefix).parameters["max_attempts"].default


@pytest.fixture(scope="module")
def s3_source(aws_settings, moto_endpoint, cropped_source) -> str:
    """S3_SOURCE on moto's server, holding the cropped cases as <case>/<file> under raw/."""
    client = boto3.session.Session().client("s3", endpoint_url=moto_endpoint)
    client.create_bucket(Bucket=BUCKET)
    for path in sorted(cropped_source.rglob("*.nii.gz")):
        client.put_object(Bucket=BUCKET, Key=f"raw/{path.relative_to(cropped_source).as_posix()}", Body=path.read_bytes())
    return S3_SOURCE


@pytest.fixture(scope="module")
def retrained_from_s3(prefect_server, s3_source, moto_endpoint, tmp_path_factory):
    repo, _ = _training_project(tmp_path_factory)
    config = RetrainFlowConfig(project_dir=repo, ingest=IngestSettings(source=s3_source, endpoint_url=moto_endpoint,
                                                                       region="us-east-1"))
    return {"repo": repo, "state": retrain_on_new_data(config, return_state=True)}


def test_s3_retrain_trains(retrained_from_s3):
    assert retrained_from_s3["state"].result() is True


def test_s3_ingest_writes_cases(retrained_from_s3):
    data = retrained_from_s3["repo"] / "data"
    assert sorted(path.name for path in data.iterdir() if path.is_dir()) == CASES


def test_s3_ingest_records_source(retrained_from_s3):
    provenance = json.loads((retrained_from_s3["repo"] / "data" / "provenance.json").read_text())
    assert provenance["source_uri"] == S3_SOURCE


def test_s3_ingest_commits_data_version(retrained_from_s3):
    repo = retrained_from_s3["repo"]
    assert _git(repo, "log", "-1", "--format=%s", "--", "data.dvc") == f"Ingest 3 new or changed case(s) from {S3_SOURCE}"


def test_s3_retrain_writes_metrics_and_registration(retrained_from_s3):
    repo = retrained_from_s3["repo"]
    assert (repo / "metrics.json").is_file()
    assert (repo / "registration.json").is_file()


def test_s3_registered_version_tags_data_hash(retrained_from_s3):
    repo = retrained_from_s3["repo"]
    data_md5 = yaml.safe_load((repo / "data.dvc").read_text())["outs"][0]["md5"]
    assert _registered_version(repo).tags["data.dvc_md5"] == data_md5


@pytest.fixture
def flaky_s3(s3_source, moto_endpoint, monkeypatch):
    """FlakyProxy in front of moto; unet.s3's backoff between attempts at an object is shortened."""
    monkeypatch.setattr(s3, "RETRY_BASE_DELAY_S", 0.05)
    proxy = FlakyProxy(moto_endpoint)
    yield proxy
    proxy.close()


def test_ingest_task_retried_after_s3_error(prefect_server, flaky_s3, tmp_path):
    """Every attempt at the first object gets half its body, so the first task attempt fails; the retry succeeds."""
    project = tmp_path / "project"
    project.mkdir()
    _git(project, "init", "-q")
    _run([sys.executable, "-m", "dvc", "init", "-q"], project)
    flaky_s3.cut_gets = S3_ATTEMPTS
    state = ingest_flow(IngestFlowConfig(source=S3_SOURCE, endpoint_url=flaky_s3.url, project_dir=project, retries=2,
                                         retry_backoff_s=0.5), return_state=True)
    task = _task_run_named(_task_runs(state.state_details.flow_run_id, 4), "ingest-cases")
    assert state.type == StateType.COMPLETED
    assert flaky_s3.cut == S3_ATTEMPTS
    assert task.run_count == 2
    assert task.state.type == StateType.COMPLETED
    assert sorted(state.result().written) == CASES


# --- a small DVC project whose stages are plain commands ----------------------------------------


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """git + DVC project: `crash` fails in two torchrun workers, `hang` runs until stopped, `noop` succeeds."""
    project = tmp_path_factory.mktemp("scratch")
    stages = {
        "crash": f"{TORCHRUN} bash -c 'echo \"worker $RANK: simulated out of memory\"; exit 3'",
        "hang": f"sleep {MARKER} & {TORCHRUN} sleep {MARKER}",
        "noop": "echo done",
    }
    (project / "dvc.yaml").write_text(yaml.safe_dump({"stages": {name: {"cmd": cmd} for name, cmd in stages.items()}}))
    (project / "params.yaml").write_text(yaml.safe_dump({"train": {"nnodes": 1, "nproc_per_node": 2}}))
    _git(project, "init", "-q")
    _run([sys.executable, "-m", "dvc", "init", "-q"], project)
    return project


def test_failed_stage_shows_output_tail(prefect_server, scratch):
    state = train_flow(TrainFlowConfig(project_dir=scratch, stages=["crash"]), return_state=True)
    task = _task_runs(state.state_details.flow_run_id, 1)["run-stage-crash"]
    assert task.state.type == StateType.FAILED
    assert "dvc repro --single-item crash` exited with status" in task.state.message
    assert "torch.distributed.elastic.multiprocessing.errors.ChildFailedError" in task.state.message
    assert "ERROR: failed to reproduce 'crash'" in task.state.message


def test_child_environment_has_telemetry_off(tmp_path):
    records: list[str] = []
    logger = logging.getLogger("test_flows.env")
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        run_command(["env"], cwd=tmp_path, logger=logger)
    finally:
        logger.removeHandler(handler)
    for setting in ("PREFECT_SERVER_ANALYTICS_ENABLED=false", "DO_NOT_TRACK=true", "DVC_NO_ANALYTICS=1",
                    "MLFLOW_DISABLE_TELEMETRY=true"):
        assert setting in records, setting


def _dvc_project(root: Path) -> Path:
    root.mkdir()
    _git(root, "init", "-q")
    _run([sys.executable, "-m", "dvc", "init", "-q"], root)
    return root


def test_ingest_missing_source_not_retried(prefect_server, tmp_path):
    # Only a transient S3 failure is worth a retry; a missing folder fails the task at once.
    project = _dvc_project(tmp_path / "project")
    state = ingest_flow(IngestFlowConfig(source=str(tmp_path / "absent"), project_dir=project, commit=False, retries=4,
                                         retry_backoff_s=1), return_state=True)
    attempts = _task_run_named(_task_runs(state.state_details.flow_run_id, 1), "ingest-cases").run_count
    assert state.is_failed()
    assert attempts == 1
    assert "not found" in state.message


def test_ingest_leaves_data_for_review(prefect_server, cropped_source, tmp_path):
    project = _dvc_project(tmp_path / "project")
    result = ingest_flow(IngestFlowConfig(source=str(cropped_source), project_dir=project, commit=False))
    assert result.changed is True
    assert result.awaiting_review is True
    assert _git(project, "status", "--porcelain", "--", "data.dvc") == "?? data.dvc"


# --- interruption and cancellation -------------------------------------------------------------


def _marked_processes() -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter():
        try:
            if MARKER in " ".join(process.cmdline()) and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture
def stray_killer():
    """Kill processes with the marker after the test, so a failing test leaves none behind."""
    yield
    for process in _marked_processes():
        try:
            process.kill()
        except psutil.NoSuchProcess:
            continue


def test_interrupt_leaves_no_process(stray_killer, tmp_path):
    """Ctrl-C while a stage runs: KeyboardInterrupt reaches run_command, which stops the whole group."""
    command = ["bash", "-c", f"sleep {MARKER} & sleep {MARKER} & wait"]

    def interrupt_when_started():
        try:
            _wait_for(lambda: len(_marked_processes()) >= 2, 30, "the sleeps to start", interval=0.1)
        finally:  # interrupt even after a timeout, so the test cannot hang on the sleeps
            os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt_when_started, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        run_command(command, cwd=tmp_path, logger=logging.getLogger("test_flows.interrupt"), grace_period_s=5)
    assert _marked_processes() == []


@pytest.fixture
def served(prefect_server, scratch, tmp_path):
    """`python -m flows.serve` for the scratch project, stopped after the test."""
    log = tmp_path / "serve.log"
    with log.open("w") as output:
        server = subprocess.Popen(
            [sys.executable, "-m", "flows.serve", "--source", str(tmp_path), "--project-dir", str(scratch),
             "--no-schedules"],
            cwd=REPO, env=_environment(PREFECT_API_URL=prefect_server, PREFECT_RUNNER_POLL_FREQUENCY="1"),
            stdout=output, stderr=subprocess.STDOUT)

    def registered():
        with get_client(sync_client=True) as client:
            return client.read_deployments(deployment_filter=DeploymentFilter(
                name=DeploymentFilterName(any_=["on-demand-local"])))
    try:
        _wait_for(lambda: registered() or server.poll() is not None, 60, "flows.serve to register its deployments")
        assert server.poll() is None, log.read_text()
        yield server
    finally:
        stop_process(server, timeout_s=30)


def test_cancel_leaves_no_process(stray_killer, served, scratch):
    run = run_deployment("train-flow/on-demand-local", timeout=0,
                         parameters={"config": {"project_dir": str(scratch), "stages": ["hang"]}})
    # The background sleep and torchrun's two workers (which torchrun puts in sessions of their own).
    started = _wait_for(lambda: (found := _marked_processes()) and len(found) >= 3 and found, 90,
                        "the stage's processes to start")
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(run.id, Cancelling(), force=True)

        def cancelled():
            return client.read_flow_run(run.id).state.type == StateType.CANCELLED
        _wait_for(cancelled, 60, "the flow run to be cancelled")
    survivors = [p for p in started if _alive(p)] + _marked_processes()
    assert survivors == []


# --- deployments from prefect.yaml ---------------------------------------------------------------


@pytest.fixture(scope="module")
def deployed(prefect_server, tmp_path_factory):
    """prefect.yaml registered with `prefect deploy --all` on a fresh `a100-pool`; yields the checkout it ran in."""
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.workers.process import ProcessWorker

    checkout = tmp_path_factory.mktemp("checkout")
    copy_project(checkout)
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name="a100-pool", type="process",
                                               base_job_template=ProcessWorker.get_default_base_job_template()))
    _run(["prefect", "deploy", "--all", "--no-prompt"], checkout, PREFECT_API_URL=prefect_server,
         UNET_INGEST_SOURCE="s3://brain-mri/incoming")
    with get_client(sync_client=True) as client:
        yield {"checkout": checkout,
               **{name: client.read_deployment_by_name(name)
                  for name in ("ingest-flow/hourly", "retrain-on-new-data/nightly", "train-flow/on-demand")}}


def test_deploy_schedules_ingestion_hourly(deployed):
    assert deployed["ingest-flow/hourly"].schedules[0].schedule.cron == "0 * * * *"


def test_deploy_schedules_retraining_nightly(deployed):
    assert deployed["retrain-on-new-data/nightly"].schedules[0].schedule.cron == "0 2 * * *"


def test_deploy_uses_a100_pool(deployed):
    for name in ("ingest-flow/hourly", "retrain-on-new-data/nightly", "train-flow/on-demand"):
        assert deployed[name].work_pool_name == "a100-pool", name


def test_deploy_job_variables_carry_topology(deployed):
    job_variables = deployed["retrain-on-new-data/nightly"].job_variables
    assert job_variables["nnodes"] == 1
    assert job_variables["nproc_per_node"] == 8


def test_deploy_job_variables_switch_telemetry_off(deployed):
    assert deployed["train-flow/on-demand"].job_variables["env"]["DO_NOT_TRACK"] == "true"


def test_deploy_passes_s3_source_through(deployed):
    assert deployed["retrain-on-new-data/nightly"].parameters["config"]["ingest"]["source"] == "s3://brain-mri/incoming"


def _execute_on_demand(deployed, prefect_server: str, scratch: Path, **job_variables):
    """Run train-flow/on-demand's `noop` stage in the scratch project as a process worker would; returns the flow run id."""
    with get_client(sync_client=True) as client:
        run = client.create_flow_run_from_deployment(
            deployed["train-flow/on-demand"].id, job_variables=job_variables,
            parameters={"config": {"project_dir": str(scratch), "stages": ["noop"]}})
    # What a process worker starts on the node: the pull step, then the flow.
    worker = subprocess.run(["prefect", "flow-run", "execute", str(run.id)], cwd=scratch,
                            env=_environment(PREFECT_API_URL=prefect_server, UNET_PROJECT_DIR=str(deployed["checkout"])),
                            capture_output=True, text=True, timeout=120)
    print(worker.stdout[-3000:], worker.stderr[-3000:])  # shown when the test fails
    return run.id


def test_pool_topology_reaches_train_flow(deployed, prefect_server, scratch):
    """The deployment's job variables give 8 processes per node, but the scratch params.yaml has 2."""
    run_id = _execute_on_demand(deployed, prefect_server, scratch)
    task = _task_run_named(_task_runs(run_id, 1), "check-topology")
    assert task.state.type == StateType.FAILED
    assert "the work pool provides nproc_per_node=8 but params.yaml has train.nproc_per_node=2" in task.state.message


def test_run_job_variables_override_deployment(deployed, prefect_server, scratch):
    run_id = _execute_on_demand(deployed, prefect_server, scratch, nproc_per_node=2)
    runs = _task_runs(run_id, 2)
    assert _task_run_named(runs, "check-topology").state.type == StateType.COMPLETED
    assert runs["run-stage-noop"].state.type == StateType.COMPLETED
