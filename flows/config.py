"""The one typed parameter each flow takes.

A deployment passes these as the `config` parameter (prefect.yaml: `parameters.config`).
Paths in them are relative to `project_dir`, the root of a git + DVC checkout of this
project; the flows run every command there.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

PIPELINE_STAGES = ("preprocess", "train", "evaluate", "register")


class _Settings(BaseModel):
    # A misspelt key in prefect.yaml or a run's parameters fails validation instead of being ignored.
    model_config = ConfigDict(extra="forbid")


class IngestSettings(_Settings):
    """Settings of ingestion: the source of new cases and the handling of a new data version.

    Credentials for an s3:// source are not among them, so they never appear in a flow run's
    parameters. boto3 reads them from the standard AWS settings of the process that runs the
    flow: environment variables, ~/.aws, or an instance or pod role.
    """

    source: str = Field(description="folder or s3://bucket/prefix holding the cases; a relative folder is taken from project_dir")
    endpoint_url: str | None = Field(
        None, description="S3 endpoint URL for an s3:// source, e.g. a MinIO server; default: the AWS settings, else AWS")
    region: str | None = Field(None, description="region of an s3:// source's bucket; default: the AWS settings")
    dest: str = Field("data", description="dataset folder tracked by DEST.dvc")
    spec: str | None = Field(None, description="dataset spec (YAML) for a layout without BraTS names")
    strict: bool = Field(False, description="fail on the first invalid case instead of skipping it")
    push: bool = Field(True, description="dvc push the new version when a default DVC remote is configured")
    commit: bool = Field(True, description="git commit DEST.dvc; false leaves it uncommitted and records it for review")
    retries: int = Field(3, ge=0, description="extra attempts at reading the source and at dvc push")
    retry_backoff_s: float = Field(10.0, ge=0, description="delay before the first retry; doubles for each further one")


class TrainSettings(_Settings):
    """Settings of training: the dvc.yaml stages to run and the topology the work pool provides."""

    stages: list[str] = Field(list(PIPELINE_STAGES), min_length=1, description="dvc.yaml stages, run in this order")
    nnodes: int | None = Field(None, ge=1, description="nodes the work pool gives a run; must equal train.nnodes in params.yaml")
    nproc_per_node: int | None = Field(
        None, ge=1, description="processes (GPUs) per node; must equal train.nproc_per_node in params.yaml")
    grace_period_s: float = Field(
        20.0, gt=0, description="on cancellation, time between SIGTERM and SIGKILL for a stage's processes")


class IngestFlowConfig(IngestSettings):
    project_dir: Path = Field(Path("."), description="root of the git + DVC checkout")


class TrainFlowConfig(TrainSettings):
    project_dir: Path = Field(Path("."), description="root of the git + DVC checkout")


class RetrainFlowConfig(_Settings):
    project_dir: Path = Field(Path("."), description="root of the git + DVC checkout")
    ingest: IngestSettings
    train: TrainSettings = Field(default_factory=TrainSettings)

    def ingest_config(self) -> IngestFlowConfig:
        return IngestFlowConfig(project_dir=self.project_dir, **self.ingest.model_dump())

    def train_config(self) -> TrainFlowConfig:
        return TrainFlowConfig(project_dir=self.project_dir, **self.train.model_dump())


class IngestResult(BaseModel):
    """Outcome of an ingestion run. `changed` is true when the run produced a new version of DEST.dvc."""

    changed: bool
    awaiting_review: bool = False
    data_md5: str | None = None
    written: list[str] = Field(default_factory=list)
    skipped: dict[str, list[str]] = Field(default_factory=dict)
    commit: str | None = None
