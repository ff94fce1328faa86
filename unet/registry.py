"""The register stage: log the trained model to MLflow with its lineage, and gate the `staging` alias.

The model is logged as an MLflow pyfunc whose artifact is the training checkpoint, with the
`unet` package as its code. Unlike the default PyTorch export of MLflow 3 (a graph traced at
one input shape), it runs at any batch size and spatial size, and `unet predict` reads the
checkpoint from it directly.

Promotion: every new version gets the alias `challenger`. When no version has the configured
alias (default `staging`), the alias moves to the new version. Otherwise three conditions
must all be met. Both versions were evaluated on the same test split. The new mean Dice over
WT, TC and ET beats the current one by more than `register.min_improvement`. No region's Dice
drops by more than `register.max_region_drop`. The decision and its numbers are stored as
model version tags, and every move of the alias is recorded so that it can be rolled back.
"""

from __future__ import annotations

import json
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from unet.config import Params
from unet.labels import REGIONS
from unet.lineage import dvc_hashes, dvc_remote_url, environment, git_state, installed_packages, params_hash
from unet.tracking import configure_mlflow, read_run_file

log = logging.getLogger(__name__)

CHALLENGER = "challenger"
# Registered-model tag listing the versions an alias pointed at, oldest first; `unet promote --rollback` reads it.
HISTORY_TAG = "alias_history.{alias}"


class RegistrationError(RuntimeError):
    """Raised when a model must not be registered (for example from a dirty working tree)."""


def _python_model_class():
    import mlflow.pyfunc

    class UNetSegmenter(mlflow.pyfunc.PythonModel):
        """Pyfunc wrapper: (B, C, H, W) float32 preprocessed slices in, (B, K, H, W) logits out."""

        def load_context(self, context) -> None:
            from unet.inference import load_checkpoint

            self.model, self.metadata = load_checkpoint(Path(context.artifacts["checkpoint"]))

        def predict(self, context, model_input, params=None):
            import torch

            batch = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
            with torch.no_grad():
                return self.model(batch).numpy()

    return UNetSegmenter


def log_model(checkpoint: Path, metadata: dict[str, Any]):
    """Log the checkpoint as a pyfunc model in the active run; returns MLflow's ModelInfo."""
    import mlflow
    import torch
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    import unet

    channels = metadata["model_config"]["in_channels"]
    outputs = metadata["model_config"]["out_channels"]
    example = np.zeros((1, channels, 32, 32), dtype=np.float32)
    model = _python_model_class()()
    # -1 marks the batch and spatial axes as free, so MLflow's schema check accepts any size.
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, channels, -1, -1))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, outputs, -1, -1))]),
    )
    # Requirements without local version labels such as "+cpu", which pip cannot resolve elsewhere.
    torch_version = torch.__version__.split("+")[0]
    requirements = [f"torch=={torch_version}", f"numpy=={np.__version__}", f"mlflow=={mlflow.__version__}"]
    # MLflow suggests type hints on predict() for its own input validation; the explicit
    # tensor signature below already describes the input, so that warning is only noise.
    warnings.filterwarnings("ignore", message="Add type hints to the `predict` method")
    return mlflow.pyfunc.log_model(
        name="model",
        python_model=model,
        artifacts={"checkpoint": str(checkpoint)},
        code_paths=[str(Path(unet.__file__).parent)],
        signature=signature,
        input_example=example,
        pip_requirements=requirements,
        metadata={k: metadata[k] for k in ("target", "modalities", "regions", "labels", "preprocessing") if k in metadata},
    )


def decide_promotion(
    new: dict[str, float], current: dict[str, float] | None, min_improvement: float, max_region_drop: float = 1.0
) -> tuple[bool, str]:
    """Return (promote, reason): the new version must beat the holder's mean Dice by more than
    `min_improvement`, and no region present in both score sets may drop by more than `max_region_drop`."""
    if current is None:
        return True, "no version holds the alias"
    drops = {region: current[region] - new[region] for region in REGIONS if region in new and region in current}
    worst = max(drops, key=drops.get) if drops else None
    if worst is not None and drops[worst] > max_region_drop:
        return False, (f"{worst} Dice drops by {drops[worst]:.4f} ({current[worst]:.4f} -> {new[worst]:.4f}), "
                       f"more than register.max_region_drop {max_region_drop}")
    margin = new["mean_dice"] - current["mean_dice"]
    if margin > min_improvement:
        return True, f"mean Dice {new['mean_dice']:.4f} beats {current['mean_dice']:.4f} by {margin:.4f} (> {min_improvement})"
    return False, f"mean Dice {new['mean_dice']:.4f} does not beat {current['mean_dice']:.4f} by more than {min_improvement}"


def move_alias(client, name: str, alias: str, version: str, previous: str | None) -> None:
    """Point `alias` at `version` and append the move to the model's alias history tag, so it can be rolled back."""
    client.set_registered_model_alias(name, alias, version)
    tag = HISTORY_TAG.format(alias=alias)
    entries = [e for e in client.get_registered_model(name).tags.get(tag, "").split(",") if e]
    if previous is not None and (not entries or entries[-1] != previous):
        entries.append(previous)
    if not entries or entries[-1] != version:
        entries.append(version)
    client.set_registered_model_tag(name, tag, ",".join(entries))


