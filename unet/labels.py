"""Label conventions of brain-tumour datasets and the tumour regions that BraTS scores.

Canonical labels used everywhere after ingestion:
    0 background, 1 necrotic / non-enhancing tumour core (NCR), 2 peritumoural edema (ED),
    3 enhancing tumour (ET).

Regions (nested, the way the BraTS challenge scores them):
    WT whole tumour = {NCR, ED, ET}, TC tumour core = {NCR, ET}, ET enhancing tumour = {ET}.

A source convention is always named by the user (or by a recognised layout); it is never
guessed from the label values, because value 3 means "non-enhancing tumour" in BRATS 2015,
"enhancing tumour" in BraTS 2023 and "does not exist" in BraTS 2017-2022.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BACKGROUND, NCR, ED, ET = 0, 1, 2, 3
CANONICAL_LABEL_NAMES = {BACKGROUND: "background", NCR: "NCR", ED: "ED", ET: "ET"}

REGIONS: tuple[str, ...] = ("WT", "TC", "ET")
REGION_LABELS: dict[str, tuple[int, ...]] = {
    "WT": (NCR, ED, ET),
    "TC": (NCR, ET),
    "ET": (ET,),
}


@dataclass(frozen=True)
class LabelConvention:
    """A source label convention: which source value maps to which canonical label."""

    name: str
    description: str
    mapping: dict[int, int]

    def to_canonical(self, label_map: np.ndarray, case_id: str = "?") -> np.ndarray:
        """Map a source label map to canonical labels as uint8.

        Raises ValueError naming the case, each value outside the convention and its voxel
        count, and any non-integer value.
        """
        values, counts = np.unique(label_map, return_counts=True)
        non_finite = int(np.count_nonzero(~np.isfinite(label_map))) if np.issubdtype(label_map.dtype, np.floating) else 0
        if non_finite:
            raise ValueError(f"case {case_id}: label map has {non_finite} NaN or infinite voxels; re-export the label file")
        non_integer = [float(v) for v in values if float(v) != round(float(v))]
        if non_integer:
            raise ValueError(
                f"case {case_id}: label map has non-integer values {non_integer[:5]}; "
                "a label map must hold integer class values (was an image given as the label?)"
            )
        unknown = {int(v): int(c) for v, c in zip(values, counts) if int(round(float(v))) not in self.mapping}
        if unknown:
            listed = ", ".join(f"{v} ({c} voxels)" for v, c in unknown.items())
            raise ValueError(
                f"case {case_id}: label values {listed} are not part of the '{self.name}' convention "
                f"(allowed: {sorted(self.mapping)}); declare the right label_convention or an explicit mapping"
            )
        lookup = np.zeros(max(self.mapping) + 1, dtype=np.uint8)
        for source, target in self.mapping.items():
            lookup[source] = target
        return lookup[np.rint(label_map).astype(np.int64)]

    def from_canonical(self, canonical: np.ndarray) -> np.ndarray:
        """Map canonical labels back to this convention (the first source value wins for each target)."""
        inverse: dict[int, int] = {}
        for source, target in sorted(self.mapping.items()):
            inverse.setdefault(target, source)
        lookup = np.zeros(4, dtype=np.uint8)
        for target, source in inverse.items():
            lookup[target] = source
        return lookup[canonical.astype(np.int64)]


CONVENTIONS: dict[str, LabelConvention] = {
    convention.name: convention
    for convention in (
        LabelConvention("canonical", "0 background, 1 NCR, 2 ED, 3 ET", {0: 0, 1: 1, 2: 2, 3: 3}),
        LabelConvention("brats2017", "BraTS 2017-2022: 1 NCR/NET, 2 ED, 4 ET", {0: 0, 1: 1, 2: 2, 4: 3}),
        LabelConvention("brats2023", "BraTS 2023 and later (GLI): 1 NCR, 2 ED, 3 ET", {0: 0, 1: 1, 2: 2, 3: 3}),
        LabelConvention(
            "brats2015",
            "BRATS 2013-2015: 1 necrosis, 2 edema, 3 non-enhancing tumour, 4 ET",
            {0: 0, 1: 1, 2: 2, 3: 1, 4: 3},
        ),
        LabelConvention(
            "decathlon",
            "Medical Segmentation Decathlon Task01: 1 edema, 2 non-enhancing tumour, 3 ET",
            {0: 0, 1: 2, 2: 1, 3: 3},
        ),
        # Binary lesion masks (for example CaPTk test masks) carry no sub-region, so the
        # whole lesion is treated as edema: it counts towards WT and towards neither TC nor ET.
        LabelConvention("binary", "0 background, 1 lesion (scored as whole tumour only)", {0: 0, 1: 2}),
    )
}


def get_convention(name_or_mapping: str | dict) -> LabelConvention:
    """Return a named convention, or build a custom one from an explicit {source: canonical} mapping."""
    if isinstance(name_or_mapping, dict):
        mapping = {int(k): int(v) for k, v in name_or_mapping.items()}
        negative = sorted(k for k in mapping if k < 0)
        if negative:
            raise ValueError(f"label mapping has negative source values {negative}; label maps hold values >= 0")
        bad = {k: v for k, v in mapping.items() if v not in CANONICAL_LABEL_NAMES}
        if bad:
            raise ValueError(f"label mapping {bad} targets values outside the canonical labels 0-3")
        return LabelConvention("custom", "explicit mapping", mapping)
    if name_or_mapping not in CONVENTIONS:
        raise ValueError(
            f"unknown label_convention '{name_or_mapping}'; use one of {sorted(CONVENTIONS)} "
            "or an explicit mapping {source_value: canonical_value}"
        )
    return CONVENTIONS[name_or_mapping]


def labels_to_regions(label_map: np.ndarray) -> np.ndarray:
    """Turn canonical labels of shape (...) into binary regions of shape (3, ...) ordered WT, TC, ET."""
    return np.stack([np.isin(label_map, REGION_LABELS[region]) for region in REGIONS]).astype(np.uint8)


def regions_to_labels(regions: np.ndarray) -> np.ndarray:
    """Turn binary regions (3, ...) ordered WT, TC, ET into one canonical label map (...).

    Nesting is enforced the BraTS way: ET counts only inside TC, and TC only inside WT, so a
    voxel is ET if WT, TC and ET are all set, NCR if WT and TC are set, ED if only WT is set.
    """
    whole, core, enhancing = (regions[i].astype(bool) for i in range(3))
    core &= whole
    enhancing &= core
    labels = np.zeros(whole.shape, dtype=np.uint8)
    labels[whole] = ED
    labels[core] = NCR
    labels[enhancing] = ET
    return labels
