"""Light 3D segmentation networks for CPU inference (edge students): a
MobileNetV3-style U-Net and a thin plain U-Net, 4-channel MRI → 3 region logits.

Torch only (no torchvision). Registry names ``mobilenet_unet3d`` and
``thin_unet3d`` (`medseg.models`); builders `mobilenet_unet3d` and
`thin_unet3d`. Both map ``(B, 4, X, Y, Z)`` to ``(B, 3, X, Y, Z)`` logits at the
input resolution, a plain tensor in training as in evaluation (no deep
supervision heads), with no data-dependent Python control flow (ONNX export
with dynamic spatial axes). Sizes must be multiples of ``2 ** (len(channels) -
1)`` (the size divisor: 16 with the defaults). Instance norm needs more than
one voxel per channel (torch checks it in evaluation as well): patches and
windows must be at least ``2 ×`` the size divisor per axis (32³ with the
defaults; the ``cpu`` preset's 48³ gives a 3³ bottleneck).

What costs time on a CPU. A light network is limited by memory traffic, not
by arithmetic: at 128³ on one core, an instance norm over 16 channels takes
about half as long as a dense 3×3×3 convolution 8 → 8 (which does ~50× more
arithmetic), a trilinear ×2 upsampling of 16 channels longer than that
convolution, and the full-resolution level holds 8× the voxels of the next.
So both networks keep the full-resolution level narrow (8 channels) and short,
and ``mobilenet_unet3d`` does ~30× fewer multiply-accumulates than ``unet3d``
``cpu`` but runs only ~6-7× faster; `benchmarks/light_networks.py` measures them.

``mobilenet_unet3d`` (`MobileNetUNet3D`), default ``channels=(8, 16, 32, 48, 64)``,
``blocks=(1, 2, 2, 2)``, ``expansion=(1, 4, 4, 4)``, for a 64³ input::

    stem     3×3×3 conv 4 → 8, IN, hard-swish                      64³  → skip 0
    stage 1  1 inverted residual block, stride 2, 8 → 16          32³  → skip 1
    stage 2  2 blocks (first stride 2), 16 → 32, expansion 4      16³  → skip 2
    stage 3  2 blocks, 32 → 48                                     8³  → skip 3
    stage 4  2 blocks, 48 → 64                                     4³
    decoder  per level, coarse to fine: fuse(up ×2 of the coarser map, skip)
             → 3×3×3 depthwise conv, IN, hard-swish (width of the skip)
    head     1×1×1 conv → 3 logits                                64³

Inverted residual block (MobileNetV2/V3): 1×1×1 expand (× `expansion`), IN,
hard-swish → 3×3×3 depthwise conv (``groups`` = channels, stride 2 in the first
block of a stage: downsampling costs a depthwise, not a dense, convolution), IN,
hard-swish → squeeze-excitation → 1×1×1 project, IN, no activation (linear
bottleneck) → + input when the shapes match. Stage 1's expansion is 1 (no
expand convolution): its block reads the full-resolution stem output, where a
4× expansion would make the largest tensors of the network 4× wider
(MobileNetV3-Small's first block does the same). Squeeze-excitation: global
average pool → 1×1×1 conv (bias) → ReLU → 1×1×1 conv (bias) → hard-sigmoid
gate, as in MobileNetV3. With instance norm the pooled statistic of a channel
is no longer its mean (normalised to the affine bias before the activation)
but a function of the shape of its distribution (how much of it the
activation passes): the gate still sees whether a feature fires somewhere
in the window, which is what it needs to select channels.

Decoder fusion. Concatenating the upsampled coarse map with the skip and
applying a 1×1×1 convolution is the sum of two 1×1×1 convolutions, one per
branch; trilinear interpolation is linear per channel with weights summing to
1, so it commutes with the coarse branch's 1×1×1 convolution, which is
therefore applied *before* upsampling, on 8× fewer voxels. The fusion
``IN(up(W_c · coarse) + W_s · skip)`` is exactly ``IN(W · cat(up(coarse),
skip))`` with ``W = [W_c | W_s]`` (tested), without the full-resolution
concatenation, the full-resolution interpolation of the wide coarse map, and
the wide full-resolution convolution. A 3×3×3 depthwise convolution then mixes
space; channels are mixed by the next level's fusion and by the head.

Normalisation: instance norm with affine parameters (as medseg's other
networks): independent of the batch (training batches of 2), identical in
training and evaluation, and one ONNX InstanceNormalization node. Activations:
``nn.Hardswish`` / ``nn.Hardsigmoid`` (ONNX HardSwish / HardSigmoid).

``thin_unet3d`` (`ThinUNet3D`), default ``channels=(8, 16, 32, 64, 96)``: the
plain U-Net of ``unet3d`` (two 3×3×3 conv-IN-leaky-ReLU per level, the first
of each encoder level with stride 2, 2×2×2 stride-2 transposed convolutions up,
concatenated skips, 1×1×1 head) with half the ``cpu`` preset's widths (8…64
instead of 16…128) and 96 instead of 128 at the bottom: a baseline student
with dense convolutions only, the operations of ``unet3d`` itself, about 4×
fewer multiply-accumulates and about 3× fewer parameters.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medseg.errors import MedsegError
from medseg.labels import CHANNELS, REGIONS

__all__ = ["MobileNetUNet3D", "ThinUNet3D", "InvertedResidual3d", "SqueezeExcite3d", "FuseUp3d",
           "mobilenet_unet3d", "thin_unet3d", "MOBILENET_CHANNELS", "THIN_CHANNELS", "light_size_divisor"]

#: Default widths per resolution level (full resolution first); levels - 1 = downsamplings.
MOBILENET_CHANNELS: tuple[int, ...] = (8, 16, 32, 48, 64)
THIN_CHANNELS: tuple[int, ...] = (8, 16, 32, 64, 96)


def _norm(c: int) -> nn.Module:
    return nn.InstanceNorm3d(c, affine=True)


def _ints(name: str, arg: str, value, example: str) -> list[int]:
    """A list of positive integers from a config value, else a `MedsegError`."""
    try:
        out = [int(v) for v in value]
        if any(o != float(v) for o, v in zip(out, value)):
            raise ValueError
    except (TypeError, ValueError):
        raise MedsegError(f"{name} {arg}={value!r}: expected a list of integers, e.g. {arg}={example}") from None
    if min(out, default=0) < 1:
        raise MedsegError(f"{name} {arg}={out}: expected positive integers, e.g. {arg}={example}")
    return out


def _channels(name: str, channels) -> list[int]:
    ch = _ints(name, "channels", channels, "[8,16,32,64,96]")
    if len(ch) < 2:
        raise MedsegError(f"{name} channels={ch}: expected at least 2 levels (full resolution and one "
                          "downsampling), e.g. [8,16,32,64,96]")
    return ch


def light_size_divisor(channels: Sequence[int]) -> int:
    """Inputs must be multiples of this per axis: one stride-2 step per level after the first."""
    return 2 ** (len(channels) - 1)


def _act(kind: str) -> nn.Module:
    return nn.Hardswish(inplace=True) if kind == "hardswish" else nn.LeakyReLU(0.01, inplace=True)


class _ConvNormAct(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: str = "hardswish"):
        super().__init__(nn.Conv3d(cin, cout, k, stride, k // 2, groups=groups, bias=False), _norm(cout), _act(act))


class SqueezeExcite3d(nn.Module):
    """MobileNetV3 squeeze-excitation: ``x · hsigmoid(W2 · relu(W1 · mean(x) + b1) + b2)``,
    one gate in [0, 1] per sample and channel (hard-sigmoid: ``relu6(z + 3) / 6``)."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.reduce = nn.Conv3d(channels, hidden, 1)
        self.act = nn.ReLU(inplace=True)
        self.expand = nn.Conv3d(hidden, channels, 1)
        self.gate = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3, 4), keepdim=True)
        return x * self.gate(self.expand(self.act(self.reduce(s))))