def version_scores(tags: dict[str, str]) -> dict[str, float] | None:
    """Read the mean and per-region Dice that registration stored as version tags (None if absent)."""
    if "metric.mean_dice" not in tags:
        return None
    scores = {"mean_dice": float(tags["metric.mean_dice"])}
    for region in REGIONS:
        if f"metric.dice_{region}" in tags:
            scores[region] = float(tags[f"metric.dice_{region}"])
    return scores


def register(params: Params, root: Path = Path("."), allow_dirty: bool = False) -> dict[str, Any]:
    """Register the trained model with lineage tags and move the alias if it wins; returns the record written to disk."""
    import mlflow
    from mlflow import MlflowClient

    cfg = params.register
    git = git_state(root)
    if git["dirty"] and not (allow_dirty or cfg.allow_dirty):
        raise RegistrationError(
            f"uncommitted changes in {', '.join(git['dirty_files'][:5])}: commit them, "
            "or pass --allow-dirty (the diff is then logged with the model)"
        )
    metrics = json.loads(Path("metrics.json").read_text())
    checkpoint = Path(params.train.out_dir) / "checkpoint.pt"
    from unet.inference import load_checkpoint

    _, metadata = load_checkpoint(checkpoint)
    hashes = dvc_hashes(root, params.data.dir, params.preprocess.out_dir)
    lineage = {
        "git.commit": git["commit"] or "none",
        "git.dirty": str(git["dirty"]).lower(),
        "data.dvc_md5": hashes["data_md5"] or "none",
        "preprocessed.dvc_md5": hashes["preprocessed_md5"] or "none",
        "params.sha256": params_hash(params.to_dict()),
        "split.test": ",".join(metrics["split"]["test"]),
        "dvc.remote": dvc_remote_url(root) or "none",
        **{f"env.{k}": str(v) for k, v in environment().items()},
    }

    experiment_id = configure_mlflow(params.tracking)
    run_id = read_run_file(Path(params.train.out_dir))["run_id"]
    client = MlflowClient()
    with mlflow.start_run(run_id=run_id, experiment_id=experiment_id):
        mlflow.set_tags(lineage)
        with tempfile.TemporaryDirectory() as scratch:
            packages = Path(scratch) / "requirements-full.txt"
            packages.write_text("\n".join(installed_packages()) + "\n")
            mlflow.log_artifact(str(packages), artifact_path="environment")
            if git["dirty"]:
                diff = Path(scratch) / "uncommitted.diff"
                diff.write_text(git["diff"])
                mlflow.log_artifact(str(diff), artifact_path="lineage")
        info = log_model(checkpoint, metadata)
    version = mlflow.register_model(info.model_uri, cfg.model_name)
    new_scores = {"mean_dice": float(metrics["mean_dice"]), **{r: float(metrics[r]["dice_mean"]) for r in ("WT", "TC", "ET")}}
    for key, value in {**lineage, "run_id": run_id,
                       **{f"metric.{k}" if k == "mean_dice" else f"metric.dice_{k}": repr(v) for k, v in new_scores.items()}}.items():
        client.set_model_version_tag(cfg.model_name, version.version, key, value)
    client.set_registered_model_alias(cfg.model_name, CHALLENGER, version.version)

    current = None
    try:
        holder = client.get_model_version_by_alias(cfg.model_name, cfg.alias)
        current = {"version": holder.version, "split": holder.tags.get("split.test"),
                   **(version_scores(holder.tags) or {"mean_dice": -1.0})}
    except mlflow.exceptions.MlflowException:
        holder = None
    if current is not None and current["split"] != lineage["split.test"]:
        # Dice on different held-out cases is not comparable; a reviewer decides with `unet promote --force`.
        promote, reason = False, (f"version {current['version']} was evaluated on cases {current['split']}, "
                                  f"this one on {lineage['split.test']}; promote by hand if intended")
    else:
        promote, reason = decide_promotion(new_scores, current, cfg.min_improvement, cfg.max_region_drop)
    if promote:
        move_alias(client, cfg.model_name, cfg.alias, str(version.version), str(current["version"]) if current else None)
    client.set_model_version_tag(cfg.model_name, version.version, f"promotion.{cfg.alias}", "promoted" if promote else "rejected")
    client.set_model_version_tag(cfg.model_name, version.version, f"promotion.{cfg.alias}.reason", reason)
    log.info("registered %s version %s; %s %s: %s", cfg.model_name, version.version,
             cfg.alias, "moved to it" if promote else "unchanged", reason)

    record = {
        "model_name": cfg.model_name,
        "version": version.version,
        "model_uri": f"models:/{cfg.model_name}/{version.version}",
        "run_id": run_id,
        "alias": cfg.alias,
        "promoted": promote,
        "reason": reason,
        "previous_alias_version": current["version"] if current else None,
        "tracking_uri": mlflow.get_tracking_uri(),
        "lineage": {k: v for k, v in lineage.items() if not k.startswith("env.")},
        "scores": new_scores,
    }
    Path(cfg.out_file).write_text(json.dumps(record, indent=2) + "\n")
    return record

