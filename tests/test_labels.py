import numpy as np
import pytest

from unet.labels import CONVENTIONS, get_convention, labels_to_regions, regions_to_labels


@pytest.mark.parametrize("name,source,expected", [
    ("brats2017", [0, 1, 2, 4], [0, 1, 2, 3]),
    ("brats2023", [0, 1, 2, 3], [0, 1, 2, 3]),
    ("brats2015", [0, 1, 2, 3, 4], [0, 1, 2, 1, 3]),
    ("decathlon", [0, 1, 2, 3], [0, 2, 1, 3]),
    ("binary", [0, 1], [0, 2]),
])
def test_convention_maps_to_canonical(name, source, expected):
    mapped = CONVENTIONS[name].to_canonical(np.array(source, dtype=np.float32), "case")
    assert mapped.tolist() == expected
    assert mapped.dtype == np.uint8


def test_convention_rejects_value_outside_it():
    labels = np.array([0, 1, 3, 3, 3], dtype=np.uint8)
    with pytest.raises(ValueError) as error:
        get_convention("brats2017").to_canonical(labels, "BraTS-GLI-0001")
    assert "case BraTS-GLI-0001" in str(error.value)
    assert "3 (3 voxels)" in str(error.value)
    assert "'brats2017'" in str(error.value)


def test_convention_rejects_non_integer_labels():
    with pytest.raises(ValueError, match="non-integer values"):
        get_convention("brats2023").to_canonical(np.array([0.0, 0.5]), "c1")


def test_convention_rejects_nan_labels():
    with pytest.raises(ValueError, match="1 NaN or infinite voxels"):
        get_convention("brats2023").to_canonical(np.array([0.0, np.nan]), "c1")


def test_convention_round_trip_brats2017():
    convention = get_convention("brats2017")
    source = np.array([0, 1, 2, 4], dtype=np.uint8)
    assert convention.from_canonical(convention.to_canonical(source)).tolist() == [0, 1, 2, 4]


def test_custom_mapping():
    convention = get_convention({0: 0, 5: 3, 6: 2})
    assert convention.to_canonical(np.array([0, 5, 6])).tolist() == [0, 3, 2]


@pytest.mark.parametrize("mapping,message", [({1: 7}, "outside the canonical labels"), ({-1: 1}, "negative source values")])
def test_custom_mapping_invalid(mapping, message):
    with pytest.raises(ValueError, match=message):
        get_convention(mapping)


def test_unknown_convention_name():
    with pytest.raises(ValueError, match="unknown label_convention 'brats2019'"):
        get_convention("brats2019")


def test_regions_are_nested():
    labels = np.array([0, 1, 2, 3])
    regions = labels_to_regions(labels)
    assert regions[0].tolist() == [0, 1, 1, 1]  # WT
    assert regions[1].tolist() == [0, 1, 0, 1]  # TC
    assert regions[2].tolist() == [0, 0, 0, 1]  # ET


def test_regions_to_labels_enforces_nesting():
    # ET without TC and TC without WT are dropped, the way BraTS post-processing nests regions.
    regions = np.array([[1, 1, 0, 1], [1, 0, 1, 1], [1, 0, 1, 0]])
    assert regions_to_labels(regions).tolist() == [3, 2, 0, 1]


def test_regions_round_trip():
    labels = np.random.default_rng(0).integers(0, 4, size=(5, 6, 7))
    assert np.array_equal(regions_to_labels(labels_to_regions(labels)), labels)
