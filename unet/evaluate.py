"""The evaluate stage, scoring of existing masks, and `unet predict` on new cases.

Predictions are written in each input's own geometry: same shape, affine and qform/sform
codes as the case's files, uint8, canonical labels (0 background, 1 NCR, 2 ED, 3 ET).
Scores are computed in that original geometry against the label file, with the voxel
spacing from its header.
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
from unet.inference import load_checkpoint, predict_volume, resolve_model
from unet.io import CaseFiles, discover_cases, load_volume, save_like, write_bytes_atomic
from unet.labels import REGIONS
from unet.preprocess import load_manifest, prepare_case, restore_geometry

log = logging.getLogger(__name__)

PER_CASE_FILE = "per_case.csv"
PER_CASE_COLUMNS = ("case_id", "region", "dice", "hd95_mm", "sensitivity", "specificity", "pred_volume_ml", "true_volume_ml")


def segment_case(model, metadata: dict[str, Any], case: CaseFiles, batch_size: int) -> tuple[np.ndarray, nib.Nifti1Image]:
    """Preprocess a case like training did, segment it and map the mask back to the input's geometry."""
    expected = list(metadata["modalities"])
    missing = [m for m in expected if m not in case.images]
    if missing:
        raise ValueError(f"case {case.case_id}: modality {missing[0]} is missing; the model expects {expected}")
    ordered = CaseFiles(case.case_id, {m: case.images[m] for m in expected}, None, case.mask, None)
    image, _, record = prepare_case(ordered, metadata.get("preprocessing", {}).get("margin", 0))
    labels = predict_volume(model, image, metadata["target"], batch_size, metadata.get("threshold", 0.5))
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


def score_files(prediction: Path, label: Path, penalty_mm: float) -> dict[str, dict[str, float]]:
    """Score one predicted mask file against one canonical label file (same grid required)."""
    from unet.metrics import score_case

    predicted, predicted_image = load_volume(prediction, dtype=np.uint8)
    true, true_image = load_volume(label, dtype=np.uint8)
    if not np.allclose(predicted_image.affine, true_image.affine, atol=1e-3):
        raise ValueError(f"{prediction.name}: affine differs from the label {label}; resample the prediction onto the label's grid")
    spacing = tuple(float(z) for z in true_image.header.get_zooms()[:3])
    return score_case(predicted, true, spacing, penalty_mm)


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

    scores: dict[str, dict[str, dict[str, float]]] = {}
    for case_id in tqdm(test_cases, desc="evaluate", unit="case"):
        case = by_id[case_id]
        mask, reference = segment_case(model, metadata, case, params.evaluate.batch_size)
        prediction = out_dir / f"{case_id}.nii.gz"
        save_like(mask, nib.load(str(case.label)) if case.label else reference, prediction, np.uint8)
        scores[case_id] = score_files(prediction, case.label, params.evaluate.hd95_penalty_mm)

    summary = summarize(scores)
    metrics = {"split": {"test": list(test_cases)}, **summary}
    write_bytes_atomic((json.dumps(metrics, indent=2) + "\n").encode(), Path("metrics.json"))
    write_per_case(Path(params.evaluate.report_dir) / PER_CASE_FILE, scores)
    log_to_mlflow(params, summary, test_cases)
    return metrics


def log_to_mlflow(params: Params, summary: dict[str, Any], test_cases: list[str]) -> None:
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


def predict(input_dir: Path, output_dir: Path, model_ref: str, spec: Path | None = None, batch_size: int = 16) -> dict[str, str]:
    """Segment every case under `input_dir` into OUTPUT/<case_id>.nii.gz; returns {case_id: error} for skipped cases."""
    from unet.ingest import detect_spec, load_spec, resolve_spec

    input_dir = Path(input_dir)
    if (input_dir / "dataset.yaml").is_file():
        _, cases = discover_cases(input_dir)
    else:
        cases = resolve_spec(load_spec(spec) if spec else detect_spec(input_dir), input_dir)
    model, metadata = load_checkpoint(resolve_model(model_ref))
    output_dir.mkdir(parents=True, exist_ok=True)
    failures: dict[str, str] = {}
    for case in tqdm(cases, desc="predict", unit="case"):
        try:
            mask, reference = segment_case(model, metadata, case, batch_size)
        except (ValueError, FileNotFoundError) as error:
            failures[case.case_id] = str(error)
            log.error("skipping case %s: %s", case.case_id, error)
            continue
        save_like(mask, reference, output_dir / f"{case.case_id}.nii.gz", np.uint8)
    return failures
