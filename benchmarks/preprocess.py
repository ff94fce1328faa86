"""Preprocessing throughput: `unet.preprocess.prepare_case` against the equivalent MONAI transform chain.

Both read the same four-modality sample cases from their NIfTI files and produce a RAS,
brain-cropped, per-modality z-scored (C, X, Y, Z) float32 array. MONAI's chain is
LoadImaged -> EnsureChannelFirstd -> Orientationd(RAS) -> CropForegroundd -> NormalizeIntensityd
(nonzero, channel_wise). Prints a markdown table: cases/s in one process for each, our
scaling with 2 worker processes, and our peak traced memory per case against the case's
uncompressed size.

Usage (from the project root):
    .venv/bin/python benchmarks/preprocess.py --samples ../shared/data/real [--repeats 3]
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import time
import tracemalloc
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from unet.ingest import load_spec, resolve_spec
from unet.io import CaseFiles
from unet.preprocess import prepare_case

SPEC = Path(__file__).resolve().parents[1] / "configs" / "datasets" / "demo.yaml"


def _ours(case: CaseFiles) -> tuple[int, ...]:
    image, _, _ = prepare_case(CaseFiles(case.case_id, case.images, case.label, case.mask, None))
    return image.shape


def _monai_chain():
    from monai.transforms import (Compose, CropForegroundd, EnsureChannelFirstd, LoadImaged, NormalizeIntensityd,
                                  Orientationd)

    return Compose([
        LoadImaged(keys=["image", "label"], image_only=True),
        EnsureChannelFirstd(keys=["image", "label"]),
        Orientationd(keys=["image", "label"], axcodes="RAS"),
        CropForegroundd(keys=["image", "label"], source_key="image"),
        NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True),
    ])


def _time(function, cases, repeats: int) -> float:
    """Return the best cases/s over `repeats` passes over all cases."""
    best = 0.0
    for _ in range(repeats):
        started = time.perf_counter()
        for case in cases:
            function(case)
        best = max(best, len(cases) / (time.perf_counter() - started))
    return best


def _time_workers(cases, workers: int, repeats: int) -> float:
    best = 0.0
    with ProcessPoolExecutor(max_workers=workers) as pool:
        list(pool.map(_ours, cases))  # start the workers and import everything once
        for _ in range(repeats):
            started = time.perf_counter()
            list(pool.map(_ours, cases))
            best = max(best, len(cases) / (time.perf_counter() - started))
    return best


def _peak_memory(case: CaseFiles) -> tuple[float, float]:
    """Return (peak traced MiB while preprocessing one case, its uncompressed MiB as stored on disk)."""
    import nibabel as nib

    stored = sum(np.prod(nib.load(str(p)).shape) * nib.load(str(p)).get_data_dtype().itemsize for p in case.images.values())
    tracemalloc.start()
    _ours(case)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak / 2**20, stored / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", default="../shared/data/real", help="folder with the sample cases")
    parser.add_argument("--repeats", type=int, default=3, help="passes over the cases; the best is reported")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")

    cases = resolve_spec(load_spec(SPEC), Path(args.samples))
    chain = _monai_chain()
    monai_inputs = [{"image": [str(p) for p in c.images.values()], "label": str(c.label)} for c in cases]
    for case in cases[:1]:  # warm up imports and file caches for both
        _ours(case)
        chain(monai_inputs[0])

    ours = _time(_ours, cases, args.repeats)
    monai = _time(chain, monai_inputs, args.repeats)
    two_workers = _time_workers(cases, 2, args.repeats)
    peak, stored = _peak_memory(cases[0])

    cpu = subprocess.run(["sh", "-c", "lscpu | sed -n 's/^Model name: *//p'"], capture_output=True, text=True).stdout.strip()
    import monai as monai_package
    import torch

    print(f"Machine: {cpu or platform.processor()}, {len(__import__('os').sched_getaffinity(0))} cores, "
          f"Python {platform.python_version()}, torch {torch.__version__}, MONAI {monai_package.__version__}")
    print(f"Command: .venv/bin/python benchmarks/preprocess.py --samples {args.samples} --repeats {args.repeats}")
    print(f"Cases: {len(cases)} four-modality cases of 240x240x155 voxels; best of {args.repeats} passes\n")
    print("| implementation | cases/s | ratio |")
    print("|---|---|---|")
    print(f"| MONAI chain, 1 process | {monai:.2f} | 1.00 |")
    print(f"| unet.preprocess, 1 process | {ours:.2f} | {ours / monai:.2f} |")
    print(f"| unet.preprocess, 2 worker processes | {two_workers:.2f} | {two_workers / monai:.2f} "
          f"(scaling efficiency {two_workers / (2 * ours):.2f}) |")
    print(f"\nPeak traced memory for one case: {peak:.0f} MiB = {peak / stored:.1f}x its uncompressed size on disk "
          f"({stored:.0f} MiB)")


if __name__ == "__main__":
    main()
