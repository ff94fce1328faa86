"""Serve the deployments of prefect.yaml from this machine, without a work pool or worker.

    python -m flows.serve --source /path/to/new/cases [--project-dir .] [--no-schedules]

Each deployment in prefect.yaml is served as `<name>-local`, so that serving against a
shared server never replaces a work-pool deployment. Flow, schedules and parameters stay
the same with three exceptions. `project_dir` is this machine's checkout and `source` is
--source. The pool's topology is dropped, so params.yaml alone decides nnodes and
nproc_per_node.
Runs go to the server PREFECT_API_URL names, or to Prefect's local server when it is unset.
Stop with Ctrl-C.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import os
import sys
from pathlib import Path
from typing import Any

import yaml
from prefect import serve
from prefect.deployments.runner import EntrypointType, RunnerDeployment
from prefect.schedules import Cron, Interval, RRule, Schedule
from prefect.utilities.templating import apply_values

from flows.pipeline import TOPOLOGY_KEYS

PREFECT_FILE = Path(__file__).resolve().parents[1] / "prefect.yaml"
LOCAL_SUFFIX = "-local"


def _schedule(entry: dict[str, Any]) -> Schedule:
    """Convert a prefect.yaml schedule item (cron, interval in seconds, or rrule) to a Schedule."""
    options = {key: entry[key] for key in ("timezone", "active") if key in entry}
    if "cron" in entry:
        return Cron(entry["cron"], **options)
    if "interval" in entry:
        return Interval(entry["interval"], **options)
    if "rrule" in entry:
        return RRule(entry["rrule"], **options)
    raise ValueError(f"{PREFECT_FILE}: schedule {entry} has no cron, interval or rrule; add one")


def _localise(parameters: dict[str, Any], project_dir: Path, source: str) -> dict[str, Any]:
    """Return a copy of a deployment's parameters adapted to this machine (see the module docstring)."""
    config = copy.deepcopy(parameters.get("config") or {})
    config["project_dir"] = str(project_dir)
    for settings in (config, config.get("ingest") or {}, config.get("train") or {}):
        if "source" in settings:
            settings["source"] = source
        for key in TOPOLOGY_KEYS:
            settings.pop(key, None)
    return {**parameters, "config": config}


def _load_flow(entrypoint: str):
    """Import the flow an entrypoint such as `flows/pipeline.py:train_flow` names, from the installed package `flows`."""
    path, name = entrypoint.split(":")
    module = importlib.import_module(Path(path).with_suffix("").as_posix().replace("/", "."))
    return getattr(module, name)


def local_deployments(project_dir: Path, source: str, schedules: bool = True,
                      prefect_file: Path = PREFECT_FILE) -> list[RunnerDeployment]:
    """Build the deployments of `prefect_file`, adapted to run on this machine."""
    spec = yaml.safe_load(prefect_file.read_text())
    deployments = []
    for entry in spec.get("deployments", []):
        entry = apply_values(copy.deepcopy(entry), os.environ, remove_notset=False)
        flow = _load_flow(entry["entrypoint"])
        deployments.append(flow.to_deployment(
            name=entry["name"] + LOCAL_SUFFIX,
            description=entry.get("description"),
            tags=[*entry.get("tags", []), "local"],
            parameters=_localise(entry.get("parameters", {}), project_dir.resolve(), source),
            schedules=[_schedule(item) for item in entry.get("schedules") or []] if schedules else None,
            entrypoint_type=EntrypointType.MODULE_PATH,
        ))
    return deployments


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default=os.environ.get("UNET_INGEST_SOURCE"),
                        help="folder or s3://bucket/prefix with new cases (default: $UNET_INGEST_SOURCE)")
    parser.add_argument("--project-dir", type=Path, default=Path("."), help="root of the git + DVC checkout (default: .)")
    parser.add_argument("--no-schedules", action="store_true", help="serve for manual runs only")
    args = parser.parse_args(argv)
    if not args.source:
        parser.error("pass --source FOLDER_OR_S3_URI or set UNET_INGEST_SOURCE")
    # A relative folder means one relative to where this command runs, not to the project.
    source = args.source if "://" in args.source else str(Path(args.source).resolve())
    if not (args.project_dir / "dvc.yaml").is_file():
        parser.error(f"{args.project_dir.resolve()} has no dvc.yaml; pass --project-dir with the project's root")
    serve(*local_deployments(args.project_dir, source, schedules=not args.no_schedules))
    return 0


if __name__ == "__main__":
    sys.exit(main())
