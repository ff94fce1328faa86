"""Preprocessing: RAS orientation, crop to the brain, per-modality z-score; and its inverse.

Order of operations per case, and why:
1. Reorient every file to RAS+ (a permutation and flips of the voxel axes; no resampling), so
   2D slices along the last axis are axial for every source orientation.
2. Crop to the bounding box of the brain (a given brain mask, else voxels that are non-zero in
   any modality), which removes about half of the voxels of a skull-stripped BraTS volume.
3. Z-score each modality with the mean and standard deviation of the brain voxels only, since
   the background would dominate the statistics; voxels outside the brain are set to 0.
4. Optionally resample to `preprocess.target_spacing`: linear for images, nearest for labels.
   Normalising before resampling keeps interpolation from mixing brain and background
   statistics, as nnU-Net does.

The inverse (`restore_geometry`) undoes these in reverse: resamples back to the crop's
shape (nearest for labels), pads the crop back to the RAS shape, then undoes the
reorientation, which gives exactly the array layout of the original files.

Output per case in OUT/<case_id>/: `image.npy` float32 (C, X, Y, Z) in the channel order of
dataset.yaml and `label.npy` uint8 (X, Y, Z) in canonical labels, both memory-mappable;
OUT/manifest.json records geometry, statistics, hashes, settings and the split.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from unet.config import Params, load_params
from unet.io import CaseFiles, axis_codes, discover_cases, invert_orientation, load_volume, orientation_to_ras, reorient, write_bytes_atomic

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"


def brain_bounding_box(mask: np.ndarray, margin: int = 0) -> list[list[int]]:
    """Return [[start, stop], ...] per axis of the non-zero voxels of `mask`, widened by `margin` and clipped to the array."""
    if not mask.any():
        raise ValueError("brain mask is empty")
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        present = np.flatnonzero(mask.any(axis=other))
        box.append([max(int(present[0]) - margin, 0), min(int(present[-1]) + 1 + margin, mask.shape[axis])])
    return box


def zscore_in_mask(
    image: np.ndarray, mask: np.ndarray, out: np.ndarray | None = None, zero_outside: bool = False
) -> tuple[np.ndarray, float, float]:
    """Z-score `image` with the mean and standard deviation of the voxels inside `mask`; voxels outside become 0.

    Writes into `out` (float32, same shape) when given, so a caller can fill a preallocated
    channel without temporary full-size copies. Statistics are accumulated in float64.
    `zero_outside=True` promises that `image` is 0 wherever `mask` is False (true when the
    mask is "non-zero in any modality"), so whole-array sums give the statistics without
    copying the brain voxels out first.
    """
    if zero_outside:
        count = int(np.count_nonzero(mask))
        mean = float(image.sum(dtype=np.float64)) / count
        mean_of_squares = float(np.square(image, dtype=np.float64).sum()) / count
        std = float(np.sqrt(max(mean_of_squares - mean * mean, 0.0)))
    else:
        values = image[mask]
        mean = float(values.mean(dtype=np.float64))
        std = float(values.std(dtype=np.float64))
    if std == 0.0:
        raise ValueError("modality is constant inside the brain")
    if out is None:
        out = np.empty(image.shape, dtype=np.float32)
    np.subtract(image, mean, out=out, casting="unsafe")
    out /= std
    np.multiply(out, mask, out=out)
    return out, mean, std


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def resample(array: np.ndarray, shape: tuple[int, ...], order: int) -> np.ndarray:
    """Resample the last three axes of (X, Y, Z) or (C, X, Y, Z) to exactly `shape` (order 0 nearest, 1 linear)."""
    from scipy import ndimage

    spatial = array.shape[-3:]
    factors = [target / size for target, size in zip(shape, spatial)]
    if array.ndim == 3:
        return ndimage.zoom(array, factors, order=order, mode="nearest", grid_mode=True)
    return np.stack([ndimage.zoom(channel, factors, order=order, mode="nearest", grid_mode=True) for channel in array])


def prepare_case(
    case: CaseFiles, margin: int = 0, target_spacing: tuple[float, ...] | None = None
) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """Preprocess one case in memory; returns (image (C, X, Y, Z) float32, label (X, Y, Z) uint8 or None, record).

    The record contains what `restore_geometry` needs to map arrays back to the original files.
    Volumes stay in their stored data type and are reoriented as views; only the cropped
    region is converted to float32, which keeps peak memory near the case's stored size
    plus the output.
    """
    # zlib releases the GIL, so threads decompress a case's files in parallel even in one process.
    paths = list(case.images.values())
    dtypes: list[type | None] = [None] * len(paths)  # modalities keep their stored data type
    if case.label is not None:
        paths.append(case.label)
        dtypes.append(np.uint8)
    if case.mask is not None:
        paths.append(case.mask)
        dtypes.append(np.float32)
    with ThreadPoolExecutor(max_workers=len(paths)) as pool:
        loaded = list(pool.map(load_volume, paths, dtypes))
    reference = loaded[0][1]
    affine = reference.affine
    transform = orientation_to_ras(affine)
    volumes = [reorient(array, transform) for array, _ in loaded[: len(case.images)]]  # (X, Y, Z) in RAS, views
    label_array = loaded[len(case.images)][0] if case.label else None
    mask_array = loaded[-1][0] if case.mask else None
    del loaded

    if mask_array is not None:
        brain = reorient(mask_array, transform) > 0.5
    else:
        brain = volumes[0] != 0
        for volume in volumes[1:]:
            brain |= volume != 0
    box = brain_bounding_box(brain, margin)
    crop = tuple(slice(start, stop) for start, stop in box)
    brain = brain[crop]

    image = np.empty((len(volumes), *brain.shape), dtype=np.float32)
    stats = {}
    for channel, (modality, volume) in enumerate(zip(case.images, volumes)):
        _, mean, std = zscore_in_mask(volume[crop], brain, out=image[channel], zero_outside=case.mask is None)
        stats[modality] = {"mean": mean, "std": std}
    del volumes

    label = None
    if label_array is not None:
        label = np.ascontiguousarray(reorient(label_array, transform)[crop])

    ras_affine = affine @ _orientation_affine(transform, reference.shape[:3])
    spacing = [float(z) for z in np.sqrt((ras_affine[:3, :3] ** 2).sum(axis=0))]
    cropped_shape = list(brain.shape)
    if target_spacing is not None:
        resampled_shape = tuple(max(1, round(size * own / float(target)))
                                for size, own, target in zip(cropped_shape, spacing, target_spacing))
        image = resample(image, resampled_shape, order=1)
        if label is not None:
            label = resample(label, resampled_shape, order=0)
    sources = {**case.images, **({"label": case.label} if case.label else {}), **({"mask": case.mask} if case.mask else {})}
    record = {
        "original_shape": [int(s) for s in reference.shape[:3]],
        "original_affine": affine.tolist(),
        "original_orientation": axis_codes(affine),
        "ras_transform": transform.tolist(),
        "ras_shape": _reoriented_shape(reference.shape[:3], transform),
        "crop_box": box,
        "cropped_shape": cropped_shape,
        "original_spacing_mm": spacing,
        "spacing_mm": [float(v) for v in target_spacing] if target_spacing is not None else spacing,
        "shape": [int(s) for s in image.shape],
        "has_label": label is not None,
        "intensity": stats,
        # Hashes of the input files; DVC hashes the outputs.
        "source_sha256": {role: _sha256_file(path) for role, path in sources.items()},
        "tumour_voxels": int(np.count_nonzero(label)) if label is not None else 0,
    }
    return image, label, record


def preprocess_case(
    case: CaseFiles, out_dir: Path, margin: int = 0, target_spacing: tuple[float, ...] | None = None
) -> dict[str, Any]:
    """Preprocess one case into OUT/<case_id>/ (written atomically) and return its manifest record."""
    image, label, record = prepare_case(case, margin, target_spacing)
    staging = out_dir / f".{case.case_id}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    np.save(staging / "image.npy", image)
    if label is not None:
        np.save(staging / "label.npy", label)
    final = out_dir / case.case_id
    shutil.rmtree(final, ignore_errors=True)
    staging.rename(final)
    return record


def _reoriented_shape(shape: tuple[int, ...], transform: np.ndarray) -> list[int]:
    ras_shape = [0, 0, 0]
    for axis, (target_axis, _) in enumerate(transform):
        ras_shape[int(target_axis)] = int(shape[axis])
    return ras_shape


def _orientation_affine(transform: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    from nibabel.orientations import inv_ornt_aff

    return inv_ornt_aff(transform, shape)


def restore_geometry(array: np.ndarray, record: dict[str, Any], fill: float = 0) -> np.ndarray:
    """Undo the resampling, the crop and the reorientation of `preprocess_case`.

    `array` is (X, Y, Z) or (C, X, Y, Z) in the preprocessed grid; the result has the
    original file's voxel layout, ready to save with its affine. Integer arrays (labels) are
    resampled with nearest neighbours, floating-point ones linearly.
    """
    cropped_shape = tuple(record.get("cropped_shape", array.shape[-3:]))
    if tuple(array.shape[-3:]) != cropped_shape:
        order = 1 if np.issubdtype(array.dtype, np.floating) else 0
        array = resample(array, cropped_shape, order)
    ras_shape = tuple(record["ras_shape"])
    crop = tuple(slice(start, stop) for start, stop in record["crop_box"])
    leading = array.shape[:-3]
    full = np.full(leading + ras_shape, fill, dtype=array.dtype)
    full[(..., *crop)] = array
    inverse = invert_orientation(np.asarray(record["ras_transform"]))
    return reorient(full, inverse)


def resolve_split(params: Params, dataset_split: dict[str, list[str]], labelled: list[str]) -> dict[str, list[str]]:
    """Return {train, val, test} case ids: params override the split recorded in dataset.yaml."""
    test = list(params.data.test_cases or dataset_split.get("test", []))
    val = list(params.data.val_cases or dataset_split.get("val", []))
    unknown = [c for c in test + val if c not in labelled]
    if unknown:
        raise ValueError(
            f"split case '{unknown[0]}' is not a labelled case of the dataset (labelled: {labelled}); "
            "fix data.test_cases / data.val_cases in params.yaml or the split in the dataset spec"
        )
    if not test:
        raise ValueError("no held-out test case: set data.test_cases in params.yaml or split.test in the dataset spec")
    train = [c for c in labelled if c not in test and c not in val]
    if not train:
        raise ValueError("every labelled case is held out; leave at least one for training")
    return {"train": train, "val": val, "test": test}


def _worker(args: tuple[CaseFiles, Path, int, tuple[float, ...] | None]) -> tuple[str, dict[str, Any] | None, str | None]:
    case, out_dir, margin, target_spacing = args
    try:
        return case.case_id, preprocess_case(case, out_dir, margin, target_spacing), None
    except ValueError as error:
        return case.case_id, None, str(error)


def run(params: Params, strict: bool = False) -> dict[str, Any]:
    """Preprocess every valid case of params.data.dir into params.preprocess.out_dir and write the manifest."""
    from unet.validate import validate_case

    data_dir = Path(params.data.dir)
    out_dir = Path(params.preprocess.out_dir)
    info, cases = discover_cases(data_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    skipped: dict[str, list[str]] = {}
    valid: list[CaseFiles] = []
    for case in cases:
        problems = validate_case(case)
        if problems:
            if strict:
                raise ValueError(str(problems[0]))
            skipped[case.case_id] = [str(p) for p in problems]
            for problem in problems:
                log.error("skipping case %s: %s", case.case_id, problem)
        else:
            valid.append(case)

    records: dict[str, Any] = {}
    jobs = [(case, out_dir, params.preprocess.margin, params.preprocess.target_spacing) for case in valid]
    progress = tqdm(total=len(jobs), desc="preprocess", unit="case")
    if params.preprocess.num_workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=params.preprocess.num_workers) as pool:
            results = list(_progress(pool.map(_worker, jobs), progress))
    else:
        results = list(_progress(map(_worker, jobs), progress))
    progress.close()
    for case_id, record, error in results:
        if error is not None:
            if strict:
                raise ValueError(f"{case_id}: {error}")
            skipped[case_id] = [error]
            log.error("skipping case %s: %s", case_id, error)
        else:
            records[case_id] = record

    labelled = sorted(c for c, r in records.items() if r["has_label"])
    split = resolve_split(params, info.split, labelled)
    manifest = {
        "dataset": info.name,
        "modalities": info.modalities,
        "settings": {"orientation": "RAS", "crop": "brain bounding box", "normalisation": "z-score inside brain",
                     "margin": params.preprocess.margin,
                     "target_spacing": list(params.preprocess.target_spacing) if params.preprocess.target_spacing else None},
        "split": split,
        "cases": dict(sorted(records.items())),
        "skipped": skipped,
    }
    write_bytes_atomic((json.dumps(manifest, indent=2) + "\n").encode(), out_dir / MANIFEST_FILE)
    for stale in sorted(p for p in out_dir.iterdir() if p.is_dir() and p.name not in records):
        shutil.rmtree(stale)
    log.info("preprocessed %d cases into %s (train %d, val %d, test %d; skipped %d)", len(records), out_dir,
             len(split["train"]), len(split["val"]), len(split["test"]), len(skipped))
    return manifest


def _progress(iterable, bar):
    for item in iterable:
        bar.update(1)
        yield item


def load_manifest(out_dir: Path) -> dict[str, Any]:
    path = Path(out_dir) / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; run the preprocess stage first (`unet preprocess`)")
    return json.loads(path.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="unet preprocess", description="Reorient, crop and normalise the ingested cases.")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--strict", action="store_true", help="fail on the first invalid case instead of skipping it")
    args = parser.parse_args(argv)
    run(load_params(args.params), strict=args.strict)
    return 0
