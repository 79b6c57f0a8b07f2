import pytest
import torch

from medseg.errors import MedsegError
from medseg.models import MODELS, UNET3D_FILTERS, build_model, size_divisor

SMALL = {"unet3d": {"preset": "cpu"}, "segresnet": {"init_filters": 8},
         "swinunetr": {"feature_size": 12}, "attention_unet": {"channels": (8, 16, 32)},
         "deeplabv3plus": {"channels": (8, 16, 32, 64)},
         "mobilenet_unet3d": {}, "thin_unet3d": {}}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_maps_4_channels_to_3_regions(name):
    torch.manual_seed(0)
    net = build_model(name, **SMALL[name]).eval()
    s = max(32, 2 * size_divisor(name, **SMALL[name]))   # bottleneck at least 2³
    with torch.no_grad():
        out = net(torch.randn(1, 4, s, s, s))
    assert out.shape == (1, 3, s, s, s)


def test_unet3d_is_nnunet_like_with_deep_supervision():
    net = build_model("unet3d", preset="cpu").train()
    out = net(torch.randn(2, 4, 32, 32, 32))
    assert out.shape == (2, 3, 3, 32, 32, 32)       # (B, 1 + 2 heads, regions, ...)
    assert size_divisor("unet3d", preset="full") == 32 and size_divisor("unet3d", preset="cpu") == 16
    full = build_model("unet3d", preset="full")
    assert [m.conv1.conv.out_channels for m in (full.input_block,)] == [32]
    assert UNET3D_FILTERS["full"][-1] == 320


def test_registry_errors_list_names():
    with pytest.raises(MedsegError, match="unet3d, segresnet, swinunetr, attention_unet"):
        build_model("vnet")
    with pytest.raises(MedsegError, match="expected one of full, cpu"):
        build_model("unet3d", preset="huge")
    with pytest.raises(MedsegError, match="bad arguments"):
        build_model("segresnet", width=3)
