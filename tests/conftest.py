"""Shared fixtures: the real sample cases (never copied into the repository) and small crops of them.

The samples are read from $UNET_SAMPLES, by default ../shared/data/real beside the repository.
Tests that need them are skipped when the folder is absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def samples_dir() -> Path:
    return Path(os.environ.get("UNET_SAMPLES", REPO.parent / "shared" / "data" / "real"))


@pytest.fixture(scope="session")
def samples() -> Path:
    folder = samples_dir()
    if not (folder / "brain-tumor-segmentation-gp" / "BraTS2021_00006").is_dir():
        pytest.skip(f"real sample cases not found in {folder}; set UNET_SAMPLES")
    return folder


# Real four-modality cases with BraTS 2017-2022 labels: (folder, t1, t1c, t2, flair, label) relative to the samples.
REAL_CASES = {
    "BraTS2021_00006": ("brain-tumor-segmentation-gp/BraTS2021_00006", "BraTS2021_00006_t1.nii.gz",
                        "BraTS2021_00006_t1ce.nii.gz", "BraTS2021_00006_t2.nii.gz", "BraTS2021_00006_flair.nii.gz",
                        "BraTS2021_00006_seg.nii.gz"),
    "TCGA-DU-7294": ("brainlesion-tutorials/TCGA-DU-7294", "raw_bet/TCGA-DU-7294_t1_bet.nii.gz",
                     "raw_bet/TCGA-DU-7294_t1c_bet.nii.gz", "raw_bet/TCGA-DU-7294_t2_bet.nii.gz",
                     "raw_bet/TCGA-DU-7294_fla_bet.nii.gz", "fusion/mav.nii.gz"),
    "OtherEXampleFromTCIA": ("brainlesion-tutorials/OtherEXampleFromTCIA", "raw_bet/OtherEXampleFromTCIA_t1_bet.nii.gz",
                             "raw_bet/OtherEXampleFromTCIA_t1c_bet.nii.gz", "raw_bet/OtherEXampleFromTCIA_t2_bet.nii.gz",
                             "raw_bet/OtherEXampleFromTCIA_fla_bet.nii.gz", "fusion/mav.nii.gz"),
}


def write_cropped_brats_case(samples: Path, case_id: str, dest: Path, size: tuple[int, int, int] = (64, 64, 24)) -> Path:
    """Write a crop of a real case, centred on its tumour, in BraTS 2021 naming under dest/<case_id>/.

    The crop goes through nibabel's slicer, so each file keeps a correct affine.
    """
    folder, *files = REAL_CASES[case_id]
    label_image = nib.load(str(samples / folder / files[4]))
    label = np.asarray(label_image.dataobj)
    centre = np.argwhere(label > 0).mean(axis=0).astype(int)
    window = tuple(
        slice(max(0, min(c - s // 2, label.shape[axis] - s)), max(0, min(c - s // 2, label.shape[axis] - s)) + s)
        for axis, (c, s) in enumerate(zip(centre, size))
    )
    out = dest / case_id
    out.mkdir(parents=True, exist_ok=True)
    for suffix, name in zip(("t1", "t1ce", "t2", "flair", "seg"), files):
        image = nib.load(str(samples / folder / name))
        cropped = image.slicer[window]
        nib.save(cropped, str(out / f"{case_id}_{suffix}.nii.gz"))
    return out


@pytest.fixture(scope="session")
def cropped_source(samples: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three real cases cropped around their tumours, in BraTS 2021 naming (recognised without a spec)."""
    dest = tmp_path_factory.mktemp("cropped-source")
    for case_id in REAL_CASES:
        write_cropped_brats_case(samples, case_id, dest)
    return dest
