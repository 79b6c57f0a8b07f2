"""3D DeepLabv3+ (Chen et al., ECCV 2018) for 4-channel MRI → 3 region logits.

Torch only (no torchvision). The registry entry is ``deeplabv3plus``
(`medseg.models`); its size divisor is 8 (output stride 8: three stride-2
stages), so patch and window sizes must be multiples of 8. Instance norm
needs more than one voxel per channel in training, so train on patches of at
least 16 per axis (the stride-8 map is then 2³; the ``cpu`` preset's 48³
gives 6³).

Layout, for the default ``channels=(16, 32, 64, 128)`` and a 48³ input::

    stem     3×3×3 conv  4 → 16              stride 1   48³
    stage 1  residual block 16 → 32, stride 2 stride 2   24³
    stage 2  residual block 32 → 64, stride 2 stride 4   12³  → low-level features
    stage 3  residual block 64 → 128, stride 2 stride 8    6³
             + a residual block per ``dilations`` (3×3×3, dilation 2) at stride 8
    ASPP     1×1×1 | 3×3×3 dil 1 | dil 2 | dil 3 | image pooling → concat → 1×1×1 (64)
    decoder  ASPP ×2 (trilinear) ‖ low-level 1×1×1 (64 → 32) → two 3×3×3 convs (64)
             → 1×1×1 head (3 logits) → ×4 (trilinear) to the input size

Convolutions are followed by instance norm (affine) and leaky ReLU (0.01), as
in medseg's other networks; residual blocks are the two-convolution basic
block with a 1×1×1 projection shortcut where the width or stride changes.

ASPP rates. The paper's rates (6, 12, 18 at output stride 16; 12, 24, 36 at 8)
are for 2D crops of 513² whose stride-16 map is 33²; the rates are then about
1/5, 1/3 and 1/2 of the map's width, and the largest fills most of it. Here
the ``cpu`` preset trains 48³ patches, a 6³ map at stride 8: rates (1, 2, 3)
keep the same proportions (a dilation-3 kernel spans 7 voxels, just over the
map), whereas (2, 4, 6) would put every off-centre tap of the dilation-6
kernel outside a 6³ map (only zero padding), degenerating that branch into a
1×1×1 convolution. Larger patches keep the proportions with larger rates:
96³ (a 12³ map) ``aspp_rates=(2, 4, 6)``, 128³ (16³, the ``full`` preset's
patch) ``(3, 6, 9)``. The encoder's dilated block (rate 2) at stride 8 adds
context before ASPP without shrinking the map further. Sliding-window
inference uses windows of the training patch size, so the map seen in
inference is the one seen in training.

Image-level pooling: global average pool → 1×1×1 conv with bias → leaky ReLU,
no norm (an instance norm of a 1×1×1 map is undefined, and this map is one
voxel per sample), then broadcast over the stride-8 map. Broadcasting a 1³ map
is exactly its trilinear (or nearest) upsampling, and exports to ONNX as
GlobalAveragePool + Expand with the shape read from the feature map, so it
holds for dynamic spatial axes. The other resizes are ``F.interpolate`` with
``size`` read from the target tensor's shape (ONNX Resize with dynamic sizes).

Low-level features at stride 4 as in DeepLabv3+ (a 48³ patch: 12³). The head
is applied before the final ×4 upsampling: a 1×1×1 convolution and trilinear
interpolation are both linear with weights summing to 1, so the order does not
change the result (up to rounding), and upsampling 3 channels instead of 64 saves memory and
time at full resolution.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medseg.errors import MedsegError
from medseg.labels import CHANNELS, REGIONS

__all__ = ["DeepLabV3Plus3D", "ASPP3D", "OUTPUT_STRIDE"]

#: Three stride-2 stages: inputs must be multiples of this per axis.
OUTPUT_STRIDE = 8


def _act() -> nn.Module:
    return nn.LeakyReLU(0.01, inplace=True)


def _norm(c: int) -> nn.Module:
    return nn.InstanceNorm3d(c, affine=True)


class _ConvNormAct(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, dilation: int = 1):
        pad = dilation * (k // 2)
        super().__init__(nn.Conv3d(cin, cout, k, stride, pad, dilation, bias=False), _norm(cout), _act())


class _ResBlock(nn.Module):
    """Basic residual block: conv-IN-act, conv-IN, + shortcut, act."""

    def __init__(self, cin: int, cout: int, stride: int = 1, dilation: int = 1):
        super().__init__()
        self.conv1 = _ConvNormAct(cin, cout, 3, stride, dilation)
        self.conv2 = nn.Conv3d(cout, cout, 3, 1, dilation, dilation, bias=False)
        self.norm2 = _norm(cout)
        self.shortcut = (nn.Identity() if stride == 1 and cin == cout else
                         nn.Sequential(nn.Conv3d(cin, cout, 1, stride, bias=False), _norm(cout)))
        self.act = _act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm2(self.conv2(self.conv1(x))) + self.shortcut(x))


class _ImagePool(nn.Module):
    """Global average pool → 1×1×1 conv (bias, no norm) → act → broadcast back."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.conv = nn.Conv3d(cin, cout, 1, bias=True)
        self.act = _act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.conv(self.pool(x)))
        return y.expand(-1, -1, *x.shape[2:])


