"""Tests of unet.validate on a real BraTS case and on broken variants derived from it.

The real cases are read from UNET_SAMPLES (default: ../shared/data/real next to the
repository); the tests are skipped when that folder is absent. Broken variants are cropped to
a 40x40x20 block around the tumour and written to tmp_path.
"""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from unet.io import CaseFiles, DatasetInfo
from unet.labels import get_convention
from unet.validate import Problem, validate_case, validate_dataset

SAMPLES = Path(os.environ.get("UNET_SAMPLES", Path(__file__).resolve().parents[2] / "shared" / "data" / "real"))
CASE_ID = "BraTS2021_00006"
CASE_DIR = SAMPLES / "brain-tumor-segmentation-gp" / CASE_ID
MODALITIES = ("t1", "t1ce", "t2", "flair")
# A block around the tumour that contains the labels 0, 1, 2 and 4.
CROP = (slice(106, 146), slice(47, 87), slice(59, 79))


def file_name(name: str) -> str:
    return f"{CASE_ID}_{name}.nii.gz"


@pytest.fixture(scope="module")
def cropped() -> dict[str, nib.Nifti1Image]:
    """The real case cropped to CROP, in memory, plus a brain mask (FLAIR > 0)."""
    if not CASE_DIR.is_dir():
        pytest.skip(f"real sample case not found at {CASE_DIR}; set UNET_SAMPLES")
    images = {}
    for name in (*MODALITIES, "seg"):
        sliced = nib.load(CASE_DIR / file_name(name)).slicer[CROP]
        images[name] = nib.Nifti1Image(np.asanyarray(sliced.dataobj), sliced.affine)
    flair = images["flair"]
    images["mask"] = nib.Nifti1Image((np.asanyarray(flair.dataobj) > 0).astype(np.uint8), flair.affine)
    return images


@pytest.fixture
def volumes(cropped) -> dict[str, nib.Nifti1Image]:
    """A per-test copy of the cropped case that a test may change before write_case."""
    return dict(cropped)


def replace_data(image: nib.Nifti1Image, array: np.ndarray, affine: np.ndarray | None = None) -> nib.Nifti1Image:
    return nib.Nifti1Image(array, image.affine if affine is None else affine)


