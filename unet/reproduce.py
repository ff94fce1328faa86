"""`unet reproduce`: re-run the pipeline that made a registered model version and compare its metrics.

Steps:
1. Read the version's lineage tags and check out the recorded git commit in a temporary worktree.
2. Point that worktree's DVC at this repository's cache, then `dvc checkout` (or `dvc pull`) the data.
3. Run `dvc repro` with MLflow writing to a scratch SQLite store, so the reproduction does not
   register into the team's registry.
4. Compare Dice per region with the recorded values.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from unet.labels import REGIONS
from unet.registry import version_scores
from unet.tools import dvc_command, tool_environment

log = logging.getLogger(__name__)

# NOTE: an estimate, not a measured bound: how far Dice may move between runs that are not
# bit-for-bit deterministic (train.deterministic false, or GPU kernels). Pass --tolerance to override.
DEFAULT_TOLERANCE = 0.05


class ReproductionError(RuntimeError):
    """Raised when the recorded commit or data cannot be reached, or the pipeline fails."""


def _run(command: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)


def resolve_version(model_uri: str):
    """Return the ModelVersion a `models:/NAME/VERSION` or `models:/NAME@ALIAS` URI names."""
    from mlflow import MlflowClient

    if not model_uri.startswith("models:/"):
        raise ValueError(f"{model_uri!r} is not a model URI; use models:/NAME/VERSION or models:/NAME@ALIAS")
    reference = model_uri[len("models:/"):]
    client = MlflowClient()
    if "@" in reference:
        name, alias = reference.split("@", 1)
        return client.get_model_version_by_alias(name, alias)
    name, _, version = reference.partition("/")
    if not version:
        raise ValueError(f"{model_uri!r} names no version; use models:/NAME/VERSION or models:/NAME@ALIAS")
    return client.get_model_version(name, version)


def _checkout_data(worktree: Path, root: Path, data_md5: str, data_dir: str) -> None:
    """Check out DATA.dvc's data in the worktree from this repository's cache, or pull it from the remote."""
    cache = root / ".dvc" / "cache"
    _run(dvc_command("cache", "dir", "--local", str(cache)), worktree)
    # Only the data: the stage outputs are what the reproduction recomputes.
    target = f"{data_dir}.dvc"
    if _run(dvc_command("checkout", "--quiet", target), worktree).returncode == 0:
        return
    pulled = _run(dvc_command("pull", "--quiet", target), worktree)
    if pulled.returncode != 0:
        remote = _run(dvc_command("remote", "list"), worktree).stdout.strip() or "no remote configured"
        raise ReproductionError(
            f"data {data_md5} is neither in the DVC cache {cache} nor on the DVC remote ({remote}); "
            "run `dvc push` where the data was ingested, or ingest it again"
        )


def compare(recorded: dict[str, float], reproduced: dict[str, Any], tolerance: float) -> dict[str, dict[str, float]]:
    """Return {key: {recorded, reproduced, difference}} for mean Dice and each region recorded."""
    rows = {"mean_dice": (recorded["mean_dice"], float(reproduced["mean_dice"]))}
    for region in REGIONS:
        if region in recorded:
            rows[region] = (recorded[region], float(reproduced[region]["dice_mean"]))
    return {key: {"recorded": a, "reproduced": b, "difference": abs(a - b), "within_tolerance": abs(a - b) <= tolerance}
            for key, (a, b) in rows.items()}


def reproduce(model_uri: str, root: Path = Path("."), tolerance: float | None = None, keep: bool = False) -> dict[str, Any]:
    """Re-run the pipeline of a registered version; returns the comparison and whether it matched."""
    root = Path(root).resolve()
    version = resolve_version(model_uri)
    tags = version.tags
    commit = tags.get("git.commit", "none")
    recorded = version_scores(tags)
    if commit == "none":
        raise ReproductionError(f"{model_uri} records no git commit (registered outside a git repository); it cannot be reproduced")
    if recorded is None:
        raise ReproductionError(f"{model_uri} has no metric.mean_dice tag; it was not registered by `unet register`")
    if _run(["git", "cat-file", "-e", f"{commit}^{{commit}}"], root).returncode != 0:
        raise ReproductionError(
            f"commit {commit} recorded by {model_uri} is not in the git repository at {root}; "
            "fetch it (git fetch --all) or run from a clone that has it"
        )

    scratch = Path(tempfile.mkdtemp(prefix="unet-reproduce-"))
    worktree = scratch / "worktree"
    try:
        added = _run(["git", "worktree", "add", "--detach", str(worktree), commit], root)
        if added.returncode != 0:
            raise ReproductionError(f"cannot check out commit {commit} into {worktree}: {added.stderr.strip()}")
        data_dir = _recorded_params(worktree).data.dir
        _checkout_data(worktree, root, tags.get("data.dvc_md5", "?"), data_dir)

        env = tool_environment()  # the stages call `unet` by name
        env["MLFLOW_TRACKING_URI"] = f"sqlite:///{scratch / 'mlflow.db'}"
        # The stages must run the recorded commit's code, not the editable install of this checkout.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(worktree), env.get("PYTHONPATH")]))
        log.info("running dvc repro for %s at commit %s in %s", model_uri, commit[:12], worktree)
        # --no-run-cache: restoring outputs that DVC's run-cache saved earlier would not reproduce anything.
        repro = subprocess.run(dvc_command("repro", "--no-run-cache"), cwd=worktree, env=env)
        if repro.returncode != 0:
            raise ReproductionError(f"dvc repro failed at commit {commit} (exit code {repro.returncode}); see its output above")
        reproduced = json.loads((worktree / "metrics.json").read_text())

        deterministic = _recorded_params(worktree).train.deterministic
        if tolerance is None:
            tolerance = 0.0 if deterministic and tags.get("env.cuda_available") != "True" else DEFAULT_TOLERANCE
        rows = compare(recorded, reproduced, tolerance)
        return {"model_uri": model_uri, "commit": commit, "tolerance": tolerance, "deterministic": deterministic,
                "matched": all(row["within_tolerance"] for row in rows.values()), "comparison": rows,
                "worktree": str(worktree) if keep else None}
    finally:
        if not keep:
            _run(["git", "worktree", "remove", "--force", str(worktree)], root)
            shutil.rmtree(scratch, ignore_errors=True)


def _recorded_params(worktree: Path):
    from unet.config import load_params

    return load_params(worktree / "params.yaml")
