"""Volumetry: hand-computable volumes, lesion counts and largest-lesion boxes on
small synthetic label maps stored in several orientations and spacings, every
convention, bad input, and volumes.csv (written, read back, resumed batches)."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest

from medseg.data.discover import discover
from medseg.data.io import load_array, write_json
from medseg.errors import LabelError, MedsegError
from medseg.labels import REGIONS, get_convention, labels_to_regions
from medseg.volumetry import (CONNECTIVITY, VOLUMES_CSV, case_volumetry, csv_columns, mask_volumetry,
                              write_batch_volumes, write_volumes_csv)


def _tumour(shape=(20, 18, 16)) -> np.ndarray:
    """brats2023 labels: a 6×4×3 core (NETC) holding a 2×2×1 ET, wrapped in 2 voxels
    of SNFH on the first axis; a separate 2×2×2 SNFH satellite; 1 voxel of SNFH
    touching the satellite only by a corner."""
    lab = np.zeros(shape, np.uint8)
    lab[2:12, 3:7, 4:7] = 2            # 10×4×3 = 120
    lab[4:10, 3:7, 4:7] = 1            # core 6×4×3 = 72
    lab[6:8, 4:6, 5] = 3               # ET 2×2×1 = 4
    lab[15:17, 12:14, 10:12] = 2       # satellite 8
    lab[17, 14, 12] = 2                # corner neighbour of (16, 13, 11)
    return lab


# Voxel counts of _tumour: NETC 72 - 4, SNFH 120 - 72 + 8 + 1, ET 4.
COUNTS = {"NETC": 68, "SNFH": 57, "ET": 4}


@pytest.mark.parametrize("zooms", [(1.0, 1.0, 1.0), (0.5, 0.75, 5.0)], ids=["1mm", "thick"])
def test_hand_computed_volumes_lesions_and_box(zooms):
    lab = _tumour()
    affine = np.diag([*zooms, 1.0])
    affine[:3, 3] = (-90.0, -120.0, -60.0)
    v = case_volumetry(lab, affine, "brats2023")
    ml = float(np.prod(zooms)) / 1000
    assert v["voxel_ml"] == pytest.approx(ml)
    assert v["connectivity"] == CONNECTIVITY == 26
    assert v["labels"] == pytest.approx({k: n * ml for k, n in COUNTS.items()})
    assert v["regions"] == pytest.approx({"TC": 72 * ml, "WT": 129 * ml, "ET": 4 * ml})
    # WT: the main tumour, and the satellite with its corner neighbour (26-connected).
    assert v["lesions"] == {"TC": 1, "WT": 2, "ET": 1}
    big = v["largest"]["WT"]
    assert big["voxels"] == 120 and big["ml"] == pytest.approx(120 * ml)
    # Whole voxels: 10×4×3 voxels → 10·zx × 4·zy × 3·zz mm.
    assert big["extent_mm"] == pytest.approx([10 * zooms[0], 4 * zooms[1], 3 * zooms[2]])
    lo = affine[:3, 3] + (np.array([2, 3, 4]) - 0.5) * zooms
    np.testing.assert_allclose(big["box_ras_mm"], [lo, lo + big["extent_mm"]], atol=1e-3)
    assert v["largest"]["ET"]["extent_mm"] == pytest.approx([2 * zooms[0], 2 * zooms[1], zooms[2]])


def test_face_edge_and_corner_neighbours_are_one_lesion():
    lab = np.zeros((8, 8, 8), np.uint8)
    lab[1, 1, 1] = lab[2, 2, 2] = 3          # corner
    lab[5, 5, 1] = lab[6, 6, 1] = 3          # edge
    lab[1, 6, 6] = lab[1, 6, 7] = 3          # face
    lab[5, 1, 6] = 3
    lab[7, 1, 6] = 3                          # a gap of one voxel: two lesions
    v = case_volumetry(lab, np.eye(4), "brats2023")
    assert v["lesions"] == {"TC": 5, "WT": 5, "ET": 5}


def _reoriented(lab: np.ndarray, affine: np.ndarray, codes) -> nib.Nifti1Image:
    img = nib.Nifti1Image(lab, affine)
    return img.as_reoriented(nib.orientations.ornt_transform(
        nib.io_orientation(affine), nib.orientations.axcodes2ornt(codes)))


@pytest.mark.parametrize("codes", [("L", "P", "S"), ("P", "I", "R"), ("A", "S", "L"), ("R", "A", "S")])
def test_same_anatomy_in_any_storage_order_measures_the_same(codes):
    lab = _tumour()
    affine = np.diag([0.9, 1.1, 4.0, 1.0])
    affine[:3, 3] = (10.0, -20.0, 30.0)
    ref = case_volumetry(lab, affine, "brats2023")
    img = _reoriented(lab, affine, codes)
    assert nib.aff2axcodes(img.affine) == codes
    got = case_volumetry(np.asarray(img.dataobj), img.affine, "brats2023")
    for key in ("labels", "regions", "lesions"):
        assert got[key] == pytest.approx(ref[key])
    for r in REGIONS:
        assert got["largest"][r]["extent_mm"] == pytest.approx(ref["largest"][r]["extent_mm"])
        np.testing.assert_allclose(got["largest"][r]["box_ras_mm"], ref["largest"][r]["box_ras_mm"], atol=1e-3)


def test_oblique_grid_boxes_the_rotated_voxels():
    # One 2×2×2 mm voxel rotated 45° about z: it spans 2·√2 mm along x and y, 2 along z.
    c = np.cos(np.pi / 4)
    affine = np.eye(4)
    affine[:3, :3] = np.array([[c, -c, 0], [c, c, 0], [0, 0, 1]]) * 2.0
    lab = np.zeros((5, 5, 5), np.uint8)
    lab[2, 2, 2] = 3
    v = case_volumetry(lab, affine, "brats2023")
    assert v["voxel_ml"] == pytest.approx(0.008)
    # (stored to the µm)
    assert v["largest"]["ET"]["extent_mm"] == pytest.approx([2 * np.sqrt(2), 2 * np.sqrt(2), 2.0], abs=1e-3)
    centre = affine[:3, :3] @ [2, 2, 2]
    lo, hi = np.array(v["largest"]["ET"]["box_ras_mm"])
    np.testing.assert_allclose((lo + hi) / 2, centre, atol=1e-3)


@pytest.mark.parametrize("name, values, want", [
    ("brats2021", {1: 5, 2: 7, 4: 3}, {"labels": {"NCR/NET": 5, "ED": 7, "ET": 3},
                                       "regions": {"TC": 8, "WT": 15, "ET": 3}}),
    ("brats2023", {1: 5, 2: 7, 3: 3}, {"labels": {"NETC": 5, "SNFH": 7, "ET": 3},
                                       "regions": {"TC": 8, "WT": 15, "ET": 3}}),
    # brats2024 labels are task gli2024's: RC is a region of its own, in no tumour region
    ("brats2024", {1: 5, 2: 7, 3: 3, 4: 6}, {"labels": {"NETC": 5, "SNFH": 7, "ET": 3, "RC": 6},
                                             "regions": {"TC": 8, "WT": 15, "ET": 3, "RC": 6}}),
    # BraTS 2024 PED (task ped2024): TC = ET ∪ NET ∪ CC, WT = all, CC its own region
    ("brats2024-ped", {1: 3, 2: 5, 3: 4, 4: 7}, {"labels": {"ET": 3, "NET": 5, "CC": 4, "ED": 7},
                                                 "regions": {"TC": 12, "WT": 19, "ET": 3, "CC": 4}}),
    # MSD: 1 edema, 2 non-enhancing: TC = 2 ∪ 3.
    ("msd", {1: 5, 2: 7, 3: 3}, {"labels": {"edema": 5, "non-enhancing tumour": 7, "enhancing tumour": 3},
                                 "regions": {"TC": 10, "WT": 15, "ET": 3}}),
])
def test_every_convention_by_its_own_names(name, values, want):
    lab = np.zeros(60, np.uint8)
    i = 0
    for value, n in values.items():
        lab[i:i + n] = value
        i += n + 1
    v = case_volumetry(lab.reshape(3, 4, 5), np.diag([10.0, 10.0, 10.0, 1.0]), name)   # 1 mL voxels
    assert v["label_convention"] == name
    assert v["labels"] == pytest.approx(want["labels"]) and v["regions"] == pytest.approx(want["regions"])


def test_a_three_region_task_on_brats2024_labels_keeps_rc_out_of_the_regions():
    lab = np.array([1, 2, 3, 4, 4], np.uint8).reshape(1, 1, 5)
    v = case_volumetry(lab, np.diag([10.0, 10.0, 10.0, 1.0]), "brats2024", task="gli2023")
    assert v["task"] == "gli2023" and v["labels"]["RC"] == pytest.approx(2)
    assert v["regions"] == pytest.approx({"TC": 2, "WT": 3, "ET": 1})


def test_empty_mask():
    v = case_volumetry(np.zeros((4, 5, 6), np.uint8), np.eye(4), "brats2023")
    assert v["regions"] == {"TC": 0, "WT": 0, "ET": 0} and v["lesions"] == {"TC": 0, "WT": 0, "ET": 0}
    assert v["largest"] == {"TC": None, "WT": None, "ET": None}


@pytest.mark.parametrize("labels, affine, error, words", [
    (np.full((3, 3, 3), 4, np.uint8), np.eye(4), LabelError, ["case_x.nii.gz", "[4]", "--convention brats2024"]),
    (np.full((3, 3, 3), 1.5, np.float32), np.eye(4), LabelError, ["case_x.nii.gz", "nearest-neighbour"]),
    (np.zeros((3, 3, 3, 2), np.uint8), np.eye(4), MedsegError, ["case_x.nii.gz", "3D label map"]),
    (np.zeros((3, 3, 3), np.uint8), np.diag([1.0, 0.0, 1.0, 1.0]), MedsegError, ["case_x.nii.gz", "singular"]),
    (np.zeros((3, 3, 3), np.uint8), np.full((4, 4), np.nan), MedsegError, ["case_x.nii.gz", "finite"]),
])
def test_bad_input_is_named(labels, affine, error, words):
    with pytest.raises(error) as exc:
        case_volumetry(labels, affine, "brats2023", source="case_x.nii.gz")
    for w in words:
        assert w in str(exc.value)


def test_synthetic_cases_match_their_region_masks(dataset):
    # Data the volumetry did not shape: the synthetic generator's label files
    # (some stored LPS or PIR, some with thick slices).
    for case in discover(dataset("brats2021")).cases:
        img = nib.load(case.label)
        v = mask_volumetry(case.label, "brats2021")
        regions = labels_to_regions(np.asarray(img.dataobj), "brats2021")
        ml = float(np.prod(img.header.get_zooms()[:3])) / 1000
        assert v["regions"] == pytest.approx({r: regions[i].sum() * ml for i, r in enumerate(REGIONS)})
        assert sum(v["labels"].values()) == pytest.approx(v["regions"]["WT"])


def test_volumes_csv_round_trip_and_resumed_batch(tmp_path, dataset):
    cases = discover(dataset("brats2023")).cases[:3]
    conv = get_convention("brats2023")
    masks = {c.case_id: c.label for c in cases}
    vols = {cid: mask_volumetry(p, "brats2023") for cid, p in masks.items()}
    target = write_volumes_csv(tmp_path / "v.csv", list(vols.items()), "brats2023")
    with open(target, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == csv_columns("brats2023")
    assert [r["case_id"] for r in rows] == list(vols)
    for row in rows:
        v = vols[row["case_id"]]
        for v_, name in conv.names.items():
            if v_:
                assert float(row[f"label_{name}_ml"]) == pytest.approx(v["labels"][name], abs=1e-4)
        for r in REGIONS:
            assert float(row[f"{r}_ml"]) == pytest.approx(v["regions"][r], abs=1e-4)
            assert int(row[f"{r}_lesions"]) == v["lesions"][r]
            big = v["largest"][r]
            assert row[f"{r}_largest_rl_mm"] == ("" if big is None else f"{big['extent_mm'][0]:.2f}")
    # A resumed batch: records from predictions.json where they exist (here one made
    # up, to show it is the one used), from the mask file where an older run left none.
    fake = json.loads(json.dumps(vols[cases[0].case_id]))
    fake["regions"]["WT"] = 123.0
    write_json({"cases": {cases[0].case_id: {"volumes": fake}, cases[1].case_id: {"other": 1}}},
               tmp_path / "predictions.json")
    out = write_batch_volumes(tmp_path, list(masks.items()), "brats2023")
    assert out == tmp_path / VOLUMES_CSV
    with open(out, newline="") as f:
        rows = {r["case_id"]: r for r in csv.DictReader(f)}
    assert float(rows[cases[0].case_id]["WT_ml"]) == 123.0
    for c in cases[1:]:
        assert float(rows[c.case_id]["WT_ml"]) == pytest.approx(vols[c.case_id]["regions"]["WT"], abs=1e-4)
    # Volumes measured under another convention are refused, not mixed.
    with pytest.raises(MedsegError, match="brats2021"):
        write_volumes_csv(tmp_path / "x.csv", [("a", {**fake, "label_convention": "brats2021"})], "brats2023")
    assert not (tmp_path / "x.csv").exists()


def test_mask_file_with_non_integer_values_is_refused(tmp_path):
    nib.save(nib.Nifti1Image(np.full((3, 3, 3), 0.5, np.float32), np.eye(4)), tmp_path / "m.nii.gz")
    with pytest.raises(LabelError, match="m.nii.gz"):
        mask_volumetry(tmp_path / "m.nii.gz", "brats2023")
    assert load_array(tmp_path / "m.nii.gz").max() == 0.5          # the input is untouched