def write_case(folder: Path, volumes: dict[str, nib.Nifti1Image], convention: str = "brats2017") -> CaseFiles:
    """Write the volumes as <folder>/<case>_<name>.nii.gz and return the case (label 'seg', mask 'mask')."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, image in volumes.items():
        nib.save(image, folder / file_name(name))
    return CaseFiles(
        case_id=CASE_ID,
        images={modality: folder / file_name(modality) for modality in MODALITIES},
        label=folder / file_name("seg"),
        mask=folder / file_name("mask"),
        label_convention=get_convention(convention),
    )


def write_with_header_fields(image: nib.Nifti1Image, path: Path, **fields) -> None:
    """Write `image` as .nii.gz with header fields overwritten after nibabel has serialised it.

    nibabel recomputes fields such as scl_slope on save, so broken headers are patched in the bytes.
    """
    raw = bytearray(image.to_bytes())
    header = nib.Nifti1Header(binaryblock=bytes(raw[:348]))
    for key, value in fields.items():
        if key == "shape":
            header.set_data_shape(value)
        else:
            header[key] = value
    raw[:348] = header.binaryblock
    path.write_bytes(gzip.compress(bytes(raw)))


def single_problem(problems: list[Problem]) -> str:
    assert len(problems) == 1, [str(problem) for problem in problems]
    return str(problems[0])


def test_problem_str_names_case_and_file():
    problem = Problem("case-1", Path("/data/case-1/case-1_t1.nii.gz"), "something is wrong")
    assert str(problem) == "case-1: case-1_t1.nii.gz: something is wrong"


def test_problem_str_without_file():
    assert str(Problem("case-1", None, "something is wrong")) == "case-1: -: something is wrong"


def test_real_case_valid():
    if not CASE_DIR.is_dir():
        pytest.skip(f"real sample case not found at {CASE_DIR}; set UNET_SAMPLES")
    case = CaseFiles(
        case_id=CASE_ID,
        images={modality: CASE_DIR / file_name(modality) for modality in MODALITIES},
        label=CASE_DIR / file_name("seg"),
        label_convention=get_convention("brats2017"),
    )
    assert validate_case(case) == []


def test_cropped_case_valid(tmp_path, volumes):
    assert validate_case(write_case(tmp_path, volumes)) == []


def test_missing_modality(tmp_path, volumes):
    case = write_case(tmp_path, volumes)
    case.images["t2"].unlink()
    line = single_problem(validate_case(case))
    assert line.startswith(f"{CASE_ID}: {file_name('t2')}: ")
    assert "t2 image not found" in line


def test_missing_label(tmp_path, volumes):
    case = write_case(tmp_path, volumes)
    case.label.unlink()
    line = single_problem(validate_case(case))
    assert line.startswith(f"{CASE_ID}: {file_name('seg')}: ")
    assert "label map not found" in line


def test_missing_mask(tmp_path, volumes):
    case = write_case(tmp_path, volumes)
    case.mask.unlink()
    line = single_problem(validate_case(case))
    assert line.startswith(f"{CASE_ID}: {file_name('mask')}: ")
    assert "brain mask not found" in line


def test_truncated_gzip(tmp_path, volumes):
    case = write_case(tmp_path, volumes)
    raw = case.images["flair"].read_bytes()
    case.images["flair"].write_bytes(raw[: len(raw) // 2])
    line = single_problem(validate_case(case))
    assert line.startswith(f"{CASE_ID}: {file_name('flair')}: ")
    assert "truncated or corrupt" in line


def test_gzip_crc_mismatch(tmp_path, volumes):
    # The CRC sits in the 8-byte gzip trailer, after the data nibabel reads, so only a full read detects it.
    case = write_case(tmp_path, volumes)
    raw = bytearray(case.images["t1"].read_bytes())
    raw[-8] ^= 0xFF
    case.images["t1"].write_bytes(bytes(raw))
    line = single_problem(validate_case(case))
    assert line.startswith(f"{CASE_ID}: {file_name('t1')}: ")
    assert "truncated or corrupt" in line
    assert "CRC" in line


def test_unreadable_header(tmp_path, volumes):
    case = write_case(tmp_path, volumes)
    case.images["t1ce"].write_bytes(b"not a NIfTI file" * 64)
    line = single_problem(validate_case(case))
    assert line.startswith(f"{CASE_ID}: {file_name('t1ce')}: ")
    assert "cannot read the NIfTI header" in line


def test_too_large_header_not_read(tmp_path, volumes):
    # The data block is the small cropped one: reading it against the huge shape would fail as
    # truncated, so a single problem shows that the data was never read.
    case = write_case(tmp_path, volumes)
    write_with_header_fields(volumes["t2"], case.images["t2"], shape=(4096, 4096, 4096))
    line = single_problem(validate_case(case))
    assert line.startswith(f"{CASE_ID}: {file_name('t2')}: ")
    assert "4096x4096x4096 (68719476736 voxels)" in line
    assert "more than the limit" in line


def test_max_voxels_limit_applies_to_every_file(tmp_path, volumes):
    case = write_case(tmp_path, volumes)
    problems = validate_case(case, max_voxels=40 * 40 * 20 - 1)
    assert [problem.file.name for problem in problems] == [file_name(name) for name in (*MODALITIES, "seg", "mask")]
    assert all("more than the limit of 31999" in problem.message for problem in problems)


def test_4d_image(tmp_path, volumes):
    flair = np.asanyarray(volumes["flair"].dataobj)
    volumes["flair"] = replace_data(volumes["flair"], np.stack([flair, flair], axis=3))
    line = single_problem(validate_case(write_case(tmp_path, volumes)))
    assert line.startswith(f"{CASE_ID}: {file_name('flair')}: ")
    assert "4D data of shape 40x40x20x2" in line
    assert "split the 4D file" in line


def test_trailing_singleton_axis_accepted(tmp_path, volumes):
    flair = np.asanyarray(volumes["flair"].dataobj)
    volumes["flair"] = replace_data(volumes["flair"], flair[..., np.newaxis])
    assert validate_case(write_case(tmp_path, volumes)) == []


def test_shape_mismatch(tmp_path, volumes):
    t2 = np.asanyarray(volumes["t2"].dataobj)
    volumes["t2"] = replace_data(volumes["t2"], np.ascontiguousarray(t2[:, :, :19]))
    line = single_problem(validate_case(write_case(tmp_path, volumes)))
    assert line.startswith(f"{CASE_ID}: {file_name('t2')}: ")
    assert "shape 40x40x19 differs from shape 40x40x20" in line
    assert file_name("t1") in line.split(": ", 2)[2]


def test_affine_mismatch(tmp_path, volumes):
    affine = volumes["t2"].affine.copy()
    affine[0, 3] += 0.5
    volumes["t2"] = replace_data(volumes["t2"], np.asanyarray(volumes["t2"].dataobj), affine)
    line = single_problem(validate_case(write_case(tmp_path, volumes)))
    assert line.startswith(f"{CASE_ID}: {file_name('t2')}: ")
    assert "by up to 0.5 mm" in line
    assert f"affine of {file_name('t1')}" in line


def test_affine_within_tolerance(tmp_path, volumes):
    affine = volumes["t2"].affine.copy()
    affine[0, 3] += 1e-4
    volumes["t2"] = replace_data(volumes["t2"], np.asanyarray(volumes["t2"].dataobj), affine)
    assert validate_case(write_case(tmp_path, volumes)) == []


def test_non_finite_affine(tmp_path, volumes):
    affine = volumes["t2"].affine.copy()
    affine[0, 3] = np.nan
    volumes["t2"] = replace_data(volumes["t2"], np.asanyarray(volumes["t2"].dataobj), affine)
    line = single_problem(validate_case(write_case(tmp_path, volumes)))
    assert line.startswith(f"{CASE_ID}: {file_name('t2')}: ")
    assert "affine contains NaN or inf" in line


def test_non_finite_voxels(tmp_path, volumes):
    flair = np.asanyarray(volumes["flair"].dataobj).astype(np.float32)
    flair[0, 0, :3] = np.nan
    flair[1, 1, :2] = np.inf
    volumes["flair"] = replace_data(volumes["flair"], flair)
    line = single_problem(validate_case(write_case(tmp_path, volumes)))
    assert line.startswith(f"{CASE_ID}: {file_name('flair')}: ")
    assert "5 non-finite voxels" in line


def test_constant_modality(tmp_path, volumes):
    volumes["t1"] = replace_data(volumes["t1"], np.zeros((40, 40, 20), dtype=np.int16))
    line = single_problem(validate_case(write_case(tmp_path, volumes)))
    assert line.startswith(f"{CASE_ID}: {file_name('t1')}: ")
    assert "image is constant (every voxel is 0)" in line


def test_label_non_integer(tmp_path, volumes):
    seg = np.asanyarray(volumes["seg"].dataobj).astype(np.float32)
    seg[0, 0, :7] = 0.5
    volumes["seg"] = replace_data(volumes["seg"], seg)
    line = single_problem(validate_case(write_case(tmp_path, volumes)))
    assert line.startswith(f"{CASE_ID}: {file_name('seg')}: ")
    assert "non-integer values 0.5 (7 voxels)" in line


def test_label_outside_convention(tmp_path, volumes):
    count = int(np.count_nonzero(np.asanyarray(volumes["seg"].dataobj) == 4))
    line = single_problem(validate_case(write_case(tmp_path, volumes, convention="brats2023")))
    assert line.startswith(f"{CASE_ID}: {file_name('seg')}: ")
    assert f"label values 4 ({count} voxels)" in line
    assert "'brats2023' convention" in line


def test_label_without_convention(tmp_path, volumes):
    case = write_case(tmp_path, volumes)
    case.label_convention = None
    line = single_problem(validate_case(case))
    assert line.startswith(f"{CASE_ID}: {file_name('seg')}: ")
    assert "no label convention" in line


@pytest.mark.parametrize(
    ("slope", "intercept", "expected"),
    [
        (2.0, 0.0, "scl_slope=2 and scl_inter=0"),
        (1.0, 1.0, "scl_slope=1 and scl_inter=1"),
        (np.nan, 5.0, "scl_slope=nan and scl_inter=5"),
    ],
)
def test_label_scaling(tmp_path, volumes, slope, intercept, expected):
    # Labels clipped to 0-1 stay valid brats2017 values under each scaling, so the scaling is
    # the only finding.
    case = write_case(tmp_path, volumes)
    seg = np.minimum(np.asanyarray(volumes["seg"].dataobj), 1)
    write_with_header_fields(replace_data(volumes["seg"], seg), case.label, scl_slope=slope, scl_inter=intercept)
    line = single_problem(validate_case(case))
    assert line.startswith(f"{CASE_ID}: {file_name('seg')}: ")
    assert expected in line


@pytest.mark.parametrize(("slope", "intercept"), [(np.nan, np.nan), (np.nan, 0.0), (0.0, 0.0), (1.0, 0.0)])
def test_label_identity_scaling_accepted(tmp_path, volumes, slope, intercept):
    case = write_case(tmp_path, volumes)
    write_with_header_fields(volumes["seg"], case.label, scl_slope=slope, scl_inter=intercept)
    assert validate_case(case) == []


def test_empty_mask(tmp_path, volumes):
    volumes["mask"] = replace_data(volumes["mask"], np.zeros((40, 40, 20), dtype=np.uint8))
    line = single_problem(validate_case(write_case(tmp_path, volumes)))
    assert line.startswith(f"{CASE_ID}: {file_name('mask')}: ")
    assert "brain mask is empty" in line


def write_canonical_case(data_dir: Path, case_id: str, volumes: dict[str, nib.Nifti1Image]) -> None:
    folder = data_dir / case_id
    folder.mkdir(parents=True)
    for modality in MODALITIES:
        nib.save(volumes[modality], folder / f"{case_id}_{modality}.nii.gz")
    seg = volumes["seg"]
    canonical = get_convention("brats2017").to_canonical(np.asanyarray(seg.dataobj), case_id)
    nib.save(nib.Nifti1Image(canonical, seg.affine), folder / f"{case_id}_seg.nii.gz")


def test_dataset_reports_broken_case_only(tmp_path, volumes):
    info = DatasetInfo(name="tiny", modalities=list(MODALITIES), cases=["good", "broken"], split={"train": ["good", "broken"]})
    (tmp_path / "dataset.yaml").write_text(yaml.safe_dump(info.to_dict(), sort_keys=False))
    write_canonical_case(tmp_path, "good", volumes)
    write_canonical_case(tmp_path, "broken", volumes)
    (tmp_path / "broken" / "broken_t1ce.nii.gz").unlink()
    problems = validate_dataset(tmp_path)
    assert [problem.case_id for problem in problems] == ["broken"]
    assert problems[0].file.name == "broken_t1ce.nii.gz"


def test_dataset_without_yaml(tmp_path):
    line = single_problem(validate_dataset(tmp_path))
    assert line.startswith(f"{tmp_path}: dataset.yaml: ")
    assert "not found" in line


def test_dataset_invalid_yaml(tmp_path):
    (tmp_path / "dataset.yaml").write_text("name: [unclosed\n")
    line = single_problem(validate_dataset(tmp_path))
    assert "invalid YAML" in line


def _unet(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "unet.cli", *args], capture_output=True, text=True)


def test_validate_cli_valid_dataset(cropped_source, tmp_path):
    from unet.ingest import ingest

    ingest(cropped_source, tmp_path / "data", use_dvc=False)
    result = _unet("validate", str(tmp_path / "data"))
    assert result.returncode == 0
    assert "every case is valid" in result.stdout


def test_validate_cli_reports_truncated_file(cropped_source, tmp_path):
    from unet.ingest import ingest

    ingest(cropped_source, tmp_path / "data", use_dvc=False)
    damaged = tmp_path / "data" / "TCGA-DU-7294" / "TCGA-DU-7294_flair.nii.gz"
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    result = _unet("validate", str(tmp_path / "data"))
    assert result.returncode == 1
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("TCGA-DU-7294: TCGA-DU-7294_flair.nii.gz:")


def test_validate_cli_missing_dataset(tmp_path):
    result = _unet("validate", str(tmp_path / "absent"))
    assert result.returncode == 1
    assert "dataset.yaml" in result.stdout