class InvertedResidual3d(nn.Module):
    """1×1×1 expand → 3×3×3 depthwise (stride) → SE → 1×1×1 linear project (+ input
    when ``stride == 1`` and ``cin == cout``); no expand convolution when the
    expansion is 1."""

    def __init__(self, cin: int, cout: int, stride: int = 1, expansion: int = 4, se_reduction: int = 4):
        super().__init__()
        hidden = cin * expansion
        self.expand = _ConvNormAct(cin, hidden, 1) if expansion != 1 else nn.Identity()
        self.depthwise = _ConvNormAct(hidden, hidden, 3, stride, groups=hidden)
        self.se = SqueezeExcite3d(hidden, max(8, hidden // se_reduction)) if se_reduction else nn.Identity()
        self.project = nn.Sequential(nn.Conv3d(hidden, cout, 1, bias=False), _norm(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.se(self.depthwise(self.expand(x))))
        return x + y if self.residual else y


class FuseUp3d(nn.Module):
    """``act(IN(up(W_c · coarse) + W_s · skip))``: the concatenation of the ×2
    (trilinear) upsampled `coarse` map with `skip` followed by a 1×1×1 convolution
    ``[W_c | W_s]``, with W_c applied before the upsampling (module docstring)."""

    def __init__(self, c_coarse: int, c_skip: int, cout: int):
        super().__init__()
        self.coarse = nn.Conv3d(c_coarse, cout, 1, bias=False)
        self.skip = nn.Conv3d(c_skip, cout, 1, bias=False)
        self.norm = _norm(cout)
        self.act = nn.Hardswish(inplace=True)

    def fused(self, coarse: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """The pre-norm sum (what the concatenation + 1×1×1 convolution computes)."""
        up = F.interpolate(self.coarse(coarse), size=skip.shape[2:], mode="trilinear", align_corners=False)
        return up + self.skip(skip)

    def forward(self, coarse: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.fused(coarse, skip)))


def _init(net: nn.Module, a: float) -> None:
    for m in net.modules():
        if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)):
            nn.init.kaiming_normal_(m.weight, a=a)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class MobileNetUNet3D(nn.Module):
    """MobileNetV3-style encoder with a light U-Net decoder (module docstring).

    `channels`: width per resolution level, full resolution first (the stem's
    width, then one stride-2 stage per further entry). `blocks`: inverted
    residual blocks per stage (one entry per stage, or one number for all;
    default 1 in stage 1, then 2). `expansion`: expansion ratio per stage (or
    one number; default 1 in stage 1, see the module docstring, then 4).
    `se_reduction`: SE hidden width = expanded width / this (at least 8); 0
    drops squeeze-excitation.
    """

    def __init__(self, in_channels: int = len(CHANNELS), out_channels: int = len(REGIONS),
                 channels: Sequence[int] = MOBILENET_CHANNELS, blocks: Sequence[int] | int | None = None,
                 expansion: Sequence[int] | int | None = None, se_reduction: int = 4):
        super().__init__()
        name = "mobilenet_unet3d"
        ch = _channels(name, channels)
        n = len(ch) - 1
        blocks = [1] + [2] * (n - 1) if blocks is None else blocks
        expansion = [1] + [4] * (n - 1) if expansion is None else expansion
        blocks = _ints(name, "blocks", [blocks] * n if isinstance(blocks, (int, float)) else blocks, "[1,2,2,2]")
        expansion = _ints(name, "expansion", [expansion] * n if isinstance(expansion, (int, float)) else expansion,
                          "[1,4,4,4]")
        if len(blocks) != n or len(expansion) != n:
            raise MedsegError(f"{name}: blocks={blocks} and expansion={expansion} need one entry per "
                              f"stage ({n}: channels={ch} has {n + 1} levels)")
        try:
            se_reduction = int(se_reduction)
        except (TypeError, ValueError):
            raise MedsegError(f"{name} se_reduction={se_reduction!r}: expected an integer (0: no SE)") from None
        if se_reduction < 0:
            raise MedsegError(f"{name} se_reduction={se_reduction}: expected 0 (no SE) or a positive integer")
        self.stem = _ConvNormAct(in_channels, ch[0])
        self.stages = nn.ModuleList(
            nn.Sequential(*[InvertedResidual3d(ch[i] if b == 0 else ch[i + 1], ch[i + 1], 2 if b == 0 else 1,
                                               expansion[i], se_reduction) for b in range(blocks[i])])
            for i in range(n))
        # decoder, coarse to fine: level i fuses level i + 1's output with skip i
        self.fuse = nn.ModuleList(FuseUp3d(ch[i + 1], ch[i], ch[i]) for i in range(n))
        self.mix = nn.ModuleList(_ConvNormAct(ch[i], ch[i], 3, groups=ch[i]) for i in range(n))
        self.head = nn.Conv3d(ch[0], out_channels, 1)
        _init(self, 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.stem(x)]
        for stage in self.stages:
            skips.append(stage(skips[-1]))
        y = skips.pop()
        for i in reversed(range(len(self.stages))):
            y = self.mix[i](self.fuse[i](y, skips[i]))
        return self.head(y)


class ThinUNet3D(nn.Module):
    """Plain U-Net (``unet3d``'s layout) with thin levels (module docstring).

    `channels`: width per resolution level, full resolution first; one stride-2
    downsampling per further entry."""

    def __init__(self, in_channels: int = len(CHANNELS), out_channels: int = len(REGIONS),
                 channels: Sequence[int] = THIN_CHANNELS):
        super().__init__()
        ch = _channels("thin_unet3d", channels)
        act = "leakyrelu"
        self.encoder = nn.ModuleList(
            nn.Sequential(_ConvNormAct(in_channels if i == 0 else ch[i - 1], c, 3, 1 if i == 0 else 2, act=act),
                          _ConvNormAct(c, c, 3, act=act)) for i, c in enumerate(ch))
        self.up = nn.ModuleList(nn.ConvTranspose3d(ch[i + 1], ch[i], 2, 2, bias=False) for i in range(len(ch) - 1))
        self.decoder = nn.ModuleList(
            nn.Sequential(_ConvNormAct(2 * ch[i], ch[i], act=act), _ConvNormAct(ch[i], ch[i], act=act))
            for i in range(len(ch) - 1))
        self.head = nn.Conv3d(ch[0], out_channels, 1)
        _init(self, 0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for enc in self.encoder:
            x = enc(x)
            skips.append(x)
        y = skips.pop()
        for i in reversed(range(len(self.up))):
            y = self.decoder[i](torch.cat([self.up[i](y), skips[i]], 1))
        return self.head(y)


def mobilenet_unet3d(channels: Sequence[int] = MOBILENET_CHANNELS, blocks: Sequence[int] | int | None = None,
                     expansion: Sequence[int] | int | None = None, se_reduction: int = 4,
                     out_channels: int = len(REGIONS)) -> nn.Module:
    """Registry builder of `MobileNetUNet3D` (4 channels → the task's regions, 3 by default)."""
    return MobileNetUNet3D(len(CHANNELS), out_channels, channels=channels, blocks=blocks, expansion=expansion,
                           se_reduction=se_reduction)


def thin_unet3d(channels: Sequence[int] = THIN_CHANNELS, out_channels: int = len(REGIONS)) -> nn.Module:
    """Registry builder of `ThinUNet3D` (4 channels → the task's regions, 3 by default)."""
    return ThinUNet3D(len(CHANNELS), out_channels, channels=channels)
