"""The evaluate stage, scoring of existing masks, and `unet predict` on new cases.

Predictions are written in each input's own geometry: same shape, affine and qform/sform
codes as the case's files, uint8, canonical labels (0 background, 1 NCR, 2 ED, 3 ET) unless
`predict` is asked for another label convention.
Scores are computed in that original geometry against the label file, with the voxel
spacing from its header.

`score_folders` scores any folder of masks against a folder of labels without a model, so
masks from other tools can be compared with the same metrics and tables.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from tqdm import tqdm

from unet.config import Params
from unet.inference import load_checkpoint, resolve_model, segment_volume
from unet.io import DATASET_FILE, NIFTI_SUFFIXES, CaseFiles, discover_cases, load_volume, save_like, strip_nifti_suffix, write_bytes_atomic
from unet.labels import REGIONS, LabelConvention, get_convention
from unet.preprocess import load_manifest, prepare_case, restore_geometry

log = logging.getLogger(__name__)

PER_CASE_FILE = "per_case.csv"
SUMMARY_FILE = "summary.json"
OVERLAY_DIR = "overlays"
PER_CASE_COLUMNS = ("case_id", "region", "dice", "hd95_mm", "sensitivity", "specificity", "pred_volume_ml", "true_volume_ml",
                    "lesion_dice", "lesion_hd95_mm")
MIRROR_AXES = (0, 1)
"""In-plane axes flipped by test-time mirroring (X and Y of each axial slice)."""


def segment_case(
    model, metadata: dict[str, Any], case: CaseFiles, batch_size: int, mirror_axes: tuple[int, ...] = ()
) -> tuple[np.ndarray, nib.Nifti1Image]:
    """Preprocess a case like training did, segment it and map the mask back to the input's geometry.

    Returns (canonical labels in the voxel layout of the case's files, uint8; the first image,
    whose header the mask should be saved with). `mirror_axes` enables test-time mirroring.
    """
    expected = list(metadata["modalities"])
    missing = [m for m in expected if m not in case.images or not Path(case.images[m]).is_file()]
    if missing:
        raise ValueError(f"case {case.case_id}: modality {missing[0]} is missing; the model expects {expected}")
    ordered = CaseFiles(case.case_id, {m: case.images[m] for m in expected}, None, case.mask, None)
    settings = metadata.get("preprocessing", {})
    image, _, record = prepare_case(ordered, settings.get("margin", 0), settings.get("target_spacing"))
    labels = segment_volume(model, image, metadata, batch_size, mirror_axes=mirror_axes)
    restored = restore_geometry(labels, record)
    reference = nib.load(str(next(iter(ordered.images.values()))))
    return restored, reference


def write_per_case(path: Path, scores: dict[str, dict[str, dict[str, float]]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    with temporary.open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(PER_CASE_COLUMNS)
        for case_id, regions in scores.items():
            for region in REGIONS:
                values = regions[region]
                writer.writerow([case_id, region, *(f"{values[c]:.6g}" for c in PER_CASE_COLUMNS[2:])])
    os.replace(temporary, path)


def score_files(
    prediction: Path,
    label: Path,
    penalty_mm: float,
    prediction_convention: LabelConvention | None = None,
    label_convention: LabelConvention | None = None,
) -> dict[str, dict[str, float]]:
    """Score one predicted mask file against one label file on the same grid; returns score_case's dict.

    Each file is mapped to canonical labels with its convention (canonical when None), which
    also rejects values outside that convention.
    """
    from unet.metrics import score_case

    canonical = get_convention("canonical")
    case_id = strip_nifti_suffix(Path(prediction).name)
    # Read as float so that the convention can reject non-integer values instead of truncating them.
    predicted, predicted_image = load_volume(prediction)
    true, true_image = load_volume(label)
    predicted = (prediction_convention or canonical).to_canonical(predicted, f"{case_id} (prediction {prediction})")
    true = (label_convention or canonical).to_canonical(true, f"{case_id} (label {label})")
    if predicted.shape != true.shape:
        raise ValueError(f"{prediction}: shape {predicted.shape} differs from the label {label} {true.shape}; "
                         "resample the prediction onto the label's grid")
    if not np.allclose(predicted_image.affine, true_image.affine, atol=1e-3):
        raise ValueError(f"{prediction}: affine differs from the label {label}; resample the prediction onto the label's grid")
    spacing = tuple(float(z) for z in true_image.header.get_zooms()[:3])
    return score_case(predicted, true, spacing, penalty_mm)


def mean_dice(regions: dict[str, dict[str, float]]) -> float:
    """Return the mean Dice over REGIONS of one case's scores."""
    return float(np.mean([regions[region]["dice"] for region in REGIONS]))


