import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from unet.ingest import IngestError, ingest, load_spec
from unet.io import discover_cases, read_dataset

REPO = Path(__file__).resolve().parents[1]
DEMO_SPEC = REPO / "configs" / "datasets" / "demo.yaml"


def _tree_digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def demo_data(samples, tmp_path_factory):
    dest = tmp_path_factory.mktemp("demo") / "data"
    report = ingest(samples, dest, DEMO_SPEC, use_dvc=False)
    return dest, report


def test_demo_spec_ingests_every_case(demo_data):
    dest, report = demo_data
    assert sorted(report.written) == ["BraTS2021_00006", "OtherEXampleFromTCIA", "TCGA-DU-7294", "pr138-preprocessed_case"]
    assert report.skipped == {}
    info = read_dataset(dest)
    assert info.modalities == ["t1", "t1c", "t2", "flair"]
    assert info.split == {"test": ["BraTS2021_00006"]}
    assert info.source_conventions["pr138-preprocessed_case"] == "brats2023"


@pytest.mark.parametrize("case_id,counts", [
    # BraTS 2021: 1 NCR 25506, 2 ED 85957, 4 ET 26448 -> canonical 3 ET.
    ("BraTS2021_00006", {1: 25506, 2: 85957, 3: 26448}),
    # BraTS 2023 convention already uses 3 for ET.
    ("pr138-preprocessed_case", {1: 14300, 2: 108566, 3: 21866}),
])
def test_labels_mapped_to_canonical(demo_data, case_id, counts):
    dest, _ = demo_data
    label = nib.load(str(dest / case_id / f"{case_id}_seg.nii.gz"))
    values, voxels = np.unique(np.asarray(label.dataobj), return_counts=True)
    assert dict(zip(values.tolist()[1:], voxels.tolist()[1:])) == counts
    assert label.get_data_dtype() == np.uint8


def test_images_copied_byte_for_byte(demo_data, samples):
    dest, _ = demo_data
    source = samples / "brain-tumor-segmentation-gp" / "BraTS2021_00006" / "BraTS2021_00006_t1ce.nii.gz"
    assert (dest / "BraTS2021_00006" / "BraTS2021_00006_t1c.nii.gz").read_bytes() == source.read_bytes()


def test_ingest_is_deterministic(demo_data, samples, tmp_path):
    dest, _ = demo_data
    again = tmp_path / "data"
    ingest(samples, again, DEMO_SPEC, use_dvc=False)
    assert _tree_digest(again) == _tree_digest(dest)


def test_ingest_again_skips_unchanged(demo_data, samples):
    dest, _ = demo_data
    report = ingest(samples, dest, DEMO_SPEC, use_dvc=False)
    assert report.written == []
    assert len(report.unchanged) == 4


def test_provenance_records_source_hashes(demo_data, samples):
    dest, _ = demo_data
    provenance = json.loads((dest / "provenance.json").read_text())
    record = provenance["cases"]["BraTS2021_00006"]["files"]["label"]
    source = samples / record["source"]
    assert record["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert record["size"] == source.stat().st_size


def test_brats_names_recognised_without_spec(cropped_source, tmp_path):
    report = ingest(cropped_source, tmp_path / "data", use_dvc=False)
    assert sorted(report.written) == ["BraTS2021_00006", "OtherEXampleFromTCIA", "TCGA-DU-7294"]
    info, cases = discover_cases(tmp_path / "data")
    assert all(case.label is not None for case in cases)
    assert info.source_conventions["TCGA-DU-7294"] == "brats2017"


def _copy_with_bad_label(cropped_source: Path, tmp_path: Path) -> Path:
    source = tmp_path / "source"
    shutil.copytree(cropped_source, source)
    label_path = source / "TCGA-DU-7294" / "TCGA-DU-7294_seg.nii.gz"
    label = nib.load(str(label_path))
    data = np.asarray(label.dataobj).copy()
    data[0, 0, :3] = 3  # value 3 does not exist in the BraTS 2017-2022 convention
    nib.save(nib.Nifti1Image(data, label.affine, label.header), str(label_path))
    return source


def test_invalid_case_skipped_others_go_on(cropped_source, tmp_path):
    source = _copy_with_bad_label(cropped_source, tmp_path)
    report = ingest(source, tmp_path / "data", use_dvc=False)
    assert sorted(report.written) == ["BraTS2021_00006", "OtherEXampleFromTCIA"]
    assert list(report.skipped) == ["TCGA-DU-7294"]
    assert "3 (3 voxels)" in report.skipped["TCGA-DU-7294"][0]
    provenance = json.loads((tmp_path / "data" / "provenance.json").read_text())
    assert "TCGA-DU-7294" in provenance["skipped"]


def test_invalid_case_strict_fails(cropped_source, tmp_path):
    source = _copy_with_bad_label(cropped_source, tmp_path)
    with pytest.raises(IngestError, match="TCGA-DU-7294"):
        ingest(source, tmp_path / "data", strict=True, use_dvc=False)


def test_cli_reports_skipped_case_and_exits_1(cropped_source, tmp_path):
    source = _copy_with_bad_label(cropped_source, tmp_path)
    result = subprocess.run([sys.executable, "-m", "unet.cli", "ingest", str(source), str(tmp_path / "data"), "--no-dvc"],
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert "skipped TCGA-DU-7294" in result.stderr
    assert "ingested 2 case(s)" in result.stdout


def _write_spec(tmp_path: Path, spec: dict) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.parametrize("spec,message", [
    ({"modalities": ["t1"], "groups": []}, "missing key 'name'"),
    ({"name": "x", "modalities": ["t1", "flair"], "groups": [{"cases": ["*"], "images": {"t1": "a.nii.gz"}}]},
     "no file pattern for modality 'flair'"),
    ({"name": "x", "modalities": ["t1"], "groups": [{"cases": ["*"], "images": {"t1": "a"}, "label": "s"}]},
     "has a label but no label_convention"),
    ({"name": "x", "modalities": ["t1"],
      "groups": [{"cases": ["*"], "images": {"t1": "a"}, "label": "s", "label_convention": "brats2019"}]},
     "unknown label_convention 'brats2019'"),
])
def test_spec_errors_name_the_key(tmp_path, spec, message):
    with pytest.raises(IngestError, match=message):
        load_spec(_write_spec(tmp_path, spec))


def test_source_without_brats_names(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(IngestError, match="no BraTS-named files"):
        ingest(tmp_path / "empty", tmp_path / "data", use_dvc=False)


def test_missing_source_folder(tmp_path):
    with pytest.raises(IngestError, match="source folder .* not found"):
        ingest(tmp_path / "absent", tmp_path / "data", use_dvc=False)
