"""Segmentation metrics scored the BraTS way, per tumour region (WT, TC, ET).

All functions take NumPy arrays. A binary mask is any array whose non-zero voxels are
foreground. Spacing is a tuple of voxel sizes in millimetres, one per array axis, in the same
order as the axes.

Empty masks follow the BraTS challenge rules so that no metric is ever NaN:
    Dice: both empty -> 1.0, exactly one empty -> 0.0.
    HD95: both empty -> 0.0 mm, exactly one empty -> a fixed penalty (373.13 mm by default,
    the diagonal of the 240 x 240 x 155 BraTS volume at 1 mm isotropic spacing).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.metrics import compute_hausdorff_distance

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
)


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
    0.0 and HD95 `penalty_mm`.
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
    return scores


def summarize(per_case: Mapping[str, Mapping[str, Mapping[str, float]]]) -> dict[str, Any]:
    """Aggregate the scores {case_id: score_case(...)} over cases.

    Returns {region: {"dice_mean", "dice_median", "hd95_mean", "hd95_median"}} for each region
    in REGIONS, plus "mean_dice" (mean over regions of dice_mean) and "num_cases". Empty masks
    are already scored by the BraTS rules in each case, so no value is NaN.

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
    summary["mean_dice"] = float(np.mean([summary[region]["dice_mean"] for region in REGIONS]))
    summary["num_cases"] = len(per_case)
    return summary
