"""NIfTI reading and writing, orientation changes and the canonical dataset layout.

Every volume that leaves this module keeps the affine and the qform/sform codes of the file
it came from, so masks written here open aligned over the input scans in 3D Slicer or
ITK-SNAP.

Canonical layout of an ingested dataset (what data.dvc versions):

    DIR/dataset.yaml                      name, channel order, split, per-case source convention
    DIR/<case_id>/<case_id>_<modality>.nii.gz
    DIR/<case_id>/<case_id>_seg.nii.gz    canonical labels 0-3, uint8 (absent for unlabelled cases)
    DIR/<case_id>/<case_id>_mask.nii.gz   optional brain mask, uint8 0/1
"""

from __future__ import annotations

import gzip
import os
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import yaml
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

from unet.labels import LabelConvention, get_convention

DATASET_FILE = "dataset.yaml"
NIFTI_SUFFIXES = (".nii.gz", ".nii")


@dataclass
class CaseFiles:
    """The files of one case: one image per modality, and optionally a label map and a brain mask."""

    case_id: str
    images: dict[str, Path]
    """Modality name to file, in channel order."""
    label: Path | None = None
    mask: Path | None = None
    label_convention: LabelConvention | None = None
    """Convention of `label`; None for unlabelled cases."""


@dataclass
class DatasetInfo:
    """Contents of a canonical dataset.yaml."""

    name: str
    modalities: list[str]
    cases: list[str]
    split: dict[str, list[str]] = field(default_factory=dict)
    source_conventions: dict[str, str] = field(default_factory=dict)
    """Case id to the label convention its source used (labels on disk are canonical)."""

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "modalities": list(self.modalities),
            "label_convention": "canonical",
            "split": {key: list(value) for key, value in self.split.items()},
            "cases": list(self.cases),
            "source_conventions": dict(self.source_conventions),
        }


def strip_nifti_suffix(name: str) -> str:
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def load_volume(path: Path, dtype: type | None = np.float32) -> tuple[np.ndarray, nib.Nifti1Image]:
    """Read a whole NIfTI volume, returning (array, image); a trailing singleton 4th axis is dropped.

    `dtype=None` keeps the stored data type when the header applies no scaling.

    Reading the whole array detects truncated files and most corrupt gzip streams, but nibabel
    stops before the gzip CRC trailer; `unet.validate.validate_case` also checks the CRC.
    Raises ValueError with the file name and the fix for unreadable or non-3D files.
    """
    try:
        image = nib.load(str(path))
        array = np.asarray(image.dataobj, dtype=dtype)
    except (OSError, EOFError, ValueError, zlib.error, nib.filebasedimages.ImageFileError) as error:
        raise ValueError(f"{path}: cannot read NIfTI ({error}); re-export or re-download the file") from error
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise ValueError(f"{path}: expected a 3D volume, found shape {array.shape}; split 4D files into one file per modality")
    return array, image


def publish_temporary(temporary: str | Path, path: Path) -> None:
    """Rename a finished temporary file onto `path`, with the usual umask-based mode.

    mkstemp creates files readable by the owner only, which other users of a shared dataset
    or cache could not read.
    """
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temporary, 0o666 & ~umask)
    os.replace(temporary, path)


