"""Checks that decide whether one MRI case is usable for training or inference.

`validate_case` reads every file of a case once, in full, and returns one `Problem` per
finding instead of raising, so a scan of a dataset lists everything to fix in one pass.
"""

from __future__ import annotations

import gzip
import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import yaml

from unet.io import DATASET_FILE, CaseFiles, discover_cases
from unet.labels import LabelConvention

DEFAULT_MAX_VOXELS = 512**3
AFFINE_TOLERANCE_MM = 1e-3
"""Largest absolute difference between two affines (in mm) that still counts as the same grid."""

# zlib.error is listed because it is not an OSError, and gzip raises it for a damaged deflate stream.
_DATA_ERRORS = (OSError, EOFError, ValueError, zlib.error)
_HEADER_ERRORS = (*_DATA_ERRORS, nib.filebasedimages.ImageFileError, nib.spatialimages.HeaderDataError)
_DRAIN_CHUNK_BYTES = 1 << 20

_Report = Callable[[Path | None, str], None]


@dataclass(frozen=True)
class Problem:
    """One finding about a case. `file` is None where no single file is at fault."""

    case_id: str
    file: Path | None
    message: str
    """One-line description of the fault and of its fix."""

    def __str__(self) -> str:
        name = self.file.name if self.file is not None else "-"
        return f"{self.case_id}: {name}: {self.message}"


@dataclass(frozen=True)
class _Grid:
    """Voxel grid of a file whose header passed the checks, used to compare the files of a case."""

    path: Path
    shape: tuple[int, int, int]
    affine: np.ndarray


def validate_case(case: CaseFiles, *, max_voxels: int = DEFAULT_MAX_VOXELS) -> list[Problem]:
    """Check every file of one case and return the problems found (empty when the case is usable).

    Images, the label map and the brain mask are each read once and in full, one at a time, so
    truncated or corrupt files are found and only one volume is in memory at a time. A file
    whose header declares more than `max_voxels` voxels is not read. Bad data never raises.
    """
    problems: list[Problem] = []
    grids: list[_Grid] = []

    def report(path: Path | None, message: str) -> None:
        problems.append(Problem(case.case_id, path, message))

    if not case.images:
        report(None, "the case lists no image files; add at least one modality or drop the case")

    files = [(f"{modality} image", "image", Path(path)) for modality, path in case.images.items()]
    if case.label is not None:
        files.append(("label map", "label", Path(case.label)))
    if case.mask is not None:
        files.append(("brain mask", "mask", Path(case.mask)))

    for description, kind, path in files:
        if not path.is_file():
            report(path, f"{description} not found at {path}; {_missing_file_fix(kind)}")
            continue
        grid = _check_file(path, kind, case.label_convention, max_voxels, report)
        if grid is not None:
            grids.append(grid)

    _compare_grids(grids, report)
    return problems


def validate_dataset(data_dir: Path, *, max_voxels: int = DEFAULT_MAX_VOXELS) -> list[Problem]:
    """Check every case listed in DIR/dataset.yaml of a canonical dataset.

    A missing or unreadable dataset.yaml is returned as one Problem whose case_id is the
    dataset folder.
    """
    data_dir = Path(data_dir)
    spec_path = data_dir / DATASET_FILE
    try:
        _, cases = discover_cases(data_dir)
    except yaml.YAMLError as error:
        message = " ".join(str(error).split())
        return [Problem(str(data_dir), spec_path, f"invalid YAML ({message}); fix the file or re-run `unet ingest`")]
    except (OSError, ValueError) as error:
        return [Problem(str(data_dir), spec_path, str(error))]

    problems: list[Problem] = []
    for case in cases:
        problems.extend(validate_case(case, max_voxels=max_voxels))
    return problems


def _missing_file_fix(kind: str) -> str:
    if kind == "label":
        return "restore the file, or set label=None to treat the case as unlabelled"
    if kind == "mask":
        return "restore the file, or set mask=None to use the case without a brain mask"
    return "restore the file or drop the case"


def _one_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {' '.join(str(error).split())}"


