from pathlib import Path

import pytest

from unet.config import load_params, params_from_dict

REPO = Path(__file__).resolve().parents[1]


def test_repository_params_load():
    params = load_params(REPO / "params.yaml")
    assert params.model.base_channels >= 1
    assert params.train.nproc_per_node == 2


@pytest.mark.parametrize("raw,message", [
    ({"train": {"batch_size": 0}}, "train.batch_size=0"),
    ({"train": {"patch_size": 100}}, "train.patch_size=100: expected a multiple of 16"),
    ({"train": {"optimizer": "adam"}}, "train.optimizer='adam'"),
    ({"train": {"nnodes": 2}}, "train.rdzv_endpoint=''"),
    ({"model": {"upsampling": "nearest"}}, "model.upsampling='nearest'"),
    ({"model": {"target": "labels"}}, "model.target='labels'"),
    ({"model": {"spatial_dims": 4}}, "model.spatial_dims=4: expected 2 or 3"),
    ({"evaluate": {"overlap": 1.0}}, "evaluate.overlap=1.0"),
    ({"preprocess": {"target_spacing": [1.0, 0.0, 1.0]}}, "preprocess.target_spacing=(1.0, 0.0, 1.0)"),
    ({"evaluate": {"threshold": 1.5}}, "evaluate.threshold=1.5"),
    ({"data": {"test_cases": ["a"], "val_cases": ["a"]}}, "data.val_cases=['a']"),
    ({"train": {"batchsize": 8}}, "unknown params key train.batchsize"),
    ({"training": {}}, "unknown params block 'training'"),
])
def test_invalid_params_name_the_key(raw, message):
    with pytest.raises(ValueError) as error:
        params_from_dict(raw)
    assert message in str(error.value)


def test_missing_params_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="params file .* not found"):
        load_params(tmp_path / "params.yaml")


def test_params_yaml_syntax_error_names_line(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  epochs: [1\n")
    with pytest.raises(ValueError, match=r"is not valid YAML at line 3, column 1"):
        load_params(path)
