"""The optional losses (Focal, Dice + Focal, class-weighted cross-entropy) against
hand-computed values, and their config keys."""

import math

import numpy as np
import pytest
import torch

from medseg.errors import MedsegError
from medseg.losses import (DEFAULT_LOSS, RegionDiceBCELoss, RegionLoss, check_loss, log_inverse_weights,
                           region_codes)


def _sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def test_focal_matches_the_formula_on_a_2cube():
    torch.manual_seed(3)
    x = torch.randn(1, 1, 2, 2, 2) * 2
    t = (torch.rand(1, 1, 2, 2, 2) > 0.5).float()
    t[0, 0, 0, 0, 0], t[0, 0, 1, 1, 1] = 1, 0          # both classes present
    alpha, gamma = 0.25, 2.0
    want = 0.0
    for xi, ti in zip(x.flatten().tolist(), t.flatten().tolist()):
        p = _sig(xi)
        pt = p if ti == 1 else 1 - p
        at = alpha if ti == 1 else 1 - alpha
        want += -at * (1 - pt) ** gamma * math.log(pt)
    want /= 8
    loss = RegionLoss({"name": "focal", "focal_alpha": alpha, "focal_gamma": gamma})
    assert loss(x, t).item() == pytest.approx(want, rel=1e-5)
    # weight scales the term
    loss3 = RegionLoss({"name": "focal", "focal_weight": 3.0})
    assert loss3(x, t).item() == pytest.approx(3 * want, rel=1e-5)


def test_focal_with_gamma_0_and_no_alpha_is_binary_ce():
    torch.manual_seed(0)
    x, t = torch.randn(2, 3, 4, 4, 4), (torch.rand(2, 3, 4, 4, 4) > 0.5).float()
    focal = RegionLoss({"name": "focal", "focal_alpha": None, "focal_gamma": 0.0})(x, t)
    ce = RegionLoss({"name": "dice_ce", "dice_weight": 0.0, "ce_weight": 1.0})(x, t)
    assert focal.item() == pytest.approx(ce.item(), rel=1e-6)


def test_dice_focal_is_the_weighted_sum():
    torch.manual_seed(1)
    x, t = torch.randn(2, 3, 4, 4, 4), (torch.rand(2, 3, 4, 4, 4) > 0.6).float()
    dice = RegionDiceBCELoss(1.0, 0.0)(x, t).item()
    focal = RegionLoss({"name": "focal"})(x, t).item()
    got = RegionLoss({"name": "dice_focal", "dice_weight": 0.7, "focal_weight": 0.3})(x, t).item()
    assert got == pytest.approx(0.7 * dice + 0.3 * focal, rel=1e-6)


def test_class_weights_from_counts():
    counts = [1000.0, 100.0, 10.0, 0.0]
    w = log_inverse_weights(counts)
    want = [1 / math.log(1.02 + c / 1000.0) for c in counts]
    assert w.tolist() == pytest.approx(want)
    assert w[0] == pytest.approx(1 / math.log(2.02)) and w[3] == pytest.approx(1 / math.log(1.02))
    with pytest.raises(MedsegError, match="non-negative"):
        log_inverse_weights([0, 0])


def test_region_codes_of_nested_regions():
    t = torch.zeros(1, 3, 4, 1, 1)        # TC, WT, ET
    t[0, 1, 1:] = 1                       # WT: voxels 1-3
    t[0, 0, 2:] = 1                       # TC: voxels 2-3
    t[0, 2, 3:] = 1                       # ET: voxel 3
    assert region_codes(t).flatten().tolist() == [0, 2, 3, 7]


