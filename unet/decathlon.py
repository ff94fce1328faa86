"""Medical Segmentation Decathlon layout (Task01_BrainTumour): 4D images split into one file per modality.

The Decathlon stores each case as one 4D image `imagesTr/<case>.nii.gz` (X, Y, Z, modality),
with the channel order in `dataset.json` under "modality", and labels in
`labelsTr/<case>.nii.gz` (1 edema, 2 non-enhancing tumour, 3 enhancing tumour). Ingestion
splits every 4D image into 3D files named `<case>_<modality>.nii.gz` in a staging folder, then ingests
that folder like any other; each split file keeps the source's affine, header and data type.
"""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path
from typing import Any

import nibabel as nib

from unet.io import strip_nifti_suffix, write_bytes_atomic

log = logging.getLogger(__name__)

# Decathlon modality names (compared in lower case) to the names used here.
MODALITY_NAMES = {"flair": "flair", "t1w": "t1", "t1": "t1", "t1gd": "t1c", "t1c": "t1c", "t1ce": "t1c",
                  "t2w": "t2", "t2": "t2"}
RECORD_FILE = ".decathlon-source.json"


def is_decathlon(source: Path) -> bool:
    return (source / "dataset.json").is_file() and (source / "imagesTr").is_dir()


def channel_order(source: Path) -> list[str]:
    """Return the modality names in channel order, read from dataset.json's "modality" mapping."""
    path = source / "dataset.json"
    try:
        modalities = json.loads(path.read_text())["modality"]
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(f"{path}: cannot read the 'modality' mapping ({error}); check the Decathlon dataset.json") from error
    names = []
    for index in sorted(modalities, key=int):
        name = str(modalities[index]).lower()
        if name not in MODALITY_NAMES:
            raise ValueError(f"{path}: unknown modality '{modalities[index]}' at channel {index}; "
                             f"known: {sorted(set(MODALITY_NAMES))}")
        names.append(MODALITY_NAMES[name])
    return names


def _case_files(folder: Path) -> list[Path]:
    # Archives packed on macOS carry "._name" resource-fork files next to every image; they are not NIfTI.
    return sorted(p for p in folder.glob("*.nii*") if not p.name.startswith("._"))


def split_to_staging(source: Path, staging: Path) -> tuple[list[str], bool]:
    """Write every case of a Decathlon folder into `staging` as `<case>/<case>_<modality>.nii.gz` files.

    Returns (modalities in channel order, whether any label file exists). A case whose 4D
    source file and label have the same size and modification time as at the last split is
    not split again.
    """
    modalities = channel_order(source)
    staging.mkdir(parents=True, exist_ok=True)
    record_path = staging / RECORD_FILE
    record: dict[str, Any] = json.loads(record_path.read_text()) if record_path.is_file() else {}
    labelled = False
    for image_path in _case_files(source / "imagesTr"):
        case = strip_nifti_suffix(image_path.name)
        label_path = source / "labelsTr" / image_path.name
        stamp = [image_path.stat().st_size, image_path.stat().st_mtime_ns]
        if label_path.is_file():
            labelled = True
            stamp += [label_path.stat().st_size, label_path.stat().st_mtime_ns]
        folder = staging / case
        if record.get(case) == stamp and folder.is_dir():
            continue
        image = nib.load(str(image_path))
        if len(image.shape) != 4 or image.shape[3] != len(modalities):
            raise ValueError(f"{image_path}: expected a 4D image with {len(modalities)} channels "
                             f"({', '.join(modalities)}), found shape {image.shape}")
        for channel, modality in enumerate(modalities):
            volume = image.slicer[..., channel]
            raw = gzip.compress(volume.to_bytes(), compresslevel=6, mtime=0)
            write_bytes_atomic(raw, folder / f"{case}_{modality}.nii.gz")
        if label_path.is_file():
            data = label_path.read_bytes()
            if not label_path.name.endswith(".gz"):
                data = gzip.compress(data, compresslevel=6, mtime=0)
            write_bytes_atomic(data, folder / f"{case}_seg.nii.gz")
        record[case] = stamp
        write_bytes_atomic(json.dumps(record, indent=1, sort_keys=True).encode(), record_path)
        log.info("split Decathlon case %s into %s", case, folder)
    return modalities, labelled
