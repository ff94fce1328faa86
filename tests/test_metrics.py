"""Tests of the BraTS-style segmentation metrics in unet.metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage
from torchmetrics.functional.segmentation import dice_score

from unet.labels import ED, ET, NCR, REGIONS
from unet.metrics import (
    REGION_METRIC_KEYS,
    dice,
    hd95,
    score_case,
    sensitivity,
    specificity,
    summarize,
    volume_ml,
)

PENALTY_MM = 373.13


def mask(shape: tuple[int, ...], *voxels: tuple[int, ...]) -> np.ndarray:
    """Return a bool mask of `shape` with the given voxel indices set."""
    out = np.zeros(shape, dtype=bool)
    for voxel in voxels:
        out[voxel] = True
    return out


def reference_hd95(pred: np.ndarray, target: np.ndarray, spacing: tuple[float, ...]) -> float:
    """Compute HD95 without MONAI: surface voxels by face-connected erosion, distances by Euclidean EDT.

    The 95th percentile is taken per direction and the larger one kept, as MONAI does.
    """

    def surface(binary: np.ndarray) -> np.ndarray:
        return binary & ~ndimage.binary_erosion(binary, border_value=0)

    pred_surface, target_surface = surface(pred), surface(target)
    to_target = ndimage.distance_transform_edt(~target_surface, sampling=spacing)[pred_surface]
    to_pred = ndimage.distance_transform_edt(~pred_surface, sampling=spacing)[target_surface]
    return max(np.percentile(to_target, 95), np.percentile(to_pred, 95))


# --- Dice -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pred", "target", "expected"),
    [
        # 1D: overlap 1, sizes 2 + 2 -> 2 * 1 / 4.
        (np.array([1, 1, 0, 0]), np.array([0, 1, 1, 0]), 0.5),
        # 2D: a 2x2 block against three of its voxels plus one outside -> 2 * 3 / (4 + 4).
        (
            mask((4, 4), (1, 1), (1, 2), (2, 1), (2, 2)),
            mask((4, 4), (1, 1), (1, 2), (2, 1), (3, 3)),
            0.75,
        ),
        # 3D: one voxel inside a three-voxel target -> 2 * 1 / (1 + 3).
        (mask((3, 3, 3), (1, 1, 1)), mask((3, 3, 3), (1, 1, 0), (1, 1, 1), (1, 1, 2)), 0.5),
        # Non-zero values other than 1 are foreground too.
        (np.array([0, 2, 7]), np.array([0, 1, 1]), 1.0),
    ],
    ids=["1d", "2d", "3d", "nonzero-is-foreground"],
)
def test_dice_hand_computed(pred, target, expected):
    assert dice(pred, target) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("pred_empty", "target_empty", "expected"),
    [(True, True, 1.0), (True, False, 0.0), (False, True, 0.0)],
    ids=["both-empty", "pred-empty", "target-empty"],
)
def test_dice_empty_rules(pred_empty, target_empty, expected):
    full = mask((3, 3, 3), (1, 1, 1))
    empty = np.zeros((3, 3, 3), dtype=bool)
    assert dice(empty if pred_empty else full, empty if target_empty else full) == expected


def test_dice_shape_mismatch():
    with pytest.raises(ValueError, match=r"\(3, 3\).*\(3, 4\)"):
        dice(np.zeros((3, 3)), np.zeros((3, 4)))


@pytest.mark.parametrize("seed", range(5))
def test_dice_matches_torchmetrics(seed):
    rng = np.random.default_rng(seed)
    pred = rng.random((9, 8, 7)) < 0.3
    target = rng.random((9, 8, 7)) < 0.4
    expected = dice_score(
        torch.from_numpy(pred[None, None]).long(),
        torch.from_numpy(target[None, None]).long(),
        num_classes=1,
        include_background=True,
    ).item()
    assert dice(pred, target) == pytest.approx(expected, rel=1e-6)


# --- HD95 -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pred", "target", "spacing", "expected"),
    [
        # One voxel moved by one step along the third axis, 3 mm voxels there.
        (mask((5, 5, 5), (2, 2, 2)), mask((5, 5, 5), (2, 2, 3)), (1.0, 1.0, 3.0), 3.0),
        # The same move along the first axis uses the 1 mm spacing of that axis.
        (mask((5, 5, 5), (2, 2, 2)), mask((5, 5, 5), (3, 2, 2)), (1.0, 1.0, 3.0), 1.0),
        # 2D: offsets (3, 4) voxels at (1, 2) mm -> sqrt(3**2 + 8**2) mm.
        (mask((6, 6), (1, 1)), mask((6, 6), (4, 5)), (1.0, 2.0), math.sqrt(73.0)),
        # 1D: surfaces {2, 3} and {5, 6} at 1.5 mm. Each direction has distances {3.0, 4.5} mm,
        # whose 95th percentile by linear interpolation is 3.0 + 0.95 * 1.5 = 4.425 mm.
        (mask((8,), (2,), (3,)), mask((8,), (5,), (6,)), (1.5,), 4.425),
        # Identical single voxels.
        (mask((3, 3, 3), (1, 1, 1)), mask((3, 3, 3), (1, 1, 1)), (1.0, 1.0, 1.0), 0.0),
        # Full masks: the array border is the surface of both.
        (np.ones((4, 4, 4)), np.ones((4, 4, 4)), (1.0, 1.0, 1.0), 0.0),
    ],
    ids=["3d-aniso-third-axis", "3d-aniso-first-axis", "2d-aniso", "1d-percentile", "single-voxel", "full"],
)
def test_hd95_hand_computed(pred, target, spacing, expected):
    assert hd95(pred, target, spacing) == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_hd95_full_mask_minus_slab():
    # The 4x4x4 full mask has 56 surface voxels. The 16 in slab 0 lie one 2 mm step from the other
    # surface and the rest lie on it, so 16 / 56 > 5 % of the distances are 2 mm.
    full = np.ones((4, 4, 4), dtype=bool)
    without_first_slab = full.copy()
    without_first_slab[0] = False
    assert hd95(full, without_first_slab, (2.0, 1.0, 1.0)) == pytest.approx(2.0)


@pytest.mark.parametrize(
    ("pred_empty", "target_empty", "expected"),
    [(True, True, 0.0), (True, False, PENALTY_MM), (False, True, PENALTY_MM)],
    ids=["both-empty", "pred-empty", "target-empty"],
)
def test_hd95_empty_rules(pred_empty, target_empty, expected):
    full = mask((3, 3, 3), (1, 1, 1))
    empty = np.zeros((3, 3, 3), dtype=bool)
    result = hd95(empty if pred_empty else full, empty if target_empty else full, (1.0, 1.0, 1.0))
    assert result == expected


def test_hd95_penalty_configurable():
    target = mask((3, 3, 3), (1, 1, 1))
    assert hd95(np.zeros_like(target), target, (1.0, 1.0, 1.0), penalty_mm=50.0) == 50.0


def test_hd95_spacing_length_mismatch():
    with pytest.raises(ValueError, match="3 axes"):
        hd95(mask((3, 3, 3), (1, 1, 1)), mask((3, 3, 3), (1, 1, 1)), (1.0, 1.0))


def test_hd95_integer_spacing():
    # MONAI 1.6.1 rejects a spacing sequence that mixes int and float, so the wrapper must convert it.
    assert hd95(mask((5, 5, 5), (2, 2, 2)), mask((5, 5, 5), (2, 2, 3)), (1, 1, 3.0)) == pytest.approx(3.0)


@pytest.mark.parametrize(
    ("seed", "shape", "spacing"),
    [
        (0, (16, 14, 10), (1.0, 1.0, 1.0)),
        (1, (16, 14, 10), (0.9, 1.2, 2.5)),
        (2, (12, 20, 8), (1.0, 1.0, 3.0)),
        (3, (24, 18), (0.5, 1.7)),
    ],
)
def test_hd95_matches_scipy_reference(seed, shape, spacing):
    rng = np.random.default_rng(seed)
    # Smoothed noise gives blobs with several components and real surfaces, unlike salt noise.
    pred = ndimage.gaussian_filter(rng.random(shape), 1.5) > 0.52
    target = ndimage.gaussian_filter(rng.random(shape), 1.5) > 0.52
    assert pred.any()
    assert target.any()
    assert hd95(pred, target, spacing) == pytest.approx(reference_hd95(pred, target, spacing), rel=1e-5)


# --- Sensitivity, specificity, volume -------------------------------------------------------


def test_sensitivity_hand_computed():
    # TP 1 (index 1), FN 2 (indices 2, 3) -> 1 / 3.
    assert sensitivity(np.array([1, 1, 0, 0, 0]), np.array([0, 1, 1, 1, 0])) == pytest.approx(1 / 3)


def test_specificity_hand_computed():
    # Negatives at indices 0 and 4: FP at 0, TN at 4 -> 1 / 2.
    assert specificity(np.array([1, 1, 0, 0, 0]), np.array([0, 1, 1, 1, 0])) == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("pred", "expected"), [(np.zeros(4), 1.0), (np.array([0, 1, 0, 0]), 0.0)], ids=["pred-empty", "pred-set"]
)
def test_sensitivity_empty_target(pred, expected):
    assert sensitivity(pred, np.zeros(4)) == expected


def test_specificity_full_target():
    assert specificity(np.array([1, 0, 1]), np.ones(3)) == 1.0


def test_volume_ml_anisotropic():
    # 10 voxels of 1 x 1 x 2.5 mm = 25 mm^3 = 0.025 ml.
    m = np.zeros((4, 4, 4), dtype=bool)
    m.flat[:10] = True
    assert volume_ml(m, (1.0, 1.0, 2.5)) == pytest.approx(0.025)


# --- score_case -----------------------------------------------------------------------------


def test_score_case_shape_mismatch_names_pred_shape():
    with pytest.raises(ValueError, match=r"\(4, 4, 4\)"):
        score_case(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)), (1.0, 1.0, 1.0))


def test_score_case_shape_mismatch_names_true_shape():
    with pytest.raises(ValueError, match=r"\(4, 4, 5\)"):
        score_case(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)), (1.0, 1.0, 1.0))


def test_score_case_keys():
    scores = score_case(np.zeros((3, 3, 3)), np.zeros((3, 3, 3)), (1.0, 1.0, 1.0))
    assert {region: set(values) for region, values in scores.items()} == {
        region: set(REGION_METRIC_KEYS) for region in REGIONS
    }


@pytest.mark.parametrize("region", REGIONS)
def test_score_case_et_in_every_region(region):
    labels = mask((4, 4, 4), (1, 2, 3)).astype(np.uint8) * ET
    # One voxel of 1 x 1 x 2 mm = 0.002 ml.
    assert score_case(labels, labels, (1.0, 1.0, 2.0))[region]["true_volume_ml"] == pytest.approx(0.002)


@pytest.mark.parametrize(
    ("region", "dice_expected", "hd95_expected"),
    [("WT", 1.0, 0.0), ("TC", 0.0, PENALTY_MM), ("ET", 1.0, 0.0)],
)
def test_score_case_core_predicted_as_edema(region, dice_expected, hd95_expected):
    # The true NCR voxel is predicted as ED: WT still matches, TC is missed entirely, ET is
    # absent from both maps.
    true_labels = mask((4, 4, 4), (1, 1, 1)).astype(np.uint8) * NCR
    pred_labels = mask((4, 4, 4), (1, 1, 1)).astype(np.uint8) * ED
    scores = score_case(pred_labels, true_labels, (1.0, 1.0, 1.0))
    assert (scores[region]["dice"], scores[region]["hd95_mm"]) == (dice_expected, hd95_expected)


def test_score_case_penalty_passed_through():
    true_labels = mask((4, 4, 4), (1, 1, 1)).astype(np.uint8) * ET
    scores = score_case(np.zeros_like(true_labels), true_labels, (1.0, 1.0, 1.0), penalty_mm=99.0)
    assert scores["ET"]["hd95_mm"] == 99.0


# --- summarize ------------------------------------------------------------------------------


def region_scores(dice_value: float, hd95_value: float) -> dict[str, float]:
    return {"dice": dice_value, "hd95_mm": hd95_value}


TWO_CASES = {
    "case_a": {"WT": region_scores(0.8, 2.0), "TC": region_scores(0.6, 4.0), "ET": region_scores(0.4, 10.0)},
    "case_b": {
        "WT": region_scores(0.6, 4.0),
        "TC": region_scores(1.0, 0.0),
        "ET": region_scores(0.0, PENALTY_MM),
    },
}


@pytest.mark.parametrize(
    ("region", "key", "expected"),
    [
        ("WT", "dice_mean", 0.7),
        ("TC", "dice_mean", 0.8),
        ("ET", "dice_mean", 0.2),
        ("WT", "hd95_mean", 3.0),
        ("TC", "hd95_mean", 2.0),
        ("ET", "hd95_mean", (10.0 + PENALTY_MM) / 2),
        ("ET", "hd95_median", (10.0 + PENALTY_MM) / 2),
    ],
)
def test_summarize_two_cases_region(region, key, expected):
    assert summarize(TWO_CASES)[region][key] == pytest.approx(expected)


def test_summarize_two_cases_mean_dice():
    # Mean of the region means 0.7, 0.8, 0.2.
    assert summarize(TWO_CASES)["mean_dice"] == pytest.approx(1.7 / 3)


def test_summarize_two_cases_num_cases():
    assert summarize(TWO_CASES)["num_cases"] == 2


def test_summarize_median_differs_from_mean():
    cases = dict(TWO_CASES, case_c={region: region_scores(0.0, 100.0) for region in REGIONS})
    # WT Dice 0.8, 0.6, 0.0: median 0.6, mean 0.4667.
    assert summarize(cases)["WT"]["dice_median"] == pytest.approx(0.6)


def test_summarize_absent_region_not_nan():
    # No case has ET in either map: every ET Dice is 1.0 and every HD95 0.0 by the BraTS rules.
    labels = mask((5, 5, 5), (2, 2, 2)).astype(np.uint8) * NCR
    per_case = {case_id: score_case(labels, labels, (1.0, 1.0, 1.0)) for case_id in ("a", "b")}
    et_summary = summarize(per_case)["ET"]
    assert (et_summary["dice_mean"], et_summary["dice_median"]) == (1.0, 1.0)
    assert (et_summary["hd95_mean"], et_summary["hd95_median"]) == (0.0, 0.0)


def test_summarize_empty_input():
    with pytest.raises(ValueError, match="empty"):
        summarize({})


def test_summarize_missing_region():
    with pytest.raises(ValueError, match="case_a.*ET"):
        summarize({"case_a": {"WT": region_scores(1.0, 0.0), "TC": region_scores(1.0, 0.0)}})