def _check_file(
    path: Path, kind: str, convention: LabelConvention | None, max_voxels: int, report: _Report
) -> _Grid | None:
    """Check one file and return its grid when the header is usable (finite affine included), or None."""
    try:
        # nib.load reads only the header, so the voxel data stays on disk until _read_array.
        image = nib.load(str(path))
    except _HEADER_ERRORS as error:
        report(path, f"cannot read the NIfTI header ({_one_line(error)}); re-export or re-download the file")
        return None

    shape = tuple(int(size) for size in image.shape)
    header_usable = _check_shape(path, shape, max_voxels, report)

    affine = np.asarray(image.affine, dtype=np.float64)
    affine_is_finite = bool(np.all(np.isfinite(affine)))
    if not affine_is_finite:
        report(path, "affine contains NaN or inf values; fix the sform/qform of the file or re-export it")

    if kind == "label":
        _check_label_scaling(path, image, report)

    if not header_usable:
        return None

    # A file with a broken affine is still read in full, but it is left out of the grid comparison.
    grid = _Grid(path, shape[:3], affine) if affine_is_finite else None
    try:
        array = _read_array(path, image)
    except _DATA_ERRORS as error:
        report(
            path,
            f"cannot read the voxel data, the file is truncated or corrupt ({_one_line(error)}); "
            "re-download or re-export the file",
        )
        return grid

    values = _finite_values(path, array, report)
    if kind == "image":
        _check_image_values(path, values, report)
    elif kind == "label":
        _check_label_values(path, values, convention, report)
    else:
        _check_mask_values(path, values, report)
    return grid


def _check_shape(path: Path, shape: tuple[int, ...], max_voxels: int, report: _Report) -> bool:
    """Report a header shape that is not 3D, too large or empty; return whether the data can be read."""
    shape_text = _format_shape(shape)
    has_trailing_singleton = len(shape) == 4 and shape[3] == 1
    header_usable = True

    if len(shape) == 4 and not has_trailing_singleton:
        report(
            path,
            f"contains 4D data of shape {shape_text} where a 3D volume is expected; "
            "split the 4D file into one 3D file per volume",
        )
        header_usable = False
    elif len(shape) != 3 and not has_trailing_singleton:
        report(path, f"has {len(shape)} dimensions (shape {shape_text}) where a 3D volume is expected; re-export it as 3D")
        header_usable = False

    voxels = math.prod(shape)
    if voxels > max_voxels:
        report(
            path,
            f"header declares shape {shape_text} ({voxels} voxels), more than the limit of {max_voxels}; "
            "check that the header is not corrupt, or crop or resample the volume (or raise max_voxels)",
        )
        header_usable = False
    elif voxels == 0:
        report(path, f"header declares shape {shape_text}, which contains no voxels; re-export the file")
        header_usable = False
    return header_usable


def _read_array(path: Path, image: nib.spatialimages.SpatialImage) -> np.ndarray:
    """Read the whole voxel array with the header's scaling applied, verifying gzip integrity."""
    if not isinstance(image, nib.Nifti1Image):
        # NOTE: other formats are read through nibabel alone, which does not verify a gzip CRC.
        return np.asanyarray(image.dataobj)

    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as stream:
        streamed = type(image).from_file_map({"image": nib.FileHolder(fileobj=stream)}, mmap=False)
        array = np.asanyarray(streamed.dataobj)
        if isinstance(stream, gzip.GzipFile):
            # nibabel stops at the end of the voxel data, before the gzip trailer. Reading to
            # the end makes gzip check the CRC, which catches damage that still inflates.
            while stream.read(_DRAIN_CHUNK_BYTES):
                pass
    return array


def _finite_values(path: Path, array: np.ndarray, report: _Report) -> np.ndarray:
    """Report NaN and inf voxels and return the finite values (the array itself when all are finite)."""
    if array.dtype.kind not in "fc":
        return array
    finite = np.isfinite(array)
    non_finite = array.size - int(np.count_nonzero(finite))
    if non_finite == 0:
        return array
    report(
        path,
        f"contains {non_finite} non-finite voxels (NaN or inf) of {array.size}; "
        "re-export the file, or replace them with the background value",
    )
    return array[finite]


