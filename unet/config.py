"""Typed configuration: one dataclass per block of params.yaml, validated on construction.

An invalid value raises ValueError naming the params key (for example `train.batch_size`),
the value and what is allowed, so a user knows which line of params.yaml to change.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

MODALITIES = ("t1", "t1c", "t2", "flair")


def _require(condition: bool, key: str, value: Any, allowed: str) -> None:
    if not condition:
        raise ValueError(f"invalid params value {key}={value!r}: expected {allowed}")


@dataclass(frozen=True)
class DataConfig:
    """Location of the ingested cases and their split."""

    dir: str = "data"
    """Folder with the canonical layout and dataset.yaml, versioned by data.dvc."""
    test_cases: tuple[str, ...] = ()
    """Case ids held out for the evaluate stage; empty takes the split in DIR/dataset.yaml."""
    val_cases: tuple[str, ...] = ()
    """Case ids for per-epoch validation and best-checkpoint selection; empty takes dataset.yaml's (may be none)."""

    def __post_init__(self) -> None:
        overlap = set(self.test_cases) & set(self.val_cases)
        _require(not overlap, "data.val_cases", sorted(overlap), "no case id that is also in data.test_cases")


@dataclass(frozen=True)
class PreprocessConfig:
    """Reorientation, brain crop and intensity normalisation."""

    out_dir: str = "preprocessed"
    margin: int = 0
    """Voxels added on each side of the brain bounding box."""
    num_workers: int = 1
    """Worker processes; 1 runs in the calling process."""
    target_spacing: tuple[float, ...] | None = None
    """Voxel size in mm per RAS axis to resample to after cropping; None keeps each case's own spacing."""

    def __post_init__(self) -> None:
        _require(self.margin >= 0, "preprocess.margin", self.margin, "an integer >= 0")
        _require(self.num_workers >= 1, "preprocess.num_workers", self.num_workers, "an integer >= 1")
        if self.target_spacing is not None:
            _require(len(self.target_spacing) == 3 and all(float(v) > 0 for v in self.target_spacing),
                     "preprocess.target_spacing", self.target_spacing, "three positive numbers (mm) or null")


@dataclass(frozen=True)
class ModelConfig:
    """U-Net architecture."""

    base_channels: int = 64
    """Channels of the first DoubleConv; the bottleneck has 16x as many."""
    upsampling: str = "bilinear"
    """`bilinear` (up-sampling then 3x3 conv) or `transpose` (2x2 transposed conv)."""
    target: str = "regions"
    """`regions`: WT, TC, ET as independent sigmoids; `classes`: softmax over the 4 canonical labels."""
    spatial_dims: int = 2
    """2 trains on axial slices and predicts slice by slice; 3 trains on 3D patches and predicts with sliding windows."""

    def __post_init__(self) -> None:
        _require(self.base_channels >= 1, "model.base_channels", self.base_channels, "an integer >= 1")
        _require(self.upsampling in ("bilinear", "transpose"), "model.upsampling", self.upsampling, "'bilinear' or 'transpose'")
        _require(self.target in ("regions", "classes"), "model.target", self.target, "'regions' or 'classes'")
        _require(self.spatial_dims in (2, 3), "model.spatial_dims", self.spatial_dims, "2 or 3")


@dataclass(frozen=True)
class TrainConfig:
    """Distributed training under torchrun."""

    out_dir: str = "model"
    nnodes: int = 1
    nproc_per_node: int = 2
    rdzv_endpoint: str = ""
    """host:port of the c10d rendezvous for multi-node runs; empty runs `--standalone`."""
    max_restarts: int = 0
    epochs: int = 10
    steps_per_epoch: int = 50
    """Optimiser steps per epoch and process; each step draws `batch_size` random slices."""
    batch_size: int = 8
    """Slices per process and step."""
    patch_size: int = 128
    """Side of the square slice patch (2D) or cubic patch (3D) in voxels; a multiple of 16."""
    foreground_fraction: float = 0.5
    """Fraction of each batch whose patch is centred on a tumour voxel."""
    optimizer: str = "adamw"
    lr: float = 2e-3
    weight_decay: float = 1e-5
    schedule: str = "poly"
    grad_clip: float = 12.0
    """Maximum gradient norm; 0 disables clipping."""
    precision: str = "auto"
    """`auto` (bf16 where supported, fp16 with loss scaling on CUDA without bf16, else fp32), `bf16`, `fp16` or `fp32`."""
    channels_last: bool = True
    compile: bool = False
    """Run the model through torch.compile (first steps are slower while it compiles)."""
    num_workers: int = 0
    """DataLoader worker processes per training process."""
    seed: int = 42
    deterministic: bool = False
    auto_resume: bool = True
    """Continue an unfinished run from its latest checkpoint when params and data are unchanged."""
    log_every: int = 10
    """Steps between progress lines."""

    def __post_init__(self) -> None:
        for key in ("nnodes", "nproc_per_node", "epochs", "steps_per_epoch", "batch_size"):
            value = getattr(self, key)
            _require(isinstance(value, int) and value >= 1, f"train.{key}", value, "an integer >= 1")
        _require(self.max_restarts >= 0, "train.max_restarts", self.max_restarts, "an integer >= 0")
        _require(self.patch_size >= 16 and self.patch_size % 16 == 0, "train.patch_size", self.patch_size, "a multiple of 16")
        _require(0.0 <= self.foreground_fraction <= 1.0, "train.foreground_fraction", self.foreground_fraction, "a number in [0, 1]")
        _require(self.optimizer in ("adamw", "sgd"), "train.optimizer", self.optimizer, "'adamw' or 'sgd'")
        _require(self.lr > 0, "train.lr", self.lr, "a number > 0")
        _require(self.schedule in ("poly", "cosine", "constant"), "train.schedule", self.schedule, "'poly', 'cosine' or 'constant'")
        _require(self.grad_clip >= 0, "train.grad_clip", self.grad_clip, "a number >= 0")
        _require(self.precision in ("auto", "bf16", "fp16", "fp32"), "train.precision", self.precision,
                 "'auto', 'bf16', 'fp16' or 'fp32'")
        _require(self.num_workers >= 0, "train.num_workers", self.num_workers, "an integer >= 0")
        _require(self.nnodes == 1 or bool(self.rdzv_endpoint), "train.rdzv_endpoint", self.rdzv_endpoint,
                 "host:port of the rendezvous when train.nnodes > 1")


