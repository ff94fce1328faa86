"""The flows: ingest new cases, run the dvc.yaml stages, and retrain when new data arrived.

The stages are the ones in dvc.yaml, each run with `dvc repro --single-item`, so a flow
run and a `dvc repro` in the same checkout write the same dvc.lock and the same MLflow
lineage. Prefect decides when and where; DVC decides what is out of date.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_client, get_run_logger
from prefect.runtime import deployment, flow_run
from prefect.tasks import exponential_backoff

from flows.config import IngestFlowConfig, IngestResult, RetrainFlowConfig, TrainFlowConfig, TrainSettings
from flows.tasks import (
    check_topology,
    commit_data,
    default_remote,
    dvc_file_md5,
    has_uncommitted_changes,
    ingest_cases,
    pipeline_outdated,
    push_data,
    run_stage,
    validate_data,
    version_data,
)


# Job variables of the work pool that describe the training topology (see prefect.yaml).
TOPOLOGY_KEYS = ("nnodes", "nproc_per_node")


def _with_pool_topology(settings: TrainSettings) -> TrainSettings:
    """Fill nnodes and nproc_per_node that the config leaves unset from this run's job variables.

    Job variables are merged as a worker merges them: the deployment's, then the flow
    run's own overrides. A value set in the config wins over both. Outside a deployment
    (a direct call, a served flow without job variables) nothing changes.
    """
    missing = [key for key in TOPOLOGY_KEYS if getattr(settings, key) is None]
    if not missing or deployment.id is None:
        return settings
    with get_client(sync_client=True) as client:
        job_variables = dict(client.read_deployment(deployment.id).job_variables or {})
    job_variables.update(flow_run.job_variables or {})
    found = {key: int(job_variables[key]) for key in missing if job_variables.get(key) is not None}
    if found:
        get_run_logger().info("topology from the work pool's job variables: %s",
                              ", ".join(f"{key}={value}" for key, value in found.items()))
    return settings.model_copy(update=found)


def _source_for(source: str, project_dir: Path) -> str:
    """Return a URI (s3://...) as given, and a relative folder joined to the project root."""
    if "://" in source:
        return source
    return str(project_dir / source)


@flow(name="ingest-flow")
def ingest_flow(config: IngestFlowConfig) -> IngestResult:
    """New cases from a folder or S3 -> canonical layout -> new DEST.dvc version -> dvc push -> git commit or review."""
    logger = get_run_logger()
    project = config.project_dir.resolve()
    dvc_file = f"{config.dest}.dvc"
    before = dvc_file_md5(project / dvc_file)

    with_retries = {"retries": config.retries, "retry_delay_seconds": exponential_backoff(config.retry_backoff_s)}
    report = ingest_cases.with_options(**with_retries)(
        _source_for(config.source, project), project / config.dest,
        project / config.spec if config.spec else None, config.strict, config.endpoint_url, config.region)
    if report.written:
        validate_data(project / config.dest)
    # Always `dvc add`: it also picks up cases written by an earlier run that stopped before versioning them.
    after = version_data(project, config.dest)
    result = IngestResult(changed=after != before, data_md5=after, written=report.written, skipped=report.skipped)
    if result.changed:
        remote = default_remote(project) if config.push else None
        if remote:
            push_data.with_options(**with_retries)(project, dvc_file)
        elif config.push:
            logger.info("no default DVC remote in %s; the new data stays in the local cache only", project)
        message = f"Ingest {len(report.written)} new or changed case(s) from {config.source}"
        result.commit = commit_data(project, dvc_file, message, config.commit)
    else:
        logger.info("no new or changed cases in %s; %s is unchanged", config.source, dvc_file)
    # Also true for a version an earlier run left for review: training must wait for it either way,
    # since register refuses a model whose data.dvc is not committed.
    result.awaiting_review = has_uncommitted_changes(project, dvc_file)
    if result.awaiting_review:
        logger.info("%s has uncommitted changes awaiting review", dvc_file)
    return result


@flow(name="train-flow")
def train_flow(config: TrainFlowConfig) -> list[str]:
    """Run the dvc.yaml stages in order (default preprocess, train, evaluate, register); returns the stages run.

    A stage that is up to date is skipped by DVC itself, so running this flow on unchanged
    data and code is cheap.
    """
    config = _with_pool_topology(config)
    project = config.project_dir.resolve()
    if config.nnodes is not None or config.nproc_per_node is not None:
        check_topology(project, config.nnodes, config.nproc_per_node)
    for stage in config.stages:
        run_stage(project, stage, config.grace_period_s)
    return list(config.stages)


@flow(name="retrain-on-new-data")
def retrain_on_new_data(config: RetrainFlowConfig) -> bool:
    """Ingest, then train only when there is something to train on; returns whether it trained.

    It trains when this ingestion made a new data version, or when `dvc status` reports a
    stage out of date. The second case covers a version an earlier run ingested but did not
    get through training (it failed or was cancelled). It also covers committed changes to
    code or params, which `dvc repro` would rerun as well.
    """
    logger = get_run_logger()
    # Read here: inside the train-flow subflow, the job variables of this run are out of reach.
    config = config.model_copy(update={"train": _with_pool_topology(config.train)})
    ingested = ingest_flow(config.ingest_config())
    if ingested.awaiting_review:
        logger.info("the new data version awaits review; training starts once it is committed "
                    "(run train-flow, or wait for the next scheduled run)")
        return False
    project = config.project_dir.resolve()
    outdated = [] if ingested.changed else pipeline_outdated(project, config.train.stages)
    if not ingested.changed and not outdated:
        logger.info("no new data and every stage is up to date; training skipped")
        return False
    if outdated:
        logger.info("stages out of date since their last run: %s", ", ".join(outdated))
    train_flow(config.train_config())
    return True
