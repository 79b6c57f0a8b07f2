"""Network registry: name → builder of a 3D network with 4 input channels
(CHANNELS order) and 3 region logits (TC, WT, ET).

`unet3d` (the default) is MONAI's DynUNet configured like nnU-Net's 3D
full-resolution U-Net: 3×3×3 convolutions, strided-convolution downsampling,
instance norm, leaky ReLU, deep supervision heads in training. Its width is a
preset: ``full`` (32…320 filters, nnU-Net's size, the GPU recipe) or ``cpu``
(16…128, trains in minutes on 2 cores). With ``missing_aware=True`` every
instance norm also takes a FiLM modulation driven by which input channels are
missing (`MissingAwareDynUNet`), for models trained with modality dropout.
`deeplabv3plus` is a 3D DeepLabv3+ (output stride 8, ASPP, stride-4 decoder; `medseg.deeplab`).
`mobilenet_unet3d` is a MobileNetV3-style U-Net (depthwise inverted residuals, SE; `medseg.light`).
`thin_unet3d` is a plain U-Net with thin levels (8…96 filters), a fast CPU student (`medseg.light`).
"""

from __future__ import annotations

from typing import Callable

import torch
from monai.networks.nets import AttentionUnet, DynUNet, SegResNet, SwinUNETR
from torch import nn

from medseg.deeplab import DeepLabV3Plus3D
from medseg.errors import MedsegError
from medseg.labels import CHANNELS, REGIONS
from medseg.light import MOBILENET_CHANNELS, THIN_CHANNELS, light_size_divisor, mobilenet_unet3d, thin_unet3d

__all__ = ["UNET3D_FILTERS", "MODELS", "FiLMInstanceNorm3d", "MissingAwareDynUNet", "missing_channels",
           "build_model", "network_from_spec", "size_divisor", "unet3d_outputs"]

#: Filters per resolution level of `unet3d`, per preset (levels - 1 = downsamplings).
UNET3D_FILTERS: dict[str, tuple[int, ...]] = {
    "full": (32, 64, 128, 256, 320, 320),
    "cpu": (16, 32, 64, 128, 128),
}


def unet3d_outputs(preset: str = "full", filters: tuple[int, ...] | None = None,
                   deep_supr_num: int | None = None, missing_aware: bool = False) -> int:
    """Outputs of `unet3d` in training: the full-resolution one plus one head per
    decoder level except the lowest (nnU-Net drops the lowest-resolution output:
    too coarse to supervise). full (6 levels): 1, ½, ¼, ⅛ → 4; cpu (5 levels): 3."""
    if filters is None:
        if preset not in UNET3D_FILTERS:
            raise MedsegError(f"unknown unet3d preset {preset!r}; expected one of {', '.join(UNET3D_FILTERS)}")
        filters = UNET3D_FILTERS[preset]
    heads = len(filters) - 3 if deep_supr_num is None else deep_supr_num
    return 1 + max(0, min(heads, len(filters) - 2))


def missing_channels(x: torch.Tensor) -> torch.Tensor:
    """`(B, C, ...)` input → `(B, C)` float: 1 where channel c of sample b is
    exactly MISSING_FILL (0) everywhere, i.e. a missing or dropped modality.

    A patch with every channel 0 (outside the brain, where z-scored images are 0)
    counts as complete: it carries no sign of what is missing, and the network
    must then behave as the plain one."""
    present = x.abs().flatten(2).amax(-1) > 0
    present = present | ~present.any(1, keepdim=True)
    return (~present).to(x.dtype)


class _Missing:
    """What the FiLM layers of one network read: the current batch's missing-channel
    flags (set by `MissingAwareDynUNet.forward` around each call)."""

    flags: torch.Tensor | None = None


class FiLMInstanceNorm3d(nn.InstanceNorm3d):
    """Instance norm followed by a feature-wise affine modulation driven by the
    missing-modality flags: ``y = IN(x) · (1 + γ(m)) + β(m)`` with ``γ, β`` linear
    in `m` and no bias. With every modality present `m = 0`, so ``γ = β = 0`` and
    the layer is exactly the instance norm it replaces, whatever was learnt: the
    full-input network is the plain one, and the modulation only serves cases
    with a modality missing. It sits before the activation (between a norm and a
    LeakyReLU in DynUNet), where a shift is not undone by the next norm.
    Its state-dict keys are those of the norm plus ``film.weight``, so a plain
    network's weights load into it (the modulation then starts at zero)."""

    def __init__(self, norm: nn.InstanceNorm3d, modalities: int, state: _Missing):
        super().__init__(norm.num_features, eps=norm.eps, momentum=norm.momentum, affine=norm.affine,
                         track_running_stats=norm.track_running_stats)
        if norm.affine:
            self.weight, self.bias = norm.weight, norm.bias
        self.film = nn.Linear(modalities, 2 * norm.num_features, bias=False)
        nn.init.zeros_(self.film.weight)
        object.__setattr__(self, "_state", state)     # shared, not a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        m = self._state.flags
        if m is None:
            return y
        gb = self.film(m.to(y.dtype)).view(m.shape[0], 2, -1, *([1] * (y.ndim - 2)))
        return y * (1 + gb[:, 0]) + gb[:, 1]


