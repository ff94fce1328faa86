from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from unet.io import CaseFiles, axis_codes, load_volume
from unet.labels import get_convention
from unet.preprocess import brain_bounding_box, prepare_case, restore_geometry, zscore_in_mask

LPS = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.array([[1, 0, 0, 0], [0, 1, 0, -239.0], [0, 0, 1, 0], [0, 0, 0, 1]])
RAS = np.diag([1.2, 1.0, 2.5, 1.0])


def _oblique() -> np.ndarray:
    angle = np.deg2rad(20)
    rotation = np.array([[np.cos(angle), 0, np.sin(angle)], [0, 1, 0], [-np.sin(angle), 0, np.cos(angle)]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([0.9, 1.1, 3.0])
    affine[:3, 3] = [-40.0, 12.5, 7.0]
    return affine


# A permuted, flipped orientation (AIL) as well: axes swapped, not only flipped.
AIL = np.array([[0, 0, -1.0, 30], [1.0, 0, 0, -20], [0, -1.0, 0, 10], [0, 0, 0, 1]])


def _synthetic_case(folder: Path, affine: np.ndarray, shape=(30, 26, 12)) -> tuple[CaseFiles, np.ndarray]:
    rng = np.random.default_rng(3)
    brain = np.zeros(shape, dtype=bool)
    brain[4:25, 3:22, 2:10] = True
    label = np.zeros(shape, dtype=np.uint8)
    label[10:15, 8:12, 4:7] = 4
    label[11:13, 9:11, 5] = 1
    images = {}
    for modality in ("t1", "flair"):
        data = np.where(brain, rng.normal(100, 20, shape), 0).astype(np.float32)
        path = folder / f"{modality}.nii.gz"
        nib.save(nib.Nifti1Image(data, affine), str(path))
        images[modality] = path
    label_path = folder / "seg.nii.gz"
    nib.save(nib.Nifti1Image(label, affine), str(label_path))
    return CaseFiles("synthetic", images, label_path, None, get_convention("brats2017")), label


@pytest.mark.parametrize("affine,codes", [(LPS, "LPS"), (RAS, "RAS"), (AIL, "AIL"), (_oblique(), None)])
def test_restore_geometry_round_trip(tmp_path, affine, codes):
    case, original = _synthetic_case(tmp_path, affine)
    image, label, record = prepare_case(case)
    if codes:
        assert record["original_orientation"] == codes
    # The loaded label is the source value (4 for ET) here: ingestion maps it, not preprocessing.
    restored = restore_geometry(label, record)
    assert restored.shape == original.shape
    assert np.array_equal(restored, original)


def test_prepare_case_outputs_ras_crop(tmp_path):
    case, _ = _synthetic_case(tmp_path, LPS)
    image, label, record = prepare_case(case)
    assert image.shape == (2, 21, 19, 8)
    assert label.shape == (21, 19, 8)
    assert image.dtype == np.float32
    # LPS -> RAS flips the first two axes: the box is mirrored on them.
    assert record["crop_box"] == [[5, 26], [4, 23], [2, 10]]
    assert record["ras_shape"] == [30, 26, 12]


def test_zscore_inside_brain_only():
    image = np.array([0.0, 2.0, 4.0, 6.0, 0.0])
    mask = np.array([False, True, True, True, False])
    normalised, mean, std = zscore_in_mask(image, mask)
    assert mean == pytest.approx(4.0)
    assert std == pytest.approx(np.sqrt(8 / 3))
    assert normalised[0] == 0.0
    assert normalised[2] == pytest.approx(0.0)
    assert normalised[3] == pytest.approx(2 / np.sqrt(8 / 3))


def test_zscore_constant_modality_fails():
    with pytest.raises(ValueError, match="constant inside the brain"):
        zscore_in_mask(np.ones(4), np.ones(4, dtype=bool))


@pytest.mark.parametrize("margin,expected", [(0, [[1, 3], [2, 5]]), (1, [[0, 4], [1, 6]]), (5, [[0, 4], [0, 6]])])
def test_brain_bounding_box(margin, expected):
    mask = np.zeros((4, 6), dtype=bool)
    mask[1:3, 2:5] = True
    assert brain_bounding_box(mask, margin) == expected


def test_brain_bounding_box_empty_mask():
    with pytest.raises(ValueError, match="brain mask is empty"):
        brain_bounding_box(np.zeros((3, 3), dtype=bool))


def test_real_case_round_trip(samples):
    folder = samples / "brain-tumor-segmentation-gp" / "BraTS2021_00006"
    images = {m: folder / f"BraTS2021_00006_{suffix}.nii.gz" for m, suffix in
              (("t1", "t1"), ("t1c", "t1ce"), ("t2", "t2"), ("flair", "flair"))}
    case = CaseFiles("BraTS2021_00006", images, folder / "BraTS2021_00006_seg.nii.gz", None, get_convention("brats2017"))
    image, label, record = prepare_case(case)
    original, reference = load_volume(case.label, dtype=np.uint8)
    assert axis_codes(reference.affine) == "LPS"
    assert np.array_equal(restore_geometry(label, record), original)
    brain = image[0] != 0
    assert abs(float(image[0][brain].mean())) < 1e-3
    assert float(image[0][brain].std()) == pytest.approx(1.0, abs=1e-3)


def test_resampling_changes_grid_and_spacing(tmp_path):
    case, _ = _synthetic_case(tmp_path, RAS)  # spacing 1.2 x 1.0 x 2.5 mm
    image, label, record = prepare_case(case, target_spacing=(1.0, 1.0, 1.25))
    assert record["cropped_shape"] == [21, 19, 8]
    assert image.shape == (2, 25, 19, 16)
    assert label.shape == (25, 19, 16)
    assert record["spacing_mm"] == [1.0, 1.0, 1.25]
    assert record["original_spacing_mm"] == pytest.approx([1.2, 1.0, 2.5])


def test_resampling_round_trip_restores_geometry(tmp_path):
    case, original = _synthetic_case(tmp_path, RAS)
    _, label, record = prepare_case(case, target_spacing=(1.0, 1.0, 1.25))
    restored = restore_geometry(label, record)
    assert restored.shape == original.shape
    tumour, back = original > 0, restored > 0
    dice = 2 * np.logical_and(tumour, back).sum() / (tumour.sum() + back.sum())
    assert dice > 0.9


def test_resampling_to_own_spacing_is_identity(tmp_path):
    case, original = _synthetic_case(tmp_path, RAS)
    _, label, record = prepare_case(case, target_spacing=(1.2, 1.0, 2.5))
    assert np.array_equal(restore_geometry(label, record), original)