@dataclass(frozen=True)
class EvaluateConfig:
    """Whole-volume inference and scoring on the held-out cases."""

    out_dir: str = "predictions"
    report_dir: str = "reports"
    batch_size: int = 16
    """Slices (2D) or sliding-window patches (3D) per forward pass."""
    overlap: float = 0.5
    """Fraction by which neighbouring 3D sliding windows overlap."""
    threshold: float = 0.5
    """Sigmoid threshold for region outputs."""
    hd95_penalty_mm: float = 373.13
    """HD95 given when exactly one of prediction and label is empty (BraTS rule)."""
    tta_mirroring: bool = False
    """Average the probabilities over flips of both in-plane axes (4 forward passes per slice)."""

    def __post_init__(self) -> None:
        _require(self.batch_size >= 1, "evaluate.batch_size", self.batch_size, "an integer >= 1")
        _require(0.0 <= self.overlap < 1.0, "evaluate.overlap", self.overlap, "a number in [0, 1)")
        _require(0.0 < self.threshold < 1.0, "evaluate.threshold", self.threshold, "a number in (0, 1)")
        _require(self.hd95_penalty_mm >= 0, "evaluate.hd95_penalty_mm", self.hd95_penalty_mm, "a number >= 0")


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow storage for runs, models and artifacts (shared by train, evaluate and register)."""

    tracking_uri: str = "sqlite:///mlflow.db"
    """MLflow tracking URI; the MLFLOW_TRACKING_URI environment variable wins when set."""
    artifact_location: str = "mlartifacts"
    """Artifact root for a new experiment: a local folder or s3://bucket/prefix."""
    experiment: str = "brain-tumor-unet"

    def resolved_tracking_uri(self, base_dir: Path | None = None) -> str:
        """Return the tracking URI to use; a relative SQLite path is taken relative to `base_dir` (the params file's folder)."""
        uri = os.environ.get("MLFLOW_TRACKING_URI") or self.tracking_uri
        prefix = "sqlite:///"
        if base_dir is not None and uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
            uri = prefix + str((Path(base_dir) / uri[len(prefix):]).resolve())
        return uri


@dataclass(frozen=True)
class RegisterConfig:
    """Model registration and the promotion gate."""

    model_name: str = "brain-tumor-unet"
    alias: str = "staging"
    min_improvement: float = 0.0
    """Mean Dice the new version must add over the version holding the alias."""
    max_region_drop: float = 0.05
    """Largest Dice drop allowed in any single region (WT, TC, ET) against the alias holder."""
    allow_dirty: bool = False
    """Register even when code, params or dvc.yaml have uncommitted changes."""
    out_file: str = "registration.json"

    def __post_init__(self) -> None:
        _require(self.min_improvement >= 0, "register.min_improvement", self.min_improvement, "a number >= 0")
        _require(self.max_region_drop >= 0, "register.max_region_drop", self.max_region_drop, "a number >= 0")


@dataclass(frozen=True)
class Params:
    """All of params.yaml."""

    data: DataConfig = field(default_factory=DataConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    register: RegisterConfig = field(default_factory=RegisterConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _build(cls: type, block: str, values: dict[str, Any] | None) -> Any:
    values = dict(values or {})
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"unknown params key {block}.{unknown[0]}; known keys in '{block}': {sorted(known)}")
    for name, value in values.items():
        if isinstance(value, list):
            values[name] = tuple(value)
    return cls(**values)


def params_from_dict(raw: dict[str, Any]) -> Params:
    """Build Params from a parsed params.yaml mapping; missing blocks and keys take their defaults."""
    blocks = {f.name: f.type for f in dataclasses.fields(Params)}
    unknown = sorted(set(raw) - set(blocks))
    if unknown:
        raise ValueError(f"unknown params block '{unknown[0]}'; known blocks: {sorted(blocks)}")
    classes = {
        "data": DataConfig, "preprocess": PreprocessConfig, "model": ModelConfig, "train": TrainConfig,
        "evaluate": EvaluateConfig, "tracking": TrackingConfig, "register": RegisterConfig,
    }
    return Params(**{name: _build(cls, name, raw.get(name)) for name, cls in classes.items()})


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate a params file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"params file {path} not found; run from the project root or pass --params")
    try:
        with path.open() as handle:
            raw = yaml.safe_load(handle) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ValueError(f"{path} is not valid YAML{where}: {getattr(error, 'problem', error)}; fix the syntax there") from error
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping of blocks (data, preprocess, model, ...)")
    return params_from_dict(raw)
