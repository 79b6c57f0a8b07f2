"""Post-processing: small components, small-ET relabelling, and the CV choice of
the ET threshold — hand-computed."""

import numpy as np
import pytest

from medseg.cv import choose_et_threshold
from medseg.postprocess import describe_postprocessing, postprocess
from medseg.labels import regions_to_labels


def test_small_components_removed_per_region():
    reg = np.zeros((3, 20, 20, 20), bool)
    reg[1, 2:8, 2:8, 2:8] = True        # WT: 216 voxels, kept
    reg[1, 15, 15, 15] = True           # WT speck: 1 voxel, removed
    reg[0, 3:5, 3:5, 3:5] = True        # TC: 8 voxels, kept at 5-voxel threshold
    out = postprocess(reg, voxel_ml=0.001, min_component_ml=0.005)
    assert out[1].sum() == 216 and not out[1, 15, 15, 15]
    assert out[0].sum() == 8
    # Diagonal neighbours are one component (26-connectivity): two diagonal voxels
    # form a 2-voxel component, kept with a 2-voxel threshold.
    reg2 = np.zeros((3, 5, 5, 5), bool)
    reg2[1, 1, 1, 1] = reg2[1, 2, 2, 2] = True
    assert postprocess(reg2, 0.001, min_component_ml=0.002)[1].sum() == 2


def test_small_et_becomes_necrosis():
    reg = np.zeros((3, 10, 10, 10), bool)
    reg[1, 2:8, 2:8, 2:8] = True
    reg[0, 3:6, 3:6, 3:6] = True
    reg[2, 4, 4, 4:6] = True            # 2 voxels of ET = 0.002 mL at 1 mm
    kept = postprocess(reg, 0.001, et_min_ml=0.002)
    assert kept[2].sum() == 2
    gone = postprocess(reg, 0.001, et_min_ml=0.0021)
    assert gone[2].sum() == 0 and gone[0].sum() == reg[0].sum()
    lab = regions_to_labels(gone, "brats2023")
    assert lab[4, 4, 4] == 1            # NETC, not ET


@pytest.mark.parametrize("et_outside_tc, et_outside_wt", [(True, False), (True, True), (False, False)])
def test_small_et_relabelled_as_necrosis_even_outside_tc(et_outside_tc, et_outside_wt):
    # The network may put ET voxels outside TC (or WT): relabelling must still make
    # them necrosis (NCR label 1 in brats2021), never edema (2) or background (0).
    reg = np.zeros((3, 10, 10, 10), bool)
    reg[1, 2:8, 2:8, 2:8] = True                   # WT
    reg[0, 3:5, 3:5, 3:5] = True                   # TC
    et = (5, 5, 5) if et_outside_tc else (4, 4, 4)
    if et_outside_wt:
        et = (9, 9, 9)
    reg[(2, *et)] = True                           # one ET voxel: 0.001 mL at 1 mm
    before = reg.copy()
    out = postprocess(reg, 0.001, et_min_ml=0.01)
    np.testing.assert_array_equal(reg, before)     # the input is not modified
    assert not out[2].any()
    assert out[0][et] and out[1][et]               # added to TC and WT
    lab = regions_to_labels(out, "brats2021")
    assert lab[et] == 1
    # Every other voxel keeps its label.
    keep = regions_to_labels(before, "brats2021")
    mask = np.ones(lab.shape, bool)
    mask[et] = False
    np.testing.assert_array_equal(lab[mask], keep[mask])


def test_postprocessing_is_described_as_done():
    assert describe_postprocessing(0.0, 0.0) == "none"
    assert describe_postprocessing(0.1, 0.0) == "components < 0.1 mL removed"
    assert describe_postprocessing(0.0, 0.5) == "ET < 0.5 mL → necrosis"


def rows(*cases):
    return [{"region": "ET", "dice": d, "vol_pred_ml": p, "vol_ref_ml": r} for d, p, r in cases]


def test_et_threshold_chosen_on_out_of_fold_rows():
    # Case A: no ET in the reference, 0.15 mL spurious ET (Dice 0) → relabelling
    # at t > 0.15 makes it 1. Case B: real ET 0.4 mL predicted 0.3 mL (Dice 0.8)
    # → relabelling at t > 0.3 makes it 0. Case C: large ET, Dice 0.9.
    r = rows((0.0, 0.15, 0.0), (0.8, 0.3, 0.4), (0.9, 5.0, 6.0))
    post = choose_et_threshold(r)
    scores = post["et_dice_by_threshold"]
    assert scores["0.0"] == pytest.approx((0 + 0.8 + 0.9) / 3)
    assert scores["0.2"] == pytest.approx((1 + 0.8 + 0.9) / 3)
    assert scores["0.5"] == pytest.approx((1 + 0 + 0.9) / 3)
    assert post["et_min_ml"] == 0.2     # first of the tied best (0.2 and 0.3)
    # Nothing to gain → no relabelling.
    assert choose_et_threshold(rows((0.9, 1.0, 1.2)))["et_min_ml"] == 0.0
