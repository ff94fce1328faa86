"""Segmentation metrics scored the BraTS way, per tumour region (WT, TC, ET).

All functions take NumPy arrays. A binary mask is any array whose non-zero voxels are
foreground. Spacing is a tuple of voxel sizes in millimetres, one per array axis, in the same
order as the axes.

Empty masks follow the BraTS challenge rules so that no metric is ever NaN:
    Dice: both empty -> 1.0, exactly one empty -> 0.0.
    HD95: both empty -> 0.0 mm, exactly one empty -> a fixed penalty (373.13 mm by default,
    the diagonal of the 240 x 240 x 155 BraTS volume at 1 mm isotropic spacing).

Lesion-wise Dice and HD95 (`lesion_wise_scores`) score each connected tumour component on its
own, the way the BraTS 2023 challenge does, so that missed small lesions and spurious blobs
weigh as much as one large lesion.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.metrics import compute_hausdorff_distance
from scipy import ndimage

from unet.labels import REGIONS, labels_to_regions

DEFAULT_HD95_PENALTY_MM = 373.13
"""Penalty HD95 in mm when exactly one mask is empty: the diagonal of a 240 x 240 x 155 mm volume."""

ML_PER_MM3 = 1e-3

REGION_METRIC_KEYS: tuple[str, ...] = (
    "dice",
    "hd95_mm",
    "sensitivity",
    "specificity",
    "pred_volume_ml",
    "true_volume_ml",
    "lesion_dice",
    "lesion_hd95_mm",
)

DEFAULT_LESION_DILATION_ITERS = 3
"""Dilation steps (3x3x3 structure) that widen each true lesion before matching predicted components."""


def _binary_pair(pred: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return both masks as bool arrays after checking that their shapes agree."""
    pred = np.asarray(pred)
    target = np.asarray(target)
    if pred.shape != target.shape:
        raise ValueError(
            f"prediction shape {pred.shape} differs from target shape {target.shape}; "
            "resample the prediction onto the target grid"
        )
    return pred != 0, target != 0


def _spacing_for(spacing: Sequence[float], ndim: int) -> tuple[float, ...]:
    """Return the spacing as floats after checking one positive finite value per axis."""
    values = tuple(float(s) for s in spacing)
    if len(values) != ndim:
        raise ValueError(
            f"invalid spacing {tuple(spacing)}: {len(values)} values for a mask with {ndim} axes; "
            "give one voxel size in mm per array axis"
        )
    if not all(math.isfinite(s) and s > 0 for s in values):
        raise ValueError(f"invalid spacing {tuple(spacing)}: voxel sizes must be positive finite numbers in mm")
    return values


def dice(pred: np.ndarray, target: np.ndarray) -> float:
    """Return the Dice coefficient 2|P & T| / (|P| + |T|) of two binary masks.

    Both masks have the same, arbitrary shape. Both empty gives 1.0 (nothing to find and
    nothing found), exactly one empty gives 0.0.
    """
    pred_mask, target_mask = _binary_pair(pred, target)
    total = np.count_nonzero(pred_mask) + np.count_nonzero(target_mask)
    if total == 0:
        return 1.0
    return 2.0 * np.count_nonzero(pred_mask & target_mask) / total


def hd95(
    pred: np.ndarray,
    target: np.ndarray,
    spacing: Sequence[float],
    penalty_mm: float = DEFAULT_HD95_PENALTY_MM,
) -> float:
    """Return the 95th-percentile symmetric Hausdorff distance (HD95) in mm of two binary masks.

    `pred` and `target` have the same shape, usually (H, W, D), and `spacing` gives the voxel
    size in mm per axis. Distances run between the centres of surface voxels (foreground voxels
    with a background face neighbour, where the array border counts as background). The 95th
    percentile is taken separately in each direction (pred to target, target to pred) and the
    larger one is returned, as MONAI computes it.

    Both empty gives 0.0, exactly one empty gives `penalty_mm`.

    NOTE: tools that weight surface elements by their area instead of counting surface voxels
    can report slightly different values for the same masks.
    """
    pred_mask, target_mask = _binary_pair(pred, target)
    voxel_mm = _spacing_for(spacing, pred_mask.ndim)
    pred_empty, target_empty = not pred_mask.any(), not target_mask.any()
    if pred_empty and target_empty:
        return 0.0
    if pred_empty or target_empty:
        return float(penalty_mm)
    with warnings.catch_warnings():
        # MONAI 1.6.1 passes its own deprecated `always_return_as_numpy` argument internally, so
        # every call warns and the caller cannot avoid it.
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
        distance = compute_hausdorff_distance(
            torch.from_numpy(pred_mask[None, None]),
            torch.from_numpy(target_mask[None, None]),
            # The single channel is the foreground; MONAI would otherwise drop it as background.
            include_background=True,
            percentile=95,
            # MONAI reads a flat list as one isotropic value per batch item when its length equals
            # the batch size, so the per-axis spacing of the single item is wrapped in an outer list.
            spacing=[list(voxel_mm)],
        )
    return float(distance.item())


