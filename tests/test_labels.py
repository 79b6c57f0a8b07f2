import numpy as np
import pytest

from medseg.errors import LabelError, MedsegError
from medseg.labels import CONVENTIONS, REGIONS, get_convention, labels_to_regions, \
    regions_to_labels, validate_labels

# One voxel per label value; expected (TC, WT, ET) membership computed by hand.
REGION_TABLE = {
    "brats2021": {0: (0, 0, 0), 1: (1, 1, 0), 2: (0, 1, 0), 4: (1, 1, 1)},
    "brats2023": {0: (0, 0, 0), 1: (1, 1, 0), 2: (0, 1, 0), 3: (1, 1, 1)},
    "brats2024": {0: (0, 0, 0), 1: (1, 1, 0), 2: (0, 1, 0), 3: (1, 1, 1), 4: (0, 0, 0)},
    "msd":       {0: (0, 0, 0), 1: (0, 1, 0), 2: (1, 1, 0), 3: (1, 1, 1)},
}


def test_regions_order():
    assert REGIONS == ("TC", "WT", "ET")


@pytest.mark.parametrize("name", sorted(REGION_TABLE))
def test_labels_to_regions_by_hand(name):
    values = sorted(REGION_TABLE[name])
    lab = np.array(values, dtype=np.uint8).reshape(1, 1, -1)
    reg = labels_to_regions(lab, name)
    assert reg.shape == (3, 1, 1, len(values))
    for i, v in enumerate(values):
        assert tuple(int(x) for x in reg[:, 0, 0, i]) == REGION_TABLE[name][v], (name, v)


@pytest.mark.parametrize("name", sorted(CONVENTIONS))
def test_round_trip(name):
    conv = get_convention(name)
    rng = np.random.default_rng(0)
    tumour = [v for v in conv.allowed if v not in conv.outside_regions]
    lab = rng.choice(sorted(tumour), size=(6, 7, 8)).astype(np.uint8)
    assert np.array_equal(regions_to_labels(labels_to_regions(lab, name), name), lab)


def test_resection_cavity_is_no_region_and_never_et():
    lab = np.array([[[4, 3, 0]]], np.uint8)
    reg = labels_to_regions(lab, "brats2024")
    assert not reg[:, 0, 0, 0].any()            # RC in no region
    assert reg[2, 0, 0, 1]                      # 3 is ET
    back = regions_to_labels(reg, "brats2024")
    assert back.tolist() == [[[0, 3, 0]]]       # a region model cannot predict RC


@pytest.mark.parametrize("name,expected", [
    ("brats2021", [0, 2, 1, 4, 4]), ("brats2023", [0, 2, 1, 3, 3]), ("msd", [0, 1, 2, 3, 3])])
def test_regions_to_labels_precedence(name, expected):
    # voxels: none, WT only, TC+WT, all three, ET alone (inconsistent prediction)
    tc = [0, 0, 1, 1, 0]
    wt = [0, 1, 1, 1, 0]
    et = [0, 0, 0, 1, 1]
    reg = np.array([tc, wt, et], bool).reshape(3, 1, 1, 5)
    out = regions_to_labels(reg, name)
    assert out.dtype == np.uint8
    assert out.ravel().tolist() == expected


def test_regions_to_labels_rejects_wrong_shape():
    with pytest.raises(MedsegError, match=r"\(3, \*spatial\)"):
        regions_to_labels(np.zeros((2, 4, 4, 4)), "brats2021")


@pytest.mark.parametrize("name,values,match", [
    ("brats2021", [0, 1, 2, 3], "relabelled from 4 to 3"),
    ("brats2023", [0, 1, 2, 4], "brats2024"),
    ("brats2023", [0, 1, 2, 3, 5], r"allowed values are \[0, 1, 2, 3\]"),
    ("msd", [0, 1, 2, 4], "BraTS 2018-2021"),
    ("brats2021", [0, 0.5, 1], "nearest-neighbour"),
    ("brats2021", [0, float("nan")], "NaN"),
])
def test_validate_labels_errors(name, values, match):
    with pytest.raises(LabelError, match=match) as exc:
        validate_labels(values, name, source="case_seg.nii.gz")
    assert "case_seg.nii.gz" in str(exc.value)
    if "allowed by" in str(exc.value):
        assert f"'{name}'" in str(exc.value)      # the message names the convention


@pytest.mark.parametrize("name", sorted(REGION_TABLE))
def test_validate_labels_accepts_own_values(name):
    validate_labels(sorted(REGION_TABLE[name]), name)
    validate_labels([0.0, 1.0], name)   # float storage of integer labels is fine


def test_unknown_convention_lists_names():
    with pytest.raises(MedsegError, match="brats2021, brats2023, brats2024, brats2024-ped, msd"):
        get_convention("brats2020")
