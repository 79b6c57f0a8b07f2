import pytest
import torch
from monai.losses import DiceCELoss

from medseg.losses import RegionDiceBCELoss, deep_supervision_weights


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


@pytest.mark.parametrize("preset, size, levels", [("cpu", 48, 3), ("full", 64, 4)])
def test_deep_supervision_weights_are_normalised_on_dynunet_heads(preset, size, levels):
    # The real network and loss of each preset: DynUNet in training mode returns
    # (B, outputs, 3, D, H, W), every head upsampled to the patch size.
    from medseg.config import resolve_config
    from medseg.train import build_criterion, build_network
    cfg = resolve_config(preset, [])
    torch.manual_seed(0)
    net = build_network(cfg, training=True).train()
    with torch.no_grad():
        out = net(torch.randn(1, 4, size, size, size))
    assert out.shape == (1, levels, 3, size, size, size)
    heads = list(torch.unbind(out, 1))
    t = (torch.rand(1, 3, size, size, size) > 0.7).float()
    loss = build_criterion(cfg)
    base = RegionDiceBCELoss()
    w = deep_supervision_weights(levels)
    # nnU-Net: 1, 1/2, 1/4, … divided by their sum.
    assert sum(w) == pytest.approx(1.0)
    assert w == pytest.approx([0.5 ** i / sum(0.5 ** j for j in range(levels)) for i in range(levels)])
    want = sum(wi * base(h, t).item() for wi, h in zip(w, heads))
    assert loss(heads, t).item() == pytest.approx(want, rel=1e-5)
    # Normalised: the same output on every head costs what one output costs, so the
    # recipe's learning rate is the learning rate.
    same = [heads[0]] * levels
    assert loss(same, t).item() == pytest.approx(base(heads[0], t).item(), rel=1e-5)


def test_shallow_unet3d_trains_without_deep_supervision():
    # Filters [8, 16, 32]: decoder levels 1 and ½ only; ½ is the lowest, dropped.
    from medseg.config import resolve_config
    from medseg.train import deep_supervised
    cfg = resolve_config("cpu", ["model.args.filters=[8,16,32]"])
    assert not deep_supervised(cfg)
