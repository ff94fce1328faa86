"""Prefect tasks: each one step of the pipeline, done by a `unet` function, `dvc` or `git`.

Retries sit only where a second attempt can succeed: reading the source (S3 throttling,
a folder still being uploaded) and pushing to the DVC remote. Stages never
retry: a failed training run is rarely transient and a retry would cost a whole run.
Every task has NO_CACHE: each has side effects and must run whenever it is called.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import yaml
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from flows.process import DEFAULT_GRACE_PERIOD_S, child_environment, run_command
from unet.config import load_params
from unet.ingest import IngestReport, ingest
from unet.s3 import S3Error
from unet.tools import dvc_command
from unet.validate import validate_dataset


def dvc_file_md5(dvc_file: Path) -> str | None:
    """Return the directory hash recorded in a .dvc file, or None when the file does not exist."""
    if not dvc_file.is_file():
        return None
    outs = (yaml.safe_load(dvc_file.read_text()) or {}).get("outs") or [{}]
    return outs[0].get("md5")


def default_remote(project_dir: Path) -> str | None:
    """Return the name of the default DVC remote, or None when none is configured."""
    result = subprocess.run(dvc_command("remote", "default"), cwd=project_dir, env=child_environment(),
                            capture_output=True, text=True)
    name = result.stdout.strip()
    return name if result.returncode == 0 and name else None


def retry_if_transient(task, task_run, state) -> bool:
    """Retry the ingest task only after a transient S3 failure; a missing bucket or a bad case fails at once."""
    error = state.result(raise_on_failure=False)
    return isinstance(error, S3Error) and error.transient


@task(name="ingest-cases", cache_policy=NO_CACHE, retries=3, retry_delay_seconds=exponential_backoff(10),
      retry_jitter_factor=0.2, retry_condition_fn=retry_if_transient)
def ingest_cases(source: str, dest: Path, spec: Path | None, strict: bool, endpoint_url: str | None = None,
                 region: str | None = None) -> IngestReport:
    """Bring the cases under `source` (a folder or s3:// URI, passed through as given) into `dest`.

    For an s3:// source, `endpoint_url` and `region` override the standard AWS settings,
    which also supply the credentials. Ingestion is idempotent (unchanged cases are left
    alone) and S3 downloads resume, so a retry after a transient failure redoes only what
    is missing. `dvc add` is left to `version_data`.
    """
    logger = get_run_logger()
    report = ingest(source, dest, spec, strict=strict, use_dvc=False, endpoint_url=endpoint_url, region=region)
    logger.info("%d case(s) written, %d unchanged, %d skipped", len(report.written), len(report.unchanged),
                len(report.skipped))
    for case_id, reasons in report.skipped.items():
        logger.warning("skipped case %s: %s", case_id, "; ".join(reasons))
    return report


@task(name="validate-data", cache_policy=NO_CACHE)
def validate_data(dest: Path) -> None:
    """Check the whole dataset in `dest` (every case and dataset.yaml); raise when any case is invalid."""
    problems = validate_dataset(dest)
    if problems:
        for problem in problems:
            get_run_logger().error("%s", problem)
        raise ValueError(f"{dest}: {len(problems)} problem(s), the first: {problems[0]}; "
                         f"fix or remove the case, then run the flow again (`unet validate {dest}` lists them all)")


@task(name="version-data", cache_policy=NO_CACHE)
def version_data(project_dir: Path, dest: str) -> str | None:
    """Run `dvc add DEST` to record the dataset as a DVC version, and return the hash in DEST.dvc."""
    run_command(dvc_command("add", dest), cwd=project_dir, logger=get_run_logger(),
                hint=f"check that {project_dir} is a DVC repository and {dest}/ is readable")
    return dvc_file_md5(project_dir / f"{dest}.dvc")


@task(name="push-data", cache_policy=NO_CACHE, retries=3, retry_delay_seconds=exponential_backoff(10),
      retry_jitter_factor=0.2)
def push_data(project_dir: Path, dvc_file: str) -> None:
    """Run `dvc push DVC_FILE` to the default remote. Network errors are worth a retry."""
    run_command(dvc_command("push", dvc_file), cwd=project_dir, logger=get_run_logger(),
                hint="check the DVC remote's URL and credentials (`dvc remote list`, `dvc push -v`)")


def _git(project_dir: Path, *args: str) -> str:
    result = subprocess.run(["git", *args], cwd=project_dir, env=child_environment(), capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"`git {' '.join(args)}` failed in {project_dir}: {result.stderr.strip()}; "
                           "fix the checkout (and git's user.name and user.email), then run the flow again")
    return result.stdout.strip()


def has_uncommitted_changes(project_dir: Path, path: str) -> bool:
    """Return whether `path` differs from the last commit or has never been committed."""
    return bool(_git(project_dir, "status", "--porcelain", "--", path))


@task(name="commit-data", cache_policy=NO_CACHE)
def commit_data(project_dir: Path, dvc_file: str, message: str, commit: bool) -> str | None:
    """Commit DVC_FILE, and the .gitignore beside it when that has changes (`dvc add` writes it); return the commit.

    With `commit` false the file stays modified in the checkout and a Prefect artifact
    (key `data-review`) records the change and the commands that accept it.
    """
    logger = get_run_logger()
    paths = [dvc_file]
    gitignore = str(Path(dvc_file).parent / ".gitignore")
    if _git(project_dir, "status", "--porcelain", "--", gitignore):
        paths.append(gitignore)
    if not commit:
        diff = _git(project_dir, "diff", "--", dvc_file) or (project_dir / dvc_file).read_text()
        create_markdown_artifact(
            key="data-review",
            description=f"new version of {dvc_file} awaiting review",
            markdown=(f"## New data version in `{project_dir}`\n\n{message}\n\n```diff\n{diff}\n```\n\n"
                      f"Accept it with `git add {' '.join(paths)} && git commit -m \"{message}\"`, "
                      f"or discard it with `git checkout -- {dvc_file} && dvc checkout {dvc_file}`.\n"),
        )
        logger.info("%s left uncommitted for review (artifact data-review)", dvc_file)
        return None
    # Only these paths go into the commit; anything else staged in the checkout stays staged.
    _git(project_dir, "add", "--", *paths)
    _git(project_dir, "commit", "--quiet", "-m", message, "--", *paths)
    sha = _git(project_dir, "rev-parse", "HEAD")
    logger.info("committed %s as %s", ", ".join(paths), sha[:12])
    return sha


@task(name="check-topology", cache_policy=NO_CACHE)
def check_topology(project_dir: Path, nnodes: int | None, nproc_per_node: int | None) -> None:
    """Fail before any stage runs when the work pool's topology differs from params.yaml.

    The world size sets the global batch, so it is a tracked parameter (dvc.lock, MLflow):
    a run must not silently train with a topology other than the committed one.
    """
    train = load_params(project_dir / "params.yaml").train
    for key, wanted, configured in (("nnodes", nnodes, train.nnodes),
                                    ("nproc_per_node", nproc_per_node, train.nproc_per_node)):
        if wanted is not None and wanted != configured:
            raise ValueError(f"the work pool provides {key}={wanted} but params.yaml has train.{key}={configured}; "
                             f"commit params.yaml with train.{key}: {wanted}, or change the deployment's job variables")
    get_run_logger().info("topology matches params.yaml: nnodes=%d, nproc_per_node=%d", train.nnodes,
                          train.nproc_per_node)


@task(name="check-pipeline", cache_policy=NO_CACHE)
def pipeline_outdated(project_dir: Path, stages: list[str]) -> list[str]:
    """Return the stages that `dvc status` reports as changed (new data, code or params since their last run)."""
    result = subprocess.run(dvc_command("status", "--json", *stages), cwd=project_dir, env=child_environment(),
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"`dvc status` failed in {project_dir}: {result.stderr.strip()}; "
                           "run it there by hand to see why")
    return sorted(json.loads(result.stdout or "{}"))


@task(name="run-stage", task_run_name="run-stage-{stage}", cache_policy=NO_CACHE)
def run_stage(project_dir: Path, stage: str, grace_period_s: float = DEFAULT_GRACE_PERIOD_S) -> None:
    """Run `dvc repro --single-item STAGE`: one stage of dvc.yaml, recorded in dvc.lock as `dvc repro` records it.

    Call it directly in the flow, not with `.submit()`. Prefect turns a cancellation into
    an exception in the main thread, and the stage's processes are stopped only when that
    exception passes through `run_command`.
    """
    run_command(dvc_command("repro", "--single-item", stage), cwd=project_dir, logger=get_run_logger(),
                grace_period_s=grace_period_s,
                hint=f"fix the cause shown below, then run the flow again or `dvc repro {stage}` in {project_dir}")