def _check_image_values(path: Path, values: np.ndarray, report: _Report) -> None:
    if values.size == 0:
        return
    low, high = values.min(), values.max()
    if low == high:
        report(
            path,
            f"image is constant (every voxel is {_format_value(low)}); "
            "re-export the modality from the source scan or drop the case",
        )


def _check_mask_values(path: Path, values: np.ndarray, report: _Report) -> None:
    if not np.any(values):
        report(path, "brain mask is empty (no nonzero voxel); regenerate the mask or set mask=None")


def _check_label_scaling(path: Path, image: nib.spatialimages.SpatialImage, report: _Report) -> None:
    """Report a label map whose header rescales the stored values (value * scl_slope + scl_inter)."""
    slope, inter = _stored_scaling(path, image)
    slope_is_identity = math.isnan(slope) or slope in (0.0, 1.0)
    inter_is_identity = math.isnan(inter) or inter == 0.0
    if slope_is_identity and inter_is_identity:
        return
    report(
        path,
        f"label map header sets scl_slope={slope:g} and scl_inter={inter:g}, so readers may rescale the stored "
        "labels; re-save the label map with scl_slope=1 and scl_inter=0",
    )


def _stored_scaling(path: Path, image: nib.spatialimages.SpatialImage) -> tuple[float, float]:
    """Return (scl_slope, scl_inter) as stored in the file.

    nibabel 5.4 moves the scaling into the data proxy and sets the loaded header's fields to
    NaN, dropping scl_inter when scl_slope is 0 or NaN, so NIfTI headers are read again here.
    """
    if isinstance(image, nib.Nifti1Image):
        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "rb") as stream:
            header = type(image.header).from_fileobj(stream, check=False)
        return float(header["scl_slope"]), float(header["scl_inter"])
    proxy = image.dataobj
    return float(getattr(proxy, "slope", 1.0)), float(getattr(proxy, "inter", 0.0))


def _check_label_values(path: Path, values: np.ndarray, convention: LabelConvention | None, report: _Report) -> None:
    unique, counts = np.unique(values, return_counts=True)
    is_integer = unique == np.round(unique)

    if not np.all(is_integer):
        listed = ", ".join(_format_value(value) for value in unique[~is_integer][:5])
        voxels = int(counts[~is_integer].sum())
        report(
            path,
            f"label map has non-integer values {listed} ({voxels} voxels); a label map must contain integer "
            "class values, so check that an image was not given as the label or re-export it with "
            "nearest-neighbour interpolation",
        )

    if convention is None:
        report(path, "label map has no label convention; declare the case's label_convention")
        return

    outside = [
        (int(value), int(count))
        for value, count in zip(unique[is_integer], counts[is_integer])
        if int(value) not in convention.mapping
    ]
    if outside:
        listed = ", ".join(f"{value} ({count} voxels)" for value, count in outside)
        allowed = ", ".join(str(value) for value in sorted(convention.mapping))
        report(
            path,
            f"label values {listed} are not part of the '{convention.name}' convention (allowed: {allowed}); "
            "declare the right label_convention or an explicit mapping",
        )


def _compare_grids(grids: list[_Grid], report: _Report) -> None:
    """Report every file whose shape or affine differs from the first usable file of the case."""
    if not grids:
        return
    reference = grids[0]
    for grid in grids[1:]:
        if grid.shape != reference.shape:
            report(
                grid.path,
                f"shape {_format_shape(grid.shape)} differs from shape {_format_shape(reference.shape)} of "
                f"{reference.path.name}; resample the files of the case onto one voxel grid",
            )
        difference = float(np.max(np.abs(grid.affine - reference.affine)))
        if difference > AFFINE_TOLERANCE_MM:
            report(
                grid.path,
                f"affine differs from the affine of {reference.path.name} by up to {difference:.4g} mm "
                f"(tolerance {AFFINE_TOLERANCE_MM:g} mm); register or resample the files of the case onto one grid, "
                "or fix the sform/qform of the wrong file",
            )


def _format_shape(shape: tuple[int, ...]) -> str:
    return "x".join(str(size) for size in shape)


def _format_value(value) -> str:
    return f"{float(value):g}"
