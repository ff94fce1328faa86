"""PNG overlays of a label map and a prediction on axial MRI slices, for a quick visual check.

Each overlay shows a few axial slices through the labelled tumour: the slice with the largest
tumour area and two others at the 25th and 75th percentile of the tumour's axial extent. Every
row shows one slice, drawn twice side by side: left with the label, right with the prediction,
each as a translucent colour fill (NCR red, ED green, ET yellow) with the whole-tumour outline.

Volumes are reoriented to RAS+ before slicing, so anterior is up and the patient's right is on
the right of the image (neurological view) whatever the orientation of the files.
Rendering uses matplotlib's Agg canvas directly, so no display and no pyplot state are needed.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from unet.io import load_volume, orientation_to_ras, reorient
from unet.labels import ED, ET, NCR

log = logging.getLogger(__name__)

LABEL_COLOURS = {NCR: (0.9, 0.1, 0.1), ED: (0.1, 0.8, 0.2), ET: (1.0, 0.85, 0.0)}
"""Fill colour (RGB in [0, 1]) per canonical label."""
LABEL_NAMES = {NCR: "NCR", ED: "ED", ET: "ET"}
BACKGROUND_MODALITIES = ("flair", "t1c")
"""Modalities tried in order for the grey-scale background: FLAIR shows edema best, T1c the core."""
FILL_ALPHA = 0.45


def pick_slices(label: np.ndarray, count: int = 3) -> list[int]:
    """Return up to `count` distinct axial indices into the last axis of a (X, Y, Z) label map.

    The first index is the slice with the largest tumour area; the others sit at evenly spaced
    quantiles (25th and 75th for three) of the slices that contain tumour. Without any tumour
    the middle slices of the volume are returned.
    """
    area = np.count_nonzero(label, axis=(0, 1))
    tumour_slices = np.flatnonzero(area)
    depth = label.shape[2]
    if tumour_slices.size == 0:
        return sorted({int(round(q * (depth - 1))) for q in np.linspace(0.25, 0.75, count)})[:count]
    chosen = [int(np.argmax(area))]
    quantiles = np.linspace(0.25, 0.75, count - 1) if count > 1 else []
    for q in quantiles:
        index = int(tumour_slices[int(round(q * (tumour_slices.size - 1)))])
        if index not in chosen:
            chosen.append(index)
    return chosen[:count]


def _label_rgba(labels: np.ndarray) -> np.ndarray:
    """Turn a (X, Y) canonical label slice into an (X, Y, 4) RGBA fill, transparent on background."""
    rgba = np.zeros(labels.shape + (4,), dtype=np.float32)
    for value, colour in LABEL_COLOURS.items():
        selected = labels == value
        rgba[selected, :3] = colour
        rgba[selected, 3] = FILL_ALPHA
    return rgba


def render_overlay(
    image: np.ndarray,
    label: np.ndarray,
    prediction: np.ndarray,
    path: Path,
    title: str = "",
    slices: int = 3,
) -> list[int]:
    """Write a PNG of `slices` axial slices with the label (left) and the prediction (right).

    `image` (X, Y, Z) is the grey-scale background; `label` and `prediction` are canonical
    label maps (X, Y, Z) on the same grid, all in RAS+ axis order. Returns the axial indices drawn.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    if not image.shape == label.shape == prediction.shape:
        raise ValueError(
            f"overlay {path}: image {image.shape}, label {label.shape} and prediction {prediction.shape} "
            "differ in shape; pass volumes on the same grid"
        )
    indices = pick_slices(label, slices)
    brain = image[image != 0]
    # Percentiles of the brain voxels keep a few very bright voxels from washing out the slice.
    low, high = np.percentile(brain, (1, 99)) if brain.size else (0.0, 1.0)
    if high <= low:
        high = low + 1.0

    figure = Figure(figsize=(6.4, 3.2 * len(indices)), dpi=100, facecolor="black")
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(indices), 2, squeeze=False)
    for row, z in enumerate(indices):
        for column, (name, labels) in enumerate((("label", label), ("prediction", prediction))):
            axis = axes[row][column]
            # Transposed with the origin at the bottom: x runs left to right, y (anterior) upwards.
            axis.imshow(image[:, :, z].T, cmap="gray", vmin=low, vmax=high, origin="lower", interpolation="nearest")
            axis.imshow(_label_rgba(labels[:, :, z]).transpose(1, 0, 2), origin="lower", interpolation="nearest")
            whole = (labels[:, :, z] > 0).T.astype(np.float32)
            if whole.any() and not whole.all():
                axis.contour(whole, levels=[0.5], colors="white", linewidths=0.7, origin="lower")
            axis.set_title(f"{name}, axial slice {z}", color="white", fontsize=9)
            axis.set_axis_off()
    handles = [Patch(color=colour, label=LABEL_NAMES[value]) for value, colour in LABEL_COLOURS.items()]
    figure.legend(handles=handles, loc="lower center", ncol=3, frameon=False, labelcolor="white", fontsize=9)
    if title:
        figure.suptitle(title, color="white", fontsize=10)
    figure.tight_layout(rect=(0, 0.04, 1, 0.97 if title else 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", facecolor=figure.get_facecolor())
    return indices


def overlay_case(
    images: dict[str, Path],
    label_path: Path,
    prediction_path: Path,
    path: Path,
    title: str = "",
) -> Path:
    """Render the overlay of one case from its files; returns `path`.

    `images` maps modality names to image files. FLAIR is the background, else T1c. The label
    and the prediction must be canonical label maps on the grid of that image.
    """
    modality = next((m for m in BACKGROUND_MODALITIES if m in images), None)
    if modality is None:
        raise ValueError(
            f"overlay {path}: the case has none of the modalities {list(BACKGROUND_MODALITIES)} "
            f"(found {sorted(images)}); an overlay needs a FLAIR or T1c image"
        )
    image, reference = load_volume(images[modality])
    label, _ = load_volume(label_path, dtype=np.uint8)
    prediction, _ = load_volume(prediction_path, dtype=np.uint8)
    transform = orientation_to_ras(reference.affine)
    render_overlay(
        reorient(image, transform), reorient(label, transform), reorient(prediction, transform), path, title
    )
    log.info("wrote overlay %s (%s background)", path, modality)
    return Path(path)
