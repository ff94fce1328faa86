"""The main job (`make demo`): ingest sample cases, run the DVC pipeline, report where everything went."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from unet.cli import QUIET_ENVIRONMENT, print_dice_table
from unet.tools import dvc_command, tool_environment


def _step(title: str) -> float:
    print(f"\n==> {title}", flush=True)
    return time.perf_counter()


def _run(command: list[str]) -> None:
    print("$ " + " ".join(command), flush=True)
    result = subprocess.run(command, env=tool_environment())
    if result.returncode != 0:
        raise SystemExit(f"error: `{' '.join(command)}` failed with exit code {result.returncode}; see its output above")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m unet.demo", description=__doc__)
    parser.add_argument("--samples", required=True, help="folder with the sample cases (../shared/data/real)")
    parser.add_argument("--spec", default="configs/datasets/demo.yaml", help="dataset spec of the samples")
    parser.add_argument("--data", default="data", help="destination of the ingested cases (default: data)")
    args = parser.parse_args(argv)
    for key, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(key, value)

    samples = Path(args.samples)
    if not samples.is_dir():
        print(f"error: sample folder {samples} not found; pass SAMPLES=/path/to/cases (see README)", file=sys.stderr)
        return 1
    timings = {}
    started = _step(f"ingest {samples} -> {args.data}/ ({args.spec})")
    _run([sys.executable, "-m", "unet.cli", "ingest", str(samples), args.data, "--spec", args.spec])
    timings["ingest"] = time.perf_counter() - started

    changed = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", f"{args.data}.dvc"]).returncode != 0
    if changed:
        # Lineage would point at a commit whose data.dvc differs; register only records it as dirty.
        print(f"note: {args.data}.dvc differs from the committed one; commit it to register a clean lineage "
              "(this run registers with --allow-dirty)")
        os.environ["UNET_ALLOW_DIRTY"] = "1"

    started = _step("dvc repro (preprocess -> train -> evaluate -> register)")
    _run(dvc_command("repro"))
    timings["dvc repro"] = time.perf_counter() - started

    metrics = json.loads(Path("metrics.json").read_text())
    registration = json.loads(Path("registration.json").read_text())
    print("\n==> results")
    print_dice_table(metrics)
    print(f"\n  data (DVC-tracked)      {args.data}/  hash {registration['lineage']['data.dvc_md5']} in {args.data}.dvc")
    print("  preprocessed cache      preprocessed/")
    print("  model checkpoint        model/checkpoint.pt")
    print("  predictions (NIfTI)     predictions/")
    print("  metrics                 metrics.json, reports/per_case.csv, reports/train_history.csv")
    print("  overlays (PNG)          reports/overlays/")
    print(f"  MLflow                  {registration['tracking_uri']}, artifacts in mlartifacts/")
    print(f"                          browse: .venv/bin/mlflow ui --backend-store-uri {registration['tracking_uri']}")
    print(f"  registered model        {registration['model_uri']} (run {registration['run_id']})")
    status = "now points at it" if registration["promoted"] else "unchanged"
    print(f"  alias {registration['alias']:<17} {status}: {registration['reason']}")
    print(f"  lineage                 git {registration['lineage']['git.commit']} (dirty: {registration['lineage']['git.dirty']})")
    print("\n  timings: " + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in timings.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
