import pytest
import torch
from monai.losses import DiceCELoss

from medseg.losses import RegionDiceBCELoss, build_loss


def _nested_target():
    """(1, 3, 4, 4, 4) multi-hot TC/WT/ET: an ET voxel is in all three regions."""
    t = torch.zeros(1, 3, 4, 4, 4)
    t[:, 1, :2] = 1          # WT
    t[:, 0, :1] = 1          # TC ⊂ WT
    t[:, 2, :1, :2] = 1      # ET ⊂ TC
    return t


def test_binary_ce_reaches_zero_on_overlapping_regions():
    t = _nested_target()
    perfect = (t * 2 - 1) * 30.0        # confident, correct logits
    assert RegionDiceBCELoss()(perfect, t).item() < 1e-3


def test_monai_dicece_is_softmax_ce_on_multichannel_targets():
    """Pins why medseg does not use DiceCELoss for regions: its CE part stays large
    for perfect predictions of overlapping regions."""
    t = _nested_target()
    perfect = (t * 2 - 1) * 30.0
    monai_loss = DiceCELoss(sigmoid=True)(perfect, t).item()
    assert monai_loss > 0.3
    assert RegionDiceBCELoss()(perfect, t).item() < monai_loss / 100


def test_loss_orders_predictions():
    t = _nested_target()
    good = (t * 2 - 1) * 3.0
    bad = -good
    loss = RegionDiceBCELoss()
    assert loss(good, t) < loss(torch.zeros_like(t), t) < loss(bad, t)


def test_deep_supervision_weights_heads():
    t = _nested_target()
    perfect = (t * 2 - 1) * 30.0
    wrong = torch.zeros(1, 3, 2, 2, 2)
    ds = build_loss(deep_supervision=True)
    full = ds([perfect], t).item()
    with_head = ds([perfect, wrong], t).item()
    assert full < 1e-3
    # weights 1, 1/2 (not normalised); the target is downsampled to the head's size
    small = torch.nn.functional.interpolate(t, size=(2, 2, 2), mode="nearest-exact")
    assert with_head == pytest.approx(full + 0.5 * RegionDiceBCELoss()(wrong, small).item(), rel=1e-4)