def sensitivity(pred: np.ndarray, target: np.ndarray) -> float:
    """Return the sensitivity TP / (TP + FN) of two binary masks of the same shape.

    Sensitivity is undefined when the target is empty. Then the result is 1.0 if the prediction
    is also empty, else 0.0.
    """
    pred_mask, target_mask = _binary_pair(pred, target)
    positives = np.count_nonzero(target_mask)
    if positives == 0:
        return 0.0 if pred_mask.any() else 1.0
    return np.count_nonzero(pred_mask & target_mask) / positives


def specificity(pred: np.ndarray, target: np.ndarray) -> float:
    """Return the specificity TN / (TN + FP) of two binary masks of the same shape.

    Negatives are all background voxels of the target. When the target has none, no false
    positive is possible and the result is 1.0.
    """
    pred_mask, target_mask = _binary_pair(pred, target)
    negatives = target_mask.size - np.count_nonzero(target_mask)
    if negatives == 0:
        return 1.0
    return np.count_nonzero(~pred_mask & ~target_mask) / negatives


def volume_ml(mask: np.ndarray, spacing: Sequence[float]) -> float:
    """Return the foreground volume in millilitres of a binary mask of any shape, `spacing` in mm per axis."""
    mask = np.asarray(mask)
    voxel_mm3 = math.prod(_spacing_for(spacing, mask.ndim))
    return np.count_nonzero(mask) * voxel_mm3 * ML_PER_MM3


def _bounding_crop(mask: np.ndarray) -> tuple[slice, ...]:
    """Return slices around the non-zero voxels of `mask` widened by one voxel per side (clipped).

    The one-voxel margin keeps the array border as background on every side, so surface voxels,
    and with them HD95, are the same in the crop as in the whole volume.
    """
    present = np.argwhere(mask)
    low = np.maximum(present.min(axis=0) - 1, 0)
    high = np.minimum(present.max(axis=0) + 2, mask.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(low, high))


def lesion_wise_scores(
    pred: np.ndarray,
    target: np.ndarray,
    spacing: Sequence[float],
    dilation_iters: int = DEFAULT_LESION_DILATION_ITERS,
    penalty_mm: float = DEFAULT_HD95_PENALTY_MM,
) -> dict[str, float]:
    """Return lesion-wise {"dice", "hd95_mm"} of two binary masks of the same shape, usually (X, Y, Z).

    Rules (those of the BraTS 2023 lesion-wise metrics, without their minimum lesion size):
    1. Lesions are the connected components of `target`, and predicted components those of
       `pred`, both with 26-connectivity (the full 3x3x3 neighbourhood; 8 in 2D).
    2. Each true lesion is dilated `dilation_iters` times with a 3x3x3 structure (3x3 in 2D). Every predicted
       component that overlaps the dilated lesion is matched to it, whole. One predicted
       component can match several lesions.
    3. A matched lesion scores the Dice and HD95 between the lesion and the union of its
       matched components. An unmatched lesion (false negative) scores Dice 0 and HD95
       `penalty_mm`.
    4. Each predicted component matched to no lesion (false positive) adds one more entry with
       Dice 0 and HD95 `penalty_mm`.
    5. Each score is the mean over all entries (true lesions plus false positives). Both masks
       empty gives Dice 1.0 and HD95 0.0.

    `spacing` gives the voxel size in mm per axis.
    """
    pred_mask, target_mask = _binary_pair(pred, target)
    _spacing_for(spacing, pred_mask.ndim)
    if dilation_iters < 0:
        raise ValueError(f"invalid dilation_iters {dilation_iters}: expected an integer >= 0")
    cube = np.ones((3,) * pred_mask.ndim, dtype=bool)
    true_components, lesion_count = ndimage.label(target_mask, structure=cube)
    pred_components, pred_count = ndimage.label(pred_mask, structure=cube)
    if lesion_count == 0 and pred_count == 0:
        return {"dice": 1.0, "hd95_mm": 0.0}

    dices: list[float] = []
    distances: list[float] = []
    matched: set[int] = set()
    for index, lesion_slices in enumerate(ndimage.find_objects(true_components), start=1):
        # Dilation only reaches `dilation_iters` voxels out, so it runs on a padded window of the lesion.
        window = tuple(
            slice(max(s.start - dilation_iters, 0), min(s.stop + dilation_iters, size))
            for s, size in zip(lesion_slices, target_mask.shape)
        )
        lesion_window = true_components[window] == index
        dilated = ndimage.binary_dilation(lesion_window, structure=cube, iterations=dilation_iters) if dilation_iters else lesion_window
        overlapping = np.unique(pred_components[window][dilated])
        overlapping = overlapping[overlapping != 0]
        if overlapping.size == 0:
            dices.append(0.0)
            distances.append(float(penalty_mm))
            continue
        matched.update(int(label) for label in overlapping)
        lesion = true_components == index
        prediction = np.isin(pred_components, overlapping)
        # Scoring on a crop around both masks gives the same values as on the whole volume, faster.
        crop = _bounding_crop(lesion | prediction)
        dices.append(dice(prediction[crop], lesion[crop]))
        distances.append(hd95(prediction[crop], lesion[crop], spacing, penalty_mm))
    false_positives = pred_count - len(matched)
    dices.extend([0.0] * false_positives)
    distances.extend([float(penalty_mm)] * false_positives)
    return {"dice": float(np.mean(dices)), "hd95_mm": float(np.mean(distances))}