class ASPP3D(nn.Module):
    """Atrous spatial pyramid pooling: a 1×1×1 conv, one 3×3×3 conv per rate, image
    pooling; concatenated and projected by a 1×1×1 conv (then optional dropout)."""

    def __init__(self, cin: int, cout: int, rates: Sequence[int], dropout: float = 0.0):
        super().__init__()
        self.branches = nn.ModuleList([_ConvNormAct(cin, cout, 1)]
                                      + [_ConvNormAct(cin, cout, 3, 1, int(r)) for r in rates]
                                      + [_ImagePool(cin, cout)])
        self.project = _ConvNormAct(cout * len(self.branches), cout, 1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.project(torch.cat([b(x) for b in self.branches], 1)))


class DeepLabV3Plus3D(nn.Module):
    """3D DeepLabv3+ with a light residual encoder at output stride 8 (module docstring).

    `channels`: widths of the stem (stride 1) and of the three stride-2 stages
    (strides 2, 4, 8). `dilations`: one extra residual block at stride 8 per
    entry, with that dilation (instead of further striding). `aspp_rates`: the
    dilations of ASPP's 3×3×3 branches. `aspp_channels`: width of each ASPP
    branch and of the decoder (default: half the last width).
    `low_level_channels`: width the stride-4 features are reduced to (default:
    half of ``channels[2]``). `dropout`: after the ASPP projection (training only).
    """

    def __init__(self, in_channels: int = len(CHANNELS), out_channels: int = len(REGIONS),
                 channels: Sequence[int] = (16, 32, 64, 128), dilations: Sequence[int] = (2,),
                 aspp_rates: Sequence[int] = (1, 2, 3), aspp_channels: int | None = None,
                 low_level_channels: int | None = None, dropout: float = 0.0):
        super().__init__()
        try:
            channels = [int(c) for c in channels]
            rates, dils = [int(r) for r in aspp_rates], [int(d) for d in dilations]
        except (TypeError, ValueError):
            raise MedsegError(f"deeplabv3plus channels={channels!r}, aspp_rates={aspp_rates!r}, "
                              f"dilations={dilations!r}: expected lists of integers, e.g. "
                              "channels=[16,32,64,128], aspp_rates=[1,2,3], dilations=[2]") from None
        if len(channels) != 4 or min(channels) < 1:
            raise MedsegError(f"deeplabv3plus channels={channels}: expected 4 positive widths "
                              "(stem, stride 2, stride 4, stride 8), e.g. [16, 32, 64, 128]")
        if not rates or min(rates + dils) < 1:
            raise MedsegError(f"deeplabv3plus aspp_rates={rates}, dilations={dils}: expected positive "
                              "integers (at least one ASPP rate)")
        if not 0.0 <= float(dropout) < 1.0:
            raise MedsegError(f"deeplabv3plus dropout={dropout}: expected a probability in [0, 1)")
        c0, c1, c2, c3 = channels
        a = int(aspp_channels or max(1, c3 // 2))
        low = int(low_level_channels or max(1, c2 // 2))
        self.stem = _ConvNormAct(in_channels, c0)
        self.stage1 = _ResBlock(c0, c1, stride=2)
        self.stage2 = _ResBlock(c1, c2, stride=2)
        self.stage3 = nn.Sequential(_ResBlock(c2, c3, stride=2),
                                    *[_ResBlock(c3, c3, dilation=d) for d in dils])
        self.aspp = ASPP3D(c3, a, rates, float(dropout))
        self.reduce = _ConvNormAct(c2, low, 1)
        self.decoder = nn.Sequential(_ConvNormAct(a + low, a), _ConvNormAct(a, a))
        self.head = nn.Conv3d(a, out_channels, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, a=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = self.stage2(self.stage1(self.stem(x)))           # stride 4
        y = self.aspp(self.stage3(low))                         # stride 8
        y = F.interpolate(y, size=low.shape[2:], mode="trilinear", align_corners=False)
        y = self.decoder(torch.cat([y, self.reduce(low)], 1))
        y = self.head(y)                                        # linear: commutes with the resize
        return F.interpolate(y, size=x.shape[2:], mode="trilinear", align_corners=False)