class MissingAwareDynUNet(DynUNet):
    """DynUNet whose every instance norm is a `FiLMInstanceNorm3d`: the network is
    told which modalities are missing (channels that are exactly 0 over the whole
    input window, `missing_channels`), so a missing modality is not mistaken for
    tissue at its mean intensity. The flags come from the input itself, so the
    input contract (4 channels, a missing one filled with 0) and the ONNX graph's
    interface are unchanged. Used with ``train.modality_dropout`` > 0."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        state = _Missing()
        object.__setattr__(self, "_missing_state", state)
        for parent in list(self.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.InstanceNorm3d:
                    setattr(parent, name, FiLMInstanceNorm3d(child, self.in_channels, state))

    def forward(self, x):
        self._missing_state.flags = missing_channels(x)
        try:
            return super().forward(x)
        finally:
            self._missing_state.flags = None


def _unet3d(preset: str = "full", filters: tuple[int, ...] | None = None,
            deep_supervision: bool = True, deep_supr_num: int | None = None,
            missing_aware: bool = False, out_channels: int = len(REGIONS)) -> nn.Module:
    heads = unet3d_outputs(preset, filters, deep_supr_num) - 1
    if filters is None:
        filters = UNET3D_FILTERS[preset]
    n = len(filters)
    strides = [[1, 1, 1]] + [[2, 2, 2]] * (n - 1)
    cls = MissingAwareDynUNet if missing_aware else DynUNet
    return cls(
        spatial_dims=3, in_channels=len(CHANNELS), out_channels=out_channels,
        kernel_size=[[3, 3, 3]] * n, strides=strides, upsample_kernel_size=strides[1:],
        filters=list(filters), norm_name=("instance", {"affine": True}),
        act_name=("leakyrelu", {"negative_slope": 0.01, "inplace": True}),
        deep_supervision=deep_supervision and heads > 0, deep_supr_num=max(1, heads),
    )


def _segresnet(init_filters: int = 16, out_channels: int = len(REGIONS)) -> nn.Module:
    return SegResNet(spatial_dims=3, init_filters=init_filters, in_channels=len(CHANNELS),
                     out_channels=out_channels, blocks_down=(1, 2, 2, 4), blocks_up=(1, 1, 1))


def _swinunetr(feature_size: int = 24, out_channels: int = len(REGIONS)) -> nn.Module:
    return SwinUNETR(in_channels=len(CHANNELS), out_channels=out_channels, feature_size=feature_size)


def _attention_unet(channels: tuple[int, ...] = (16, 32, 64, 128, 256),
                    out_channels: int = len(REGIONS)) -> nn.Module:
    return AttentionUnet(spatial_dims=3, in_channels=len(CHANNELS), out_channels=out_channels,
                         channels=list(channels), strides=[2] * (len(channels) - 1))


def _deeplabv3plus(channels: tuple[int, ...] = (16, 32, 64, 128), aspp_rates: tuple[int, ...] = (1, 2, 3),
                   dilations: tuple[int, ...] = (2,), aspp_channels: int | None = None,
                   low_level_channels: int | None = None, dropout: float = 0.0,
                   out_channels: int = len(REGIONS)) -> nn.Module:
    return DeepLabV3Plus3D(len(CHANNELS), out_channels, channels=channels, dilations=dilations,
                           aspp_rates=aspp_rates, aspp_channels=aspp_channels,
                           low_level_channels=low_level_channels, dropout=dropout)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "unet3d": _unet3d,
    "segresnet": _segresnet,
    "swinunetr": _swinunetr,
    "attention_unet": _attention_unet,
    "deeplabv3plus": _deeplabv3plus,
    "mobilenet_unet3d": mobilenet_unet3d,
    "thin_unet3d": thin_unet3d,
}


def build_model(name: str = "unet3d", **kwargs) -> nn.Module:
    """Build a registered network; unknown names or arguments are a `MedsegError`."""
    if name not in MODELS:
        raise MedsegError(f"unknown model {name!r}; expected one of {', '.join(MODELS)}")
    try:
        return MODELS[name](**kwargs)
    except (TypeError, ValueError) as exc:
        raise MedsegError(f"model {name!r}: bad arguments {kwargs} ({exc})") from None


def network_from_spec(spec: dict, deep_supervision: bool = False) -> nn.Module:
    """``{"name": ..., "args": {...}}`` (an experiment's ``model``, a checkpoint's
    ``network``) → the network; deep-supervision heads only when asked (unet3d)."""
    extra = {"deep_supervision": deep_supervision} if spec["name"] == "unet3d" else {}
    return build_model(spec["name"], **{**spec["args"], **extra})


def size_divisor(name: str = "unet3d", **kwargs) -> int:
    """Patch and ROI sizes must be multiples of this: 2^(number of downsamplings)."""
    if name not in MODELS:
        raise MedsegError(f"unknown model {name!r}; expected one of {', '.join(MODELS)}")
    if name == "unet3d":
        filters = kwargs.get("filters") or UNET3D_FILTERS[kwargs.get("preset", "full")]
        return 2 ** (len(filters) - 1)
    if name == "attention_unet":
        return 2 ** (len(kwargs.get("channels", (16, 32, 64, 128, 256))) - 1)
    if name == "segresnet":
        return 8     # blocks_down (1, 2, 2, 4): 3 downsamplings
    if name == "deeplabv3plus":
        return 8     # output stride 8: 3 stride-2 stages, then dilation
    if name == "mobilenet_unet3d":
        return light_size_divisor(kwargs.get("channels") or MOBILENET_CHANNELS)   # default 16
    if name == "thin_unet3d":
        return light_size_divisor(kwargs.get("channels") or THIN_CHANNELS)        # default 16
    return 32        # swinunetr: patch embedding 2 × 4 patch merges