def test_class_weighted_ce_is_the_weighted_mean_by_hand():
    # 1 × 3 × 2 × 1 × 1: voxel 0 background (code 0), voxel 1 in all regions (code 7).
    x = torch.tensor([0.5, -1.0, 2.0, 0.3, -0.2, 1.5]).view(1, 3, 2, 1, 1)
    t = torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0, 1.0]).view(1, 3, 2, 1, 1)
    codes = [2.0, 9, 9, 9, 9, 9, 9, 5.0]          # background weight 2, code-7 weight 5
    bce = torch.nn.functional.binary_cross_entropy_with_logits(x, t, reduction="none")
    want = (2.0 * bce[0, :, 0].sum() + 5.0 * bce[0, :, 1].sum()) / (3 * (2.0 + 5.0))
    got = RegionLoss({"name": "dice_ce", "dice_weight": 0.0, "class_weights": "log_inverse"}, codes)(x, t)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    # equal weights: the unweighted mean
    flat = RegionLoss({"name": "dice_ce", "dice_weight": 0.0}, [3.0] * 8)(x, t)
    assert flat.item() == pytest.approx(bce.mean().item(), rel=1e-6)


@pytest.mark.parametrize("bad, match", [
    ({"name": "tversky"}, "expected one of"),
    ({"class_weights": "inverse"}, "class_weights"),
    ({"name": "focal", "class_weights": "log_inverse"}, "does not have"),
    ({"focal_alpha": 1.5}, "focal_alpha"),
    ({"dice_weight": -1}, "dice_weight"),
    ({"dice_weight": 0, "ce_weight": 0}, "weight 0"),
])
def test_bad_loss_values_are_clear_errors(bad, match):
    with pytest.raises(MedsegError, match=match):
        check_loss({**DEFAULT_LOSS, **bad})


def test_loss_keys_in_the_bundle_and_older_configs():
    from medseg.config import LATER_KEYS, experiment, resolve_config
    cfg = resolve_config("cpu", ["train.loss.name=dice_focal", "train.loss.dice_weight=0.7",
                                 "train.loss.focal_weight=0.3", "train.grad_checkpoint=true"])
    assert cfg["train"]["loss"]["name"] == "dice_focal" and cfg["train"]["grad_checkpoint"] is True
    assert resolve_config("cpu", [])["train"]["loss"] == DEFAULT_LOSS
    assert LATER_KEYS[("train", "loss")] == DEFAULT_LOSS
    with pytest.raises(MedsegError, match="unknown key"):
        resolve_config("cpu", ["train.loss.gama=2"])
    old = resolve_config("cpu", [])
    del old["train"]["loss"], old["train"]["grad_checkpoint"]
    again = experiment(**old)
    assert again["train"]["loss"] == DEFAULT_LOSS and again["train"]["grad_checkpoint"] is False


def test_training_class_weights_count_the_fold_labels(tmp_path):
    """`class_weights` counts the store's label maps of the training cases only."""
    from medseg.config import resolve_config
    from medseg.train import class_weights

    class _Store:
        convention = "brats2023"          # 1 NCR, 2 ED, 3 ET
        labels = {"a": np.array([0] * 60 + [2] * 30 + [1] * 6 + [3] * 4, np.uint8),
                  "b": np.array([0] * 40 + [2] * 10, np.uint8),
                  "val": np.array([3] * 1000, np.uint8)}

        def label(self, cid):
            return self.labels[cid]

    cfg = resolve_config("cpu", ["train.loss.class_weights=log_inverse"])
    got = class_weights(cfg, _Store(), ["a", "b"])
    counts = {"background": 100, "WT": 40, "TC+WT": 6, "TC+WT+ET": 4}
    assert {k: v["voxels"] for k, v in got["classes"].items()} == counts
    for k, n in counts.items():
        assert got["classes"][k]["weight"] == pytest.approx(1 / math.log(1.02 + n / 100))
    codes = got["codes"]
    assert len(codes) == 8 and codes[7] == pytest.approx(1 / math.log(1.02 + 0.04))
    assert class_weights(resolve_config("cpu", []), _Store(), ["a"]) is None
    _Store.labels["a"][0] = 9
    with pytest.raises(MedsegError, match="not in the brats2023"):
        class_weights(cfg, _Store(), ["a"])
