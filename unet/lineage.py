"""Lineage of a model: git commit and dirty state, DVC data hashes, params hash, environment."""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from unet.tools import dvc_command

log = logging.getLogger(__name__)

# Paths whose uncommitted changes make a model unreproducible from its commit. Files the
# pipeline writes itself (dvc.lock, metrics.json, reports, registration.json) are not listed.
SOURCE_PATHS = ("unet", "flows", "configs", "params.yaml", "dvc.yaml", "data.dvc", "pyproject.toml")


def _git(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)


def git_state(root: Path) -> dict[str, Any]:
    """Return {"commit", "dirty", "dirty_files", "diff"}; commit is None outside a git repository."""
    inside = _git(root, "rev-parse", "--is-inside-work-tree")
    if inside.returncode != 0:
        log.warning("%s is not inside a git repository: no commit is recorded", root)
        return {"commit": None, "dirty": False, "dirty_files": [], "diff": ""}
    head = _git(root, "rev-parse", "HEAD")
    if head.returncode != 0:
        log.warning("%s is a git repository without commits: no commit is recorded", root)
    commit = head.stdout.strip() if head.returncode == 0 else None
    status = _git(root, "status", "--porcelain", "--untracked-files=all", "--", *SOURCE_PATHS)
    dirty_files = sorted({line[3:].strip() for line in status.stdout.splitlines() if line.strip()})
    diff = _git(root, "diff", "HEAD", "--", *SOURCE_PATHS).stdout if dirty_files and commit else ""
    return {"commit": commit, "dirty": bool(dirty_files), "dirty_files": dirty_files, "diff": diff}


def dvc_hashes(root: Path, data_dir: str = "data", preprocessed_dir: str = "preprocessed") -> dict[str, str | None]:
    """Return the md5 of DATA from DATA.dvc and of the preprocessed output from dvc.lock (None where absent)."""
    hashes: dict[str, str | None] = {"data_md5": None, "preprocessed_md5": None}
    dvc_file = root / f"{data_dir}.dvc"
    if dvc_file.is_file():
        outs = (yaml.safe_load(dvc_file.read_text()) or {}).get("outs", [])
        hashes["data_md5"] = outs[0].get("md5") if outs else None
    lock = root / "dvc.lock"
    if lock.is_file():
        stage = ((yaml.safe_load(lock.read_text()) or {}).get("stages") or {}).get("preprocess") or {}
        for out in stage.get("outs", []):
            if out.get("path") == preprocessed_dir:
                hashes["preprocessed_md5"] = out.get("md5")
    return hashes


def dvc_remote_url(root: Path) -> str | None:
    result = subprocess.run(dvc_command("remote", "list"), cwd=root, capture_output=True, text=True)
    if result.returncode != 0 or not result.stdout.strip():
        return None
    default = subprocess.run(dvc_command("remote", "default"), cwd=root, capture_output=True, text=True).stdout.strip()
    remotes = dict(line.split(None, 1) for line in result.stdout.splitlines() if len(line.split(None, 1)) == 2)
    return remotes.get(default) or next(iter(remotes.values()), None)


def params_hash(params: dict[str, Any]) -> str:
    """sha256 of the params as canonical JSON (sorted keys), so equal settings give equal hashes."""
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()


def environment() -> dict[str, Any]:
    import torch

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "executable": sys.executable,
    }


def installed_packages() -> list[str]:
    """Return every installed distribution as `name==version`, sorted (the equivalent of `pip freeze`)."""
    return sorted({f"{d.metadata['Name']}=={d.version}" for d in metadata.distributions() if d.metadata["Name"]})