def extreme_cases(scores: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    """Return [best, worst] case ids by mean Dice over regions (one id when there is one case)."""
    ranked = sorted(scores, key=lambda case_id: (-mean_dice(scores[case_id]), case_id))
    return list(dict.fromkeys([ranked[0], ranked[-1]]))


def _index_masks(folder: Path, strip_seg: bool) -> dict[str, Path]:
    """Return {case_id: file} of the NIfTI files directly in `folder`; `strip_seg` drops a `_seg` suffix from ids."""
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or not path.name.endswith(NIFTI_SUFFIXES):
            continue
        case_id = strip_nifti_suffix(path.name)
        if strip_seg and case_id.endswith("_seg"):
            case_id = case_id[: -len("_seg")]
        if case_id in found:
            raise ValueError(f"{folder}: {found[case_id].name} and {path.name} both give case {case_id}; keep one of them")
        found[case_id] = path
    return found


def _index_labels(labels_dir: Path) -> tuple[dict[str, Path], bool]:
    """Return ({case_id: label file}, whether the labels are a canonical dataset and so already canonical)."""
    if (labels_dir / DATASET_FILE).is_file():
        _, cases = discover_cases(labels_dir)
        return {case.case_id: case.label for case in cases if case.label is not None}, True
    return _index_masks(labels_dir, strip_seg=True), False


def score_folders(
    predictions_dir: Path,
    labels_dir: Path,
    out_dir: Path,
    convention: str = "canonical",
    penalty_mm: float | None = None,
) -> tuple[dict[str, dict[str, dict[str, float]]], dict[str, str]]:
    """Score every `<case_id>.nii.gz` (or `.nii`) mask in `predictions_dir` against the label of the same case.

    `labels_dir` is a canonical dataset (dataset.yaml, labels at <case>/<case>_seg.nii.gz) or a
    flat folder of `<case_id>.nii.gz` / `<case_id>_seg.nii.gz` files. `convention` names the
    label convention of the predictions and of a flat label folder; a canonical dataset's
    labels are canonical already. `penalty_mm` is the HD95 for a region missing on one side
    (None: the BraTS default). Writes OUT/per_case.csv and OUT/summary.json when at least one
    case was scored. Returns (scores {case_id: score_case(...)}, {case_id: reason skipped}).
    """
    from unet.metrics import DEFAULT_HD95_PENALTY_MM, summarize

    penalty_mm = DEFAULT_HD95_PENALTY_MM if penalty_mm is None else penalty_mm

    predictions_dir, labels_dir, out_dir = Path(predictions_dir), Path(labels_dir), Path(out_dir)
    for name, folder in (("predictions", predictions_dir), ("labels", labels_dir)):
        if not folder.is_dir():
            raise FileNotFoundError(f"{name} folder {folder} not found; pass an existing folder of NIfTI files")
    source = get_convention(convention)
    predictions = _index_masks(predictions_dir, strip_seg=False)
    labels, labels_canonical = _index_labels(labels_dir)
    label_convention = None if labels_canonical else source

    skipped: dict[str, str] = {}
    for case_id in sorted(set(predictions) - set(labels)):
        skipped[case_id] = f"no label in {labels_dir}"
    unpredicted = sorted(set(labels) - set(predictions))
    if unpredicted:
        # Scoring a subset of a labelled dataset is normal, so these are reported, not failures.
        log.info("%d labelled case(s) have no prediction and are not scored: %s", len(unpredicted), ", ".join(unpredicted[:5]))
    scores: dict[str, dict[str, dict[str, float]]] = {}
    for case_id in tqdm(sorted(set(predictions) & set(labels)), desc="score", unit="case"):
        try:
            scores[case_id] = score_files(predictions[case_id], labels[case_id], penalty_mm, source, label_convention)
        except ValueError as error:
            skipped[case_id] = f"{error} (predictions are read in --label-convention {convention})"
    for case_id, reason in skipped.items():
        log.debug("skipped case %s: %s", case_id, reason)
    if scores:
        write_per_case(out_dir / PER_CASE_FILE, scores)
        summary = summarize(scores)
        write_bytes_atomic((json.dumps(summary, indent=2) + "\n").encode(), out_dir / SUMMARY_FILE)
    return scores, dict(sorted(skipped.items()))


def run(params: Params) -> dict[str, Any]:
    """Segment the held-out cases, write predictions, metrics.json and the per-case table, and log them to MLflow."""
    from unet.metrics import summarize

    manifest = load_manifest(Path(params.preprocess.out_dir))
    test_cases = manifest["split"]["test"]
    model, metadata = load_checkpoint(Path(params.train.out_dir) / "checkpoint.pt")
    _, cases = discover_cases(Path(params.data.dir))
    by_id = {case.case_id: case for case in cases}
    out_dir = Path(params.evaluate.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    mirror_axes = MIRROR_AXES if params.evaluate.tta_mirroring else ()
    scores: dict[str, dict[str, dict[str, float]]] = {}
    for case_id in tqdm(test_cases, desc="evaluate", unit="case"):
        case = by_id[case_id]
        mask, reference = segment_case(model, metadata, case, params.evaluate.batch_size, mirror_axes)
        prediction = out_dir / f"{case_id}.nii.gz"
        save_like(mask, nib.load(str(case.label)) if case.label else reference, prediction, np.uint8)
        scores[case_id] = score_files(prediction, case.label, params.evaluate.hd95_penalty_mm)

    summary = summarize(scores)
    metrics = {"split": {"test": list(test_cases)}, **summary}
    write_bytes_atomic((json.dumps(metrics, indent=2) + "\n").encode(), Path("metrics.json"))
    write_per_case(Path(params.evaluate.report_dir) / PER_CASE_FILE, scores)
    overlays = write_overlays(scores, by_id, out_dir, Path(params.evaluate.report_dir) / OVERLAY_DIR)
    log_to_mlflow(params, summary, test_cases, overlays)
    return metrics


def write_overlays(
    scores: dict[str, dict[str, dict[str, float]]], cases: dict[str, CaseFiles], predictions_dir: Path, overlay_dir: Path
) -> list[Path]:
    """Write OVERLAY_DIR/<case_id>.png for the best and the worst case by mean Dice; returns the files.

    PNGs left from an earlier run are removed first, so the folder only shows this run's cases.
    A case that cannot be drawn (no FLAIR or T1c image) is logged and left out, because the
    overlays only illustrate the scores.
    """
    from unet.overlays import overlay_case

    overlay_dir.mkdir(parents=True, exist_ok=True)
    for stale in overlay_dir.glob("*.png"):
        stale.unlink()
    written = []
    ranked = extreme_cases(scores)
    for rank, case_id in zip(("best", "worst"), ranked):
        case = cases[case_id]
        title = f"{case_id} ({rank if len(ranked) > 1 else 'only'} case): " + ", ".join(
            f"{region} Dice {scores[case_id][region]['dice']:.3f}" for region in REGIONS
        )
        try:
            written.append(overlay_case(case.images, case.label, predictions_dir / f"{case_id}.nii.gz",
                                        overlay_dir / f"{case_id}.png", title))
        except ValueError as error:
            log.warning("no overlay for case %s: %s", case_id, error)
    return written


def log_to_mlflow(params: Params, summary: dict[str, Any], test_cases: list[str], overlays: list[Path] | None = None) -> None:
    import mlflow

    from unet.tracking import configure_mlflow, read_run_file

    configure_mlflow(params.tracking)
    run_id = read_run_file(Path(params.train.out_dir))["run_id"]
    flat = {"test_mean_dice": summary["mean_dice"]}
    for region in REGIONS:
        flat[f"test_dice_{region}"] = summary[region]["dice_mean"]
        flat[f"test_hd95_{region}"] = summary[region]["hd95_mean"]
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics(flat)
        mlflow.set_tag("split.test", ",".join(test_cases))
        mlflow.log_artifact(str(Path(params.evaluate.report_dir) / PER_CASE_FILE), artifact_path="evaluation")
        mlflow.log_artifact("metrics.json", artifact_path="evaluation")
        for overlay in overlays or []:
            mlflow.log_artifact(str(overlay), artifact_path="overlays")


def predict(
    input_dir: Path,
    output_dir: Path,
    model_ref: str,
    spec: Path | None = None,
    batch_size: int = 16,
    label_convention: str = "auto",
    tta: bool = False,
) -> dict[str, str]:
    """Segment every case under `input_dir` into OUTPUT/<case_id>.nii.gz; returns {case_id: error} for skipped cases.

    Masks are written in `label_convention`: `auto` (the default) uses each case's own
    convention, known from its file naming (BraTS 2021 names: ET is 4; BraTS 2023 names: ET
    is 3), its dataset spec or the dataset.yaml of an ingested folder, and canonical labels
    where none is known; a convention name (for example `canonical`) applies to every case.
    `tta` averages the probabilities over mirrored copies of each slice (4 passes, about 4x slower).
    """
    from unet.ingest import detect_spec, load_spec, resolve_spec

    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise FileNotFoundError(f"input folder {input_dir} not found; pass the folder that contains the cases")
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"output {output_dir} is a file; pass a folder for the masks")
    if (input_dir / "dataset.yaml").is_file():
        info, cases = discover_cases(input_dir)
        own = {case.case_id: info.source_conventions.get(case.case_id) for case in cases}
    else:
        dataset_spec = load_spec(spec) if spec else detect_spec(input_dir)
        cases = resolve_spec(dataset_spec, input_dir)
        own = {case.case_id: case.label_convention.name if case.label_convention else dataset_spec.label_convention
               for case in cases}
    forced = None if label_convention == "auto" else get_convention(label_convention)
    model, metadata = load_checkpoint(resolve_model(model_ref))
    output_dir.mkdir(parents=True, exist_ok=True)
    failures: dict[str, str] = {}
    for case in tqdm(cases, desc="predict", unit="case"):
        try:
            mask, reference = segment_case(model, metadata, case, batch_size, MIRROR_AXES if tta else ())
        except (ValueError, FileNotFoundError) as error:
            failures[case.case_id] = str(error)
            log.error("skipping case %s: %s", case.case_id, error)
            continue
        convention = forced or get_convention(own.get(case.case_id) or "canonical")
        log.info("case %s: labels written in the %s convention", case.case_id, convention.name)
        save_like(convention.from_canonical(mask), reference, output_dir / f"{case.case_id}.nii.gz", np.uint8)
    return failures
