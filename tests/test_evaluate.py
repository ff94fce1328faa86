"""Scoring folders of masks, lesion-wise metrics, test-time mirroring, export conventions and overlays.

Masks are derived from the label of a real case (a crop of BraTS2021_00006) into tmp_path;
lesion-wise values are checked on tiny hand-built volumes.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

from unet.cli import main
from unet.evaluate import PER_CASE_COLUMNS
from unet.inference import predict_volume
from unet.io import DatasetInfo, save_like, write_dataset
from unet.metrics import DEFAULT_HD95_PENALTY_MM, lesion_wise_scores
from unet.model import UNet
from unet.overlays import overlay_case, pick_slices

CASE = "BraTS2021_00006"
MODALITY_FILES = {"t1": "t1", "t1c": "t1ce", "t2": "t2", "flair": "flair"}


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as stream:
        return list(csv.DictReader(stream))


def region_row(rows: list[dict[str, str]], case_id: str, region: str) -> dict[str, str]:
    return next(row for row in rows if row["case_id"] == case_id and row["region"] == region)


@pytest.fixture(scope="module")
def label_files(cropped_source: Path) -> tuple[np.ndarray, nib.Nifti1Image]:
    """The cropped real label in its BraTS 2017-2022 values (0, 1, 2, 4) and its image."""
    image = nib.load(str(cropped_source / CASE / f"{CASE}_seg.nii.gz"))
    return np.asarray(image.dataobj).astype(np.uint8), image


def canonical(label: np.ndarray) -> np.ndarray:
    return np.where(label == 4, 3, label).astype(np.uint8)


def eroded(labels: np.ndarray) -> np.ndarray:
    """Keep the labels only inside the whole tumour eroded by two voxels."""
    inner = ndimage.binary_erosion(labels > 0, iterations=2)
    return np.where(inner, labels, 0).astype(np.uint8)


def write_folders(root: Path, label_files, cases: dict[str, np.ndarray]) -> tuple[Path, Path]:
    """Write root/labels/<case>_seg.nii.gz (canonical) and root/predictions/<case>.nii.gz for each case."""
    label, reference = label_files
    labels, predictions = root / "labels", root / "predictions"
    labels.mkdir(parents=True)
    predictions.mkdir(parents=True)
    for case_id, prediction in cases.items():
        save_like(canonical(label), reference, labels / f"{case_id}_seg.nii.gz")
        save_like(prediction, reference, predictions / f"{case_id}.nii.gz")
    return predictions, labels


def score(predictions: Path, labels: Path, out: Path, *extra: str) -> tuple[int, str]:
    """Run `unet evaluate --predictions ...`; returns (exit code, stderr)."""
    errors = io.StringIO()
    with contextlib.redirect_stderr(errors):
        code = main(["evaluate", "--predictions", str(predictions), "--labels", str(labels), "-o", str(out), *extra])
    return code, errors.getvalue()


@pytest.fixture(scope="module")
def scored(tmp_path_factory, label_files) -> dict:
    """An eroded copy of the label as CASE and an identical copy as case `copy`, scored once."""
    root = tmp_path_factory.mktemp("scored")
    label = canonical(label_files[0])
    predictions, labels = write_folders(root, label_files, {CASE: eroded(label), "copy": label})
    code, errors = score(predictions, labels, root / "out")
    return {"code": code, "errors": errors, "rows": read_rows(root / "out" / "per_case.csv"),
            "summary": json.loads((root / "out" / "summary.json").read_text()), "out": root / "out",
            "predictions": predictions, "labels": labels}


@pytest.fixture(scope="module")
def scored_mismatch(tmp_path_factory, label_files) -> dict:
    """Case `copy` has a label but no prediction, case `extra` a prediction but no label."""
    root = tmp_path_factory.mktemp("mismatch")
    label = canonical(label_files[0])
    predictions, labels = write_folders(root, label_files, {CASE: label, "copy": label})
    (predictions / "copy.nii.gz").rename(predictions / "extra.nii.gz")
    code, errors = score(predictions, labels, root / "out")
    return {"code": code, "errors": errors, "rows": read_rows(root / "out" / "per_case.csv")}


# --- scoring folders without a model --------------------------------------------------------


def test_score_exit_0(scored):
    assert scored["code"] == 0


def test_score_identical_dice_one(scored):
    assert {float(row["dice"]) for row in scored["rows"] if row["case_id"] == "copy"} == {1.0}


def test_score_identical_hd95_zero(scored):
    assert {float(row["hd95_mm"]) for row in scored["rows"] if row["case_id"] == "copy"} == {0.0}


def test_score_eroded_dice_between(scored):
    assert 0.0 < float(region_row(scored["rows"], CASE, "WT")["dice"]) < 1.0


def test_score_eroded_hd95_positive(scored):
    assert float(region_row(scored["rows"], CASE, "WT")["hd95_mm"]) > 0.0


def test_score_columns(scored):
    with (scored["out"] / "per_case.csv").open() as stream:
        assert tuple(next(csv.reader(stream))) == PER_CASE_COLUMNS


def test_score_columns_start():
    assert PER_CASE_COLUMNS[:4] == ("case_id", "region", "dice", "hd95_mm")


def test_score_summary_cases(scored):
    assert scored["summary"]["num_cases"] == 2


def test_score_lesion_columns(scored):
    assert float(region_row(scored["rows"], "copy", "ET")["lesion_dice"]) == 1.0


def test_score_mismatch_exit_1(scored_mismatch):
    assert scored_mismatch["code"] == 1


def test_score_missing_prediction_not_skipped(scored_mismatch):
    # Scoring a subset of the labelled cases is normal: logged, not counted as a skipped case.
    assert "skipped copy" not in scored_mismatch["errors"]


def test_score_missing_label_named(scored_mismatch):
    assert "skipped extra: no label" in scored_mismatch["errors"]


def test_score_mismatch_others_scored(scored_mismatch):
    assert {row["case_id"] for row in scored_mismatch["rows"]} == {CASE}


@pytest.fixture(scope="module")
def brats2017_folders(tmp_path_factory, label_files) -> tuple[Path, Path]:
    """The label in its BraTS 2017-2022 values (ET = 4) as both prediction and label."""
    label, reference = label_files
    root = tmp_path_factory.mktemp("brats2017")
    for folder in ("labels", "predictions"):
        (root / folder).mkdir()
        save_like(label, reference, root / folder / f"{CASE}.nii.gz")
    return root / "predictions", root / "labels"


def test_score_brats2017_convention(brats2017_folders, label_files, tmp_path):
    score(*brats2017_folders, tmp_path, "--label-convention", "brats2017")
    rows = read_rows(tmp_path / "per_case.csv")
    # ET is label 4 in these files: it is only found if the convention maps it to canonical 3.
    # The crop has 1 mm voxels, so 1000 voxels make 1 ml.
    expected_ml = np.count_nonzero(label_files[0] == 4) / 1000
    assert float(region_row(rows, CASE, "ET")["true_volume_ml"]) == pytest.approx(expected_ml)


def test_score_brats2017_without_flag_exit_1(brats2017_folders, tmp_path):
    assert score(*brats2017_folders, tmp_path)[0] == 1


def test_score_brats2017_without_flag_names_value(brats2017_folders, tmp_path):
    assert "label values 4" in score(*brats2017_folders, tmp_path)[1]


def test_score_canonical_dataset_labels(scored, tmp_path):
    dataset = tmp_path / "dataset"
    (dataset / "copy").mkdir(parents=True)
    shutil.copy(scored["labels"] / "copy_seg.nii.gz", dataset / "copy" / "copy_seg.nii.gz")
    write_dataset(dataset, DatasetInfo("crop", ["t1", "t1c", "t2", "flair"], ["copy"]))
    predictions = tmp_path / "predictions"
    predictions.mkdir()
    shutil.copy(scored["predictions"] / "copy.nii.gz", predictions / "copy.nii.gz")
    assert score(predictions, dataset, tmp_path / "out")[0] == 0


def test_score_needs_labels(tmp_path):
    assert main(["evaluate", "--predictions", str(tmp_path), "-o", str(tmp_path / "out")]) == 2


# --- lesion-wise Dice and HD95 --------------------------------------------------------------


def two_lesions_one_missed() -> tuple[np.ndarray, np.ndarray]:
    """Lesion A (2x2x2) half found, lesion B (2x2x2) missed, and one false-positive blob far from both."""
    target = np.zeros((20, 20, 20), dtype=bool)
    pred = np.zeros_like(target)
    target[2:4, 2:4, 2:4] = True
    target[12:14, 12:14, 12:14] = True
    pred[2:4, 2:4, 2:3] = True
    pred[2:4, 15:17, 15:17] = True
    return pred, target


def test_lesion_dice_hand_computed():
    # Entries: A has Dice 2*4/(8+4) = 2/3, missed B 0, false positive 0; mean over 3 entries.
    assert lesion_wise_scores(*two_lesions_one_missed(), (1.0, 1.0, 1.0))["dice"] == pytest.approx(2 / 9)


def test_lesion_hd95_hand_computed():
    # A: the prediction is the lower half of the cube, so the upper half lies 1 mm away: HD95 1.
    # B and the false positive score the penalty each.
    expected = (1.0 + 2 * DEFAULT_HD95_PENALTY_MM) / 3
    assert lesion_wise_scores(*two_lesions_one_missed(), (1.0, 1.0, 1.0))["hd95_mm"] == pytest.approx(expected)


def adjacent_blob() -> tuple[np.ndarray, np.ndarray]:
    """A predicted blob two voxels beside the lesion: inside the 3-step dilation, outside a 1-step one."""
    target = np.zeros((12, 6, 6), dtype=bool)
    pred = np.zeros_like(target)
    target[2:4, 2:4, 2:4] = True
    pred[6:8, 2:4, 2:4] = True
    return pred, target


def test_lesion_dilation_matches_dice_zero():
    assert lesion_wise_scores(*adjacent_blob(), (1.0, 1.0, 1.0))["dice"] == 0.0


def test_lesion_dilation_matches_hd95():
    # Surface distances 3 mm (x=6 to x=3) and 4 mm (x=7 to x=3) in equal numbers: the 95th percentile is 4.
    assert lesion_wise_scores(*adjacent_blob(), (1.0, 1.0, 1.0))["hd95_mm"] == pytest.approx(4.0)


def test_lesion_small_dilation_unmatched():
    # One dilation step does not reach the blob: a false negative and a false positive.
    scores = lesion_wise_scores(*adjacent_blob(), (1.0, 1.0, 1.0), dilation_iters=1)
    assert scores["hd95_mm"] == pytest.approx(DEFAULT_HD95_PENALTY_MM)


def test_lesion_both_empty():
    empty = np.zeros((4, 4, 4), dtype=bool)
    assert lesion_wise_scores(empty, empty, (1.0, 1.0, 1.0)) == {"dice": 1.0, "hd95_mm": 0.0}


# --- test-time mirroring and the export convention ------------------------------------------


@pytest.fixture(scope="module")
def tiny_model() -> UNet:
    torch.manual_seed(0)
    return UNet(in_channels=4, out_channels=3, base_channels=4).eval()


def test_tta_shape(tiny_model):
    image = np.random.default_rng(0).standard_normal((4, 20, 24, 5)).astype(np.float32)
    assert predict_volume(tiny_model, image, "regions", batch_size=2, mirror_axes=(0, 1)).shape == (20, 24, 5)


def test_tta_labels_valid(tiny_model):
    image = np.random.default_rng(0).standard_normal((4, 20, 24, 5)).astype(np.float32)
    labels = predict_volume(tiny_model, image, "regions", batch_size=2, mirror_axes=(0, 1))
    assert set(np.unique(labels).tolist()) <= {0, 1, 2, 3}


def test_tta_rejects_slice_axis(tiny_model):
    image = np.zeros((4, 16, 16, 2), dtype=np.float32)
    with pytest.raises(ValueError, match="mirror axis 2"):
        predict_volume(tiny_model, image, "regions", mirror_axes=(2,))


@pytest.fixture(scope="module")
def all_et_checkpoint(tmp_path_factory) -> Path:
    """A checkpoint whose output layer predicts every region everywhere, so every voxel is ET."""
    model = UNet(in_channels=4, out_channels=3, base_channels=4)
    with torch.no_grad():
        model.outc.weight.zero_()
        model.outc.bias.fill_(10.0)
    path = tmp_path_factory.mktemp("model") / "checkpoint.pt"
    torch.save({"model": model.state_dict(), "model_config": model.config, "target": "regions",
                "modalities": list(MODALITY_FILES), "preprocessing": {"margin": 0}, "threshold": 0.5}, path)
    return path


@pytest.fixture(scope="module")
def one_case(cropped_source, tmp_path_factory) -> Path:
    source = tmp_path_factory.mktemp("input")
    shutil.copytree(cropped_source / CASE, source / CASE)
    return source


def test_export_brats2017_writes_4(all_et_checkpoint, one_case, tmp_path):
    main(["predict", "-i", str(one_case), "-o", str(tmp_path), "--model", str(all_et_checkpoint),
          "--label-convention", "brats2017"])
    assert set(np.unique(np.asarray(nib.load(str(tmp_path / f"{CASE}.nii.gz")).dataobj)).tolist()) == {4}


def test_export_default_uses_own_convention(all_et_checkpoint, one_case, tmp_path):
    # BraTS 2021 file names mean the BraTS 2017-2022 convention, where ET is 4.
    main(["predict", "-i", str(one_case), "-o", str(tmp_path), "--model", str(all_et_checkpoint)])
    assert set(np.unique(np.asarray(nib.load(str(tmp_path / f"{CASE}.nii.gz")).dataobj)).tolist()) == {4}


def test_export_canonical_writes_3(all_et_checkpoint, one_case, tmp_path):
    main(["predict", "-i", str(one_case), "-o", str(tmp_path), "--model", str(all_et_checkpoint),
          "--label-convention", "canonical"])
    assert set(np.unique(np.asarray(nib.load(str(tmp_path / f"{CASE}.nii.gz")).dataobj)).tolist()) == {3}


def test_predict_tta_exit_0(all_et_checkpoint, one_case, tmp_path):
    assert main(["predict", "-i", str(one_case), "-o", str(tmp_path), "--model", str(all_et_checkpoint), "--tta"]) == 0


# --- overlays -------------------------------------------------------------------------------


def test_pick_slices_largest_first():
    label = np.zeros((4, 4, 6), dtype=np.uint8)
    label[:2, :2, 1:5] = 2
    label[:, :, 3] = 1
    assert pick_slices(label)[0] == 3


def test_pick_slices_distinct():
    label = np.zeros((4, 4, 10), dtype=np.uint8)
    label[:2, :2, 2:8] = 2
    assert len(set(pick_slices(label))) == 3


@pytest.fixture(scope="module")
def overlay_png(cropped_source, label_files, tmp_path_factory) -> Path:
    label, reference = label_files
    folder = tmp_path_factory.mktemp("overlay")
    save_like(canonical(label), reference, folder / "label.nii.gz")
    save_like(eroded(canonical(label)), reference, folder / "prediction.nii.gz")
    images = {m: cropped_source / CASE / f"{CASE}_{suffix}.nii.gz" for m, suffix in MODALITY_FILES.items()}
    return overlay_case(images, folder / "label.nii.gz", folder / "prediction.nii.gz", folder / f"{CASE}.png", CASE)


def test_overlay_is_png(overlay_png):
    assert overlay_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_overlay_not_trivial(overlay_png):
    assert overlay_png.stat().st_size > 20_000


def test_overlay_needs_flair_or_t1c(tmp_path, cropped_source):
    images = {"t1": cropped_source / CASE / f"{CASE}_t1.nii.gz"}
    with pytest.raises(ValueError, match="FLAIR or T1c"):
        overlay_case(images, tmp_path / "l.nii.gz", tmp_path / "p.nii.gz", tmp_path / "x.png")