def write_bytes_atomic(data: bytes, path: Path) -> None:
    """Write bytes to `path` through a temporary file in the same folder, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
        publish_temporary(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def save_like(array: np.ndarray, reference: nib.Nifti1Image, path: Path, dtype: type = np.uint8) -> None:
    """Save `array` as NIfTI with the reference's affine, header and qform/sform codes.

    Output is deterministic: gzip gets mtime 0 and no file name, so the same array always
    gives the same bytes (and the same DVC hash).
    """
    header = reference.header.copy()
    header.set_data_dtype(dtype)
    image = nib.Nifti1Image(np.asarray(array, dtype=dtype), reference.affine, header)
    # A label map must not be rescaled on read: clear any slope/intercept from the reference.
    image.header.set_slope_inter(1.0, 0.0)
    qform, qform_code = reference.get_qform(coded=True)
    sform, sform_code = reference.get_sform(coded=True)
    image.set_qform(reference.affine if qform is None else qform, int(qform_code))
    image.set_sform(reference.affine if sform is None else sform, int(sform_code))
    raw = image.to_bytes()
    if path.name.endswith(".gz"):
        raw = gzip.compress(raw, compresslevel=6, mtime=0)
    write_bytes_atomic(raw, path)


def orientation_to_ras(affine: np.ndarray) -> np.ndarray:
    """Return the nibabel orientation transform that takes an array with this affine to RAS+."""
    return ornt_transform(io_orientation(affine), axcodes2ornt("RAS"))


def reorient(array: np.ndarray, transform: np.ndarray) -> np.ndarray:
    """Apply a nibabel orientation transform to the three spatial axes of (X, Y, Z) or (C, X, Y, Z)."""
    if array.ndim == 3:
        return apply_orientation(array, transform)
    return np.stack([apply_orientation(channel, transform) for channel in array])


def invert_orientation(transform: np.ndarray) -> np.ndarray:
    """Return the transform that undoes `transform` (used to go from RAS back to the file's axes)."""
    inverse = np.zeros_like(transform)
    for source_axis, (target_axis, flip) in enumerate(transform):
        inverse[int(target_axis)] = (source_axis, flip)
    return inverse


def axis_codes(affine: np.ndarray) -> str:
    return "".join(nib.aff2axcodes(affine))


def read_dataset(data_dir: Path) -> DatasetInfo:
    """Read DIR/dataset.yaml of a canonical dataset."""
    spec_path = Path(data_dir) / DATASET_FILE
    if not spec_path.is_file():
        raise FileNotFoundError(
            f"{spec_path} not found: {data_dir} is not an ingested dataset; run `unet ingest SOURCE DEST` "
            "on the raw cases first, then use DEST"
        )
    try:
        raw = yaml.safe_load(spec_path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"{spec_path}: invalid YAML ({error}); re-run `unet ingest` to rewrite it") from error
    try:
        return DatasetInfo(
            name=str(raw["name"]),
            modalities=[str(m) for m in raw["modalities"]],
            cases=[str(c) for c in raw["cases"]],
            split={str(k): [str(c) for c in v] for k, v in (raw.get("split") or {}).items()},
            source_conventions={str(k): str(v) for k, v in (raw.get("source_conventions") or {}).items()},
        )
    except (KeyError, TypeError) as error:
        raise ValueError(f"{spec_path}: missing or malformed key {error}; re-run `unet ingest`") from error


def write_dataset(data_dir: Path, info: DatasetInfo) -> None:
    text = yaml.safe_dump(info.to_dict(), sort_keys=False)
    write_bytes_atomic(text.encode(), Path(data_dir) / DATASET_FILE)


def canonical_case_files(data_dir: Path, info: DatasetInfo, case_id: str) -> CaseFiles:
    """Locate the files of one case in the canonical layout (label and mask only where present)."""
    folder = Path(data_dir) / case_id
    images = {modality: folder / f"{case_id}_{modality}.nii.gz" for modality in info.modalities}
    label = folder / f"{case_id}_seg.nii.gz"
    mask = folder / f"{case_id}_mask.nii.gz"
    return CaseFiles(
        case_id=case_id,
        images=images,
        label=label if label.exists() else None,
        mask=mask if mask.exists() else None,
        label_convention=get_convention("canonical") if label.exists() else None,
    )


def discover_cases(data_dir: Path) -> tuple[DatasetInfo, list[CaseFiles]]:
    """Return the dataset description and the files of every case listed in DIR/dataset.yaml."""
    info = read_dataset(data_dir)
    return info, [canonical_case_files(data_dir, info, case_id) for case_id in info.cases]
