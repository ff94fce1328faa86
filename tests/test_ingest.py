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


DECATHLON_CHANNELS = {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}
BRATS_FILE_OF = {"FLAIR": "flair", "T1w": "t1", "t1gd": "t1ce", "T2w": "t2"}


def _write_decathlon(cropped_source: Path, root: Path) -> Path:
    """Rewrite the cropped BraTS cases in the Decathlon Task01 layout: 4D images and Decathlon labels."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    (root / "dataset.json").write_text(json.dumps({"name": "BRATS", "modality": DECATHLON_CHANNELS,
                                                   "labels": {"0": "background", "1": "edema",
                                                              "2": "non-enhancing tumor", "3": "enhancing tumour"}}))
    # BraTS 2017 -> Decathlon: 1 NCR -> 2, 2 ED -> 1, 4 ET -> 3.
    relabel = np.zeros(5, dtype=np.uint8)
    relabel[[1, 2, 4]] = [2, 1, 3]
    for case_dir in sorted(cropped_source.iterdir()):
        case = case_dir.name
        channels = [nib.load(str(case_dir / f"{case}_{BRATS_FILE_OF[DECATHLON_CHANNELS[str(i)]]}.nii.gz")) for i in range(4)]
        stacked = np.stack([np.asarray(c.dataobj) for c in channels], axis=-1)
        nib.save(nib.Nifti1Image(stacked, channels[0].affine), str(root / "imagesTr" / f"{case}.nii.gz"))
        label = nib.load(str(case_dir / f"{case}_seg.nii.gz"))
        decathlon = relabel[np.asarray(label.dataobj).astype(np.int64)]
        nib.save(nib.Nifti1Image(decathlon, label.affine), str(root / "labelsTr" / f"{case}.nii.gz"))
        (root / "imagesTr" / f"._{case}.nii.gz").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")
    return root


def test_decathlon_layout_ingested(cropped_source, tmp_path):
    source = _write_decathlon(cropped_source, tmp_path / "Task01_BrainTumour")
    report = ingest(source, tmp_path / "data", use_dvc=False)
    assert sorted(report.written) == ["BraTS2021_00006", "OtherEXampleFromTCIA", "TCGA-DU-7294"]
    info = read_dataset(tmp_path / "data")
    assert info.modalities == ["flair", "t1", "t1c", "t2"]
    assert info.source_conventions["TCGA-DU-7294"] == "decathlon"


def test_decathlon_matches_brats_ingest(cropped_source, tmp_path):
    decathlon = _write_decathlon(cropped_source, tmp_path / "Task01_BrainTumour")
    ingest(decathlon, tmp_path / "from_decathlon", use_dvc=False)
    ingest(cropped_source, tmp_path / "from_brats", use_dvc=False)
    for case in ("BraTS2021_00006", "TCGA-DU-7294"):
        for name in (f"{case}_seg.nii.gz", f"{case}_t1c.nii.gz", f"{case}_flair.nii.gz"):
            a = nib.load(str(tmp_path / "from_decathlon" / case / name))
            b = nib.load(str(tmp_path / "from_brats" / case / name))
            assert np.array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj)), name
            assert np.allclose(a.affine, b.affine), name


def test_decathlon_unknown_modality(cropped_source, tmp_path):
    source = _write_decathlon(cropped_source, tmp_path / "Task01")
    (source / "dataset.json").write_text(json.dumps({"modality": {"0": "PD", "1": "T1w", "2": "t1gd", "3": "T2w"}}))
    with pytest.raises(IngestError, match="unknown modality 'PD' at channel 0"):
        ingest(source, tmp_path / "data", use_dvc=False)