def score_case(
    pred_labels: np.ndarray,
    true_labels: np.ndarray,
    spacing: Sequence[float],
    penalty_mm: float = DEFAULT_HD95_PENALTY_MM,
) -> dict[str, dict[str, float]]:
    """Score one case given canonical label maps (0-3) of the same shape, usually (H, W, D).

    Returns {region: {metric: value}} for each region in REGIONS with the metrics named in
    REGION_METRIC_KEYS. Regions are nested, so an ET voxel (label 3) counts in WT, TC and ET.
    A region absent from both maps scores Dice 1.0 and HD95 0.0; absent from exactly one, Dice
    0.0 and HD95 `penalty_mm`. `lesion_dice` and `lesion_hd95_mm` come from
    `lesion_wise_scores` with its default dilation and the same penalty.
    """
    pred_labels = np.asarray(pred_labels)
    true_labels = np.asarray(true_labels)
    if pred_labels.shape != true_labels.shape:
        raise ValueError(
            f"predicted label map shape {pred_labels.shape} differs from true label map shape "
            f"{true_labels.shape}; resample the prediction onto the grid of the true labels"
        )
    _spacing_for(spacing, true_labels.ndim)
    pred_regions = labels_to_regions(pred_labels)
    true_regions = labels_to_regions(true_labels)
    scores: dict[str, dict[str, float]] = {}
    for index, region in enumerate(REGIONS):
        pred_region, true_region = pred_regions[index], true_regions[index]
        scores[region] = {
            "dice": dice(pred_region, true_region),
            "hd95_mm": hd95(pred_region, true_region, spacing, penalty_mm),
            "sensitivity": sensitivity(pred_region, true_region),
            "specificity": specificity(pred_region, true_region),
            "pred_volume_ml": volume_ml(pred_region, spacing),
            "true_volume_ml": volume_ml(true_region, spacing),
        }
        lesion = lesion_wise_scores(pred_region, true_region, spacing, penalty_mm=penalty_mm)
        scores[region]["lesion_dice"] = lesion["dice"]
        scores[region]["lesion_hd95_mm"] = lesion["hd95_mm"]
    return scores


def summarize(per_case: Mapping[str, Mapping[str, Mapping[str, float]]]) -> dict[str, Any]:
    """Aggregate the scores {case_id: score_case(...)} over cases.

    Returns {region: {"dice_mean", "dice_median", "hd95_mean", "hd95_median"}} for each region
    in REGIONS, plus "mean_dice" (mean over regions of dice_mean) and "num_cases". When every
    case has the lesion-wise scores of a region, that region also gets "lesion_dice_mean" and
    "lesion_hd95_mean". Empty masks are already scored by the BraTS rules in each case, so no
    value is NaN.

    Raises ValueError when `per_case` is empty or a case lacks a region or metric.
    """
    if not per_case:
        raise ValueError("cannot summarize an empty set of cases")
    summary: dict[str, Any] = {}
    for region in REGIONS:
        dices, distances = [], []
        for case_id, scores in per_case.items():
            region_scores = scores.get(region)
            if region_scores is None or "dice" not in region_scores or "hd95_mm" not in region_scores:
                raise ValueError(
                    f"case {case_id}: region {region} is missing its 'dice' or 'hd95_mm' score; "
                    "pass the output of score_case for every case"
                )
            dices.append(float(region_scores["dice"]))
            distances.append(float(region_scores["hd95_mm"]))
        summary[region] = {
            "dice_mean": float(np.mean(dices)),
            "dice_median": float(np.median(dices)),
            "hd95_mean": float(np.mean(distances)),
            "hd95_median": float(np.median(distances)),
        }
        if all("lesion_dice" in s[region] and "lesion_hd95_mm" in s[region] for s in per_case.values()):
            summary[region]["lesion_dice_mean"] = float(np.mean([s[region]["lesion_dice"] for s in per_case.values()]))
            summary[region]["lesion_hd95_mean"] = float(np.mean([s[region]["lesion_hd95_mm"] for s in per_case.values()]))
    summary["mean_dice"] = float(np.mean([summary[region]["dice_mean"] for region in REGIONS]))
    summary["num_cases"] = len(per_case)
    return summary
