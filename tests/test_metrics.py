"""Metrics with hand-computed answers, every empty-mask rule, and the HD95 variant."""

import numpy as np
import pytest

from dataclasses import replace

from medseg.metrics import BRATS_HD_PENALTY, dice, score_case, score_region, surfel_distances
from medseg.scoring import get_rules

BRATS21 = get_rules("brats21")


def region_metrics(pred, ref, spacing, directed_max=False):
    """The brats21 scores (validation during training uses them), or with
    `directed_max` the same rules with MONAI's HD95 variant."""
    return score_region(pred, ref, spacing, replace(BRATS21, hd95="directed-max") if directed_max else BRATS21)


def case_metrics(pred, ref, spacing):
    return score_case(pred, ref, spacing, BRATS21)


def box(shape, lo, hi):
    m = np.zeros(shape, bool)
    m[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return m


def test_dice_hand_computed():
    a = box((10, 10, 10), (0, 0, 0), (4, 4, 4))        # 64 voxels
    b = box((10, 10, 10), (2, 0, 0), (6, 4, 4))        # 64 voxels, overlap 2*4*4 = 32
    assert dice(a, b) == pytest.approx(2 * 32 / 128)
    assert dice(a, a) == 1.0


@pytest.mark.parametrize("pred_empty, ref_empty, want_dice, want_hd", [
    (True, True, 1.0, 0.0),
    (True, False, 0.0, BRATS_HD_PENALTY),
    (False, True, 0.0, BRATS_HD_PENALTY),
])
def test_empty_mask_rules(pred_empty, ref_empty, want_dice, want_hd):
    full = box((8, 8, 8), (2, 2, 2), (5, 5, 5))
    empty = np.zeros_like(full)
    m = region_metrics(empty if pred_empty else full, empty if ref_empty else full, (1, 1, 1))
    assert m["dice"] == want_dice
    assert m["hd95"] == want_hd and m["hausdorff"] == want_hd
    assert BRATS_HD_PENALTY == pytest.approx(np.sqrt(240**2 + 240**2 + 155**2), abs=0.01)


def test_shifted_slab_distances_in_mm():
    # A 1-voxel-thick plane shifted by 3 voxels along x: every surface voxel is
    # exactly 3 voxels from the other plane → HD95 = Hausdorff = 3 * spacing_x.
    ref = box((12, 8, 8), (2, 0, 0), (3, 8, 8))
    pred = box((12, 8, 8), (5, 0, 0), (6, 8, 8))
    m = region_metrics(pred, ref, (2.0, 1.0, 1.0))
    assert m["hd95"] == pytest.approx(6.0)
    assert m["hausdorff"] == pytest.approx(6.0)
    assert m["vol_pred_ml"] == pytest.approx(64 * 2.0 / 1000)


def test_hd95_pools_both_directions():
    # ref: a 9×9×9 cube; pred: the same cube plus one far voxel 20 voxels away.
    # pred→ref distances: 0 for the cube surface (386 surface voxels... ) and 20-ish
    # for the outlier; ref→pred: all 0. Pooled, the one outlier is < 5 % of
    # the distances → HD95 0; MONAI's directed max takes pred→ref's own 95th
    # percentile, also 0 here, but the Hausdorff is the outlier distance.
    shape = (40, 12, 12)
    ref = box(shape, (1, 1, 1), (10, 10, 10))
    pred = ref.copy()
    pred[30, 5, 5] = True
    m = region_metrics(pred, ref, (1, 1, 1))
    assert m["hd95"] == 0.0
    assert m["hausdorff"] == pytest.approx(21.0)   # 30 - 9


def test_pooled_vs_directed_max_differ():
    # pred: a 20×20 plane (400 surface voxels). ref: the same plane plus a 6×5 patch
    # 10 voxels away (30 voxels). Distances pred→ref: 400 × 0. ref→pred: 400 × 0 and
    # 30 × 10, i.e. 7 % far: its own 95th percentile is 10 (MONAI's directed max).
    # Pooled: 30 far of 830 = 3.6 % → the 95th percentile is 0 (BraTS / MedPy).
    shape = (12, 20, 20)
    pred = box(shape, (0, 0, 0), (1, 20, 20))
    ref = pred | box(shape, (10, 0, 0), (11, 6, 5))
    assert region_metrics(pred, ref, (1, 1, 1))["hd95"] == 0.0
    # directed max (the brats23 variant) measures between surfels, on voxel faces: the
    # patch's near face is 9 mm from the plane's far face, so its 95th percentile is 9
    assert region_metrics(pred, ref, (1, 1, 1), directed_max=True)["hd95"] == pytest.approx(9.0)
    assert region_metrics(pred, ref, (1, 1, 1))["hausdorff"] == pytest.approx(10.0)


def test_sensitivity_specificity():
    ref = box((10, 10, 10), (0, 0, 0), (5, 10, 10))      # 500 voxels
    pred = box((10, 10, 10), (0, 0, 0), (4, 10, 10))     # 400 voxels, all inside ref
    m = region_metrics(pred, ref, (1, 1, 1))
    assert m["sensitivity"] == pytest.approx(400 / 500)
    assert m["specificity"] == 1.0
    pred2 = box((10, 10, 10), (0, 0, 0), (6, 10, 10))    # 100 false positives of 500 negatives
    assert region_metrics(pred2, ref, (1, 1, 1))["specificity"] == pytest.approx(400 / 500)


def test_case_metrics_regions_in_order():
    ref = np.stack([box((6, 6, 6), (1, 1, 1), (3, 3, 3)), box((6, 6, 6), (0, 0, 0), (4, 4, 4)),
                    np.zeros((6, 6, 6), bool)])
    m = case_metrics(ref, ref, (1, 1, 1))
    assert list(m) == ["TC", "WT", "ET"]
    assert all(m[r]["dice"] == 1.0 for r in m)
    assert m["ET"]["hd95"] == 0.0


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        region_metrics(np.zeros((4, 4, 4), bool), np.zeros((4, 4, 5), bool), (1, 1, 1))


def test_surfel_distances_of_a_shifted_plane_in_mm():
    # DeepMind surfels sit on voxel corners: a 1-voxel plane at x = 2 has corner sheets
    # x = 2 and 3, its copy at x = 5 sheets 5 and 6. Each sheet's nearest other sheet
    # is 2 or 3 voxels away → 4 or 6 mm at 2 mm along x, in both directions.
    ref = box((12, 8, 8), (2, 0, 0), (3, 8, 8))
    pred = box((12, 8, 8), (5, 0, 0), (6, 8, 8))
    d_pr, a_p, d_rp, a_r = surfel_distances(pred, ref, (2.0, 1.0, 1.0))
    assert set(np.round(np.concatenate([d_pr, d_rp]), 6)) == {4.0, 6.0}
    assert d_pr.shape == a_p.shape and d_rp.shape == a_r.shape
    assert a_p.sum() == pytest.approx(a_r.sum()) and (a_p > 0).all()
