"""MONAI dictionary transforms, defined once for training, validation and prediction.

Keys: ``image`` (the datalist's file list or 4D file) and ``label``. After
`preprocessing`: ``image`` is `(4, X, Y, Z)` float32 in CHANNELS order (T1,
T1ce, T2, FLAIR), RAS, at the target spacing, cropped to the brain's non-zero
box and z-scored per channel over brain voxels; ``label`` is `(3, X, Y, Z)`
float32 multi-hot TC/WT/ET.
"""

from __future__ import annotations

import logging
import warnings
from typing import Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import (
    Affine, Compose, CropForegroundd, EnsureChannelFirstd, EnsureTyped, LoadImaged, MapTransform,
    NormalizeIntensityd, Orientationd, RandAdjustContrastd, RandCropByPosNegLabeld, RandFlipd,
    RandGaussianNoised, RandomizableTransform, RandRotated, RandScaleIntensityd, RandShiftIntensityd, RandZoomd,
    Spacingd, SpatialPadd,
)

from medseg.errors import MedsegError
from medseg.labels import CHANNELS, labels_to_regions

__all__ = ["IMAGE", "LABEL", "NEGLIGIBLE", "MISSING_FILL", "ReorderChannelsd", "FillMissingChannelsd",
           "RandModalityDropoutd", "LabelsToRegionsd", "ClearResamplingNoised", "RandRotateZoomd",
           "preprocessing", "train_augmentation", "patch_augmentation"]

IMAGE, LABEL = "image", "label"

# LoadImaged registers every MONAI reader; with pydicom installed (DICOM input),
# MONAI's GPU DICOM decoder plugin then reports at each load that nvImageCodec is
# absent. medseg decodes DICOM itself (medseg.dicom): the notice is noise.
logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader")


class ReorderChannelsd(MapTransform):
    """Reorder channels from the datalist's order (e.g. MSD: FLAIR, T1, T1ce, T2)
    to medseg's CHANNELS order."""

    def __init__(self, keys: KeysCollection, channels: Sequence[str]):
        super().__init__(keys)
        if sorted(channels) != sorted(CHANNELS):
            raise MedsegError(f"datalist channels {list(channels)} are not a permutation of {list(CHANNELS)}")
        self.order = [list(channels).index(c) for c in CHANNELS]

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            if d[key].shape[0] != len(self.order):
                raise MedsegError(f"{key}: expected {len(self.order)} channels {list(CHANNELS)}, "
                                  f"found shape {tuple(d[key].shape)}")
            d[key] = d[key][self.order]
        return d


class LabelsToRegionsd(MapTransform):
    """`(1, X, Y, Z)` label map in `convention` → `(3, X, Y, Z)` float multi-hot TC/WT/ET."""

    def __init__(self, keys: KeysCollection, convention: str):
        super().__init__(keys)
        self.convention = convention

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            lab = d[key]
            arr = lab.detach().cpu().numpy() if isinstance(lab, torch.Tensor) else np.asarray(lab)
            regions = labels_to_regions(np.rint(arr[0]), self.convention).astype(np.float32)
            out = torch.as_tensor(regions)
            d[key] = MetaTensor(out, meta=lab.meta) if isinstance(lab, MetaTensor) else out
        return d


#: Resampled voxels below this fraction of the channel's largest magnitude are set
#: to 0. Why: interpolation leaves float noise (about 1e-5 of the signal) in the
#: background; with "non-zero = brain" it would move the crop box and enter the
#: z-score as brain voxels, so two correct resamplers (MONAI's and the torch-free
#: edge runtime's) would disagree near the brain's edge.
NEGLIGIBLE = 1e-4


class ClearResamplingNoised(MapTransform):
    """Zero the voxels whose magnitude is below NEGLIGIBLE × the channel's maximum."""

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            peak = torch.as_tensor(img).abs().flatten(1).amax(1).view(-1, *[1] * (img.ndim - 1))
            d[key] = img * (torch.as_tensor(img).abs() >= NEGLIGIBLE * peak)
        return d


#: Value of a missing (or dropped) modality after z-scoring: 0, the channel's mean.
MISSING_FILL = 0.0


class FillMissingChannelsd(MapTransform):
    """`(k, X, Y, Z)` images of the `present` modalities (in that order, 1 ≤ k < 4) →
    `(4, X, Y, Z)` in CHANNELS order, the missing channels all MISSING_FILL. Zeros
    stay zeros through the brain crop (which looks for any channel > 0) and the
    z-score over non-zero voxels, so a missing channel reaches the network exactly
    as `RandModalityDropoutd` showed it in training."""

    def __init__(self, keys: KeysCollection, present: Sequence[str]):
        super().__init__(keys)
        unknown = [c for c in present if c not in CHANNELS]
        if unknown or not present or len(set(present)) != len(present):
            raise MedsegError(f"modalities {list(present)}: expected distinct names from {list(CHANNELS)}")
        self.present = list(present)

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            if img.shape[0] != len(self.present):
                raise MedsegError(f"{key}: expected {len(self.present)} channels {self.present}, "
                                  f"found shape {tuple(img.shape)}")
            out = torch.full((len(CHANNELS), *img.shape[1:]), MISSING_FILL, dtype=torch.as_tensor(img).dtype)
            for i, c in enumerate(self.present):
                out[CHANNELS.index(c)] = torch.as_tensor(img[i])
            d[key] = MetaTensor(out, meta=img.meta) if isinstance(img, MetaTensor) else out
        return d


class RandModalityDropoutd(RandomizableTransform, MapTransform):
    """With probability `prob`, set a random subset of the image channels to
    MISSING_FILL: one of the 14 non-empty subsets whose complement is non-empty
    (at least one modality always stays), each equally likely. Applied after the
    intensity augmentations, so a dropped channel is exactly the fill value, as a
    missing modality is at prediction time (`FillMissingChannelsd`)."""

    #: Every droppable subset of channel indices: non-empty, at least one kept.
    SUBSETS = [tuple(i for i in range(len(CHANNELS)) if m >> i & 1) for m in range(1, 2 ** len(CHANNELS) - 1)]

    def __init__(self, keys: KeysCollection, prob: float = 0.5):
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob)
        self.drop: tuple[int, ...] = ()

    def randomize(self, data=None) -> None:
        super().randomize(None)
        self.drop = self.SUBSETS[self.R.randint(len(self.SUBSETS))] if self._do_transform else ()

    def __call__(self, data):
        d = dict(data)
        self.randomize()
        if not self.drop:
            return d
        for key in self.key_iterator(d):
            img = d[key].clone() if isinstance(d[key], torch.Tensor) else np.array(d[key])
            img[list(self.drop)] = MISSING_FILL
            d[key] = img
        return d


def preprocessing(channels: Sequence[str], convention: str, spacing=(1.0, 1.0, 1.0),
                  with_label: bool = True) -> Compose:
    """Load → channel-first → CHANNELS order → RAS → spacing → brain crop → z-score → regions.

    `channels` names the image files' modalities in order; a subset of CHANNELS
    (modalities missing at prediction time) is completed with MISSING_FILL channels."""
    keys = [IMAGE, LABEL] if with_label else [IMAGE]
    order = ReorderChannelsd(IMAGE, channels) if sorted(channels) == sorted(CHANNELS) \
        else FillMissingChannelsd(IMAGE, channels)
    steps = [
        LoadImaged(keys, image_only=True),
        EnsureChannelFirstd(keys),
        order,
        Orientationd(keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        Spacingd(keys, pixdim=tuple(spacing), mode=("bilinear", "nearest")[: len(keys)]),
        ClearResamplingNoised(IMAGE),
        CropForegroundd(keys, source_key=IMAGE, select_fn=lambda x: x > 0, allow_smaller=True),
        NormalizeIntensityd(IMAGE, nonzero=True, channel_wise=True),
    ]
    if with_label:
        steps.append(LabelsToRegionsd(LABEL, convention))
    steps.append(EnsureTyped(keys, dtype=torch.float32, track_meta=True))
    return Compose(steps)


def train_augmentation(patch: Sequence[int], pos: float = 2.0, neg: float = 1.0,
                       modality_dropout: float = 0.0) -> Compose:
    """Random patch (tumour over-sampled pos:neg), flips on all axes, rotation and
    scaling, intensity scale/shift, gamma and noise, then (with `modality_dropout`
    > 0) modality dropout. A brain box smaller than the patch is zero-padded first,
    so every patch of a batch has the same shape."""
    keys = [IMAGE, LABEL]
    dropout = [RandModalityDropoutd(IMAGE, modality_dropout)] if modality_dropout > 0 else []
    return Compose([
        SpatialPadd(keys, spatial_size=tuple(patch)),
        RandCropByPosNegLabeld(keys, label_key=LABEL, spatial_size=tuple(patch), pos=pos, neg=neg,
                               num_samples=1, allow_smaller=True),
        RandRotated(keys, range_x=0.26, range_y=0.26, range_z=0.26, prob=0.2,
                    mode=("bilinear", "nearest"), padding_mode="zeros", keep_size=True),
        # "nearest-exact", not "nearest": torch's legacy nearest reads source voxel
        # floor(i·s) instead of the trilinear grid's nearest, floor((i + ½)·s), shifting
        # the label up to one voxel from the image (e.g. zoom 1.13 on a 40-voxel axis).
        RandZoomd(keys, min_zoom=0.85, max_zoom=1.15, prob=0.2, mode=("trilinear", "nearest-exact"),
                  keep_size=True),
        RandFlipd(keys, prob=0.5, spatial_axis=0),
        RandFlipd(keys, prob=0.5, spatial_axis=1),
        RandFlipd(keys, prob=0.5, spatial_axis=2),
        RandScaleIntensityd(IMAGE, factors=0.1, prob=0.5),
        RandShiftIntensityd(IMAGE, offsets=0.1, prob=0.5),
        RandAdjustContrastd(IMAGE, gamma=(0.7, 1.5), prob=0.3),
        RandGaussianNoised(IMAGE, std=0.05, prob=0.15),
        *dropout,
    ])


class RandRotateZoomd(RandomizableTransform, MapTransform):
    """Rotation (probability `prob_rotate`, up to `max_angle` rad about each axis)
    and isotropic zoom (probability `prob_zoom`, factor in `zoom_range`), drawn
    independently as RandRotated and RandZoomd do, applied in ONE resampling
    (MONAI `Affine`: bilinear image, nearest label, zero padding, same size). Two
    resamplings cost twice and blur twice; nnU-Net also composes them."""

    def __init__(self, keys: KeysCollection, prob_rotate: float = 0.2, max_angle: float = 0.26,
                 prob_zoom: float = 0.2, zoom_range: tuple[float, float] = (0.85, 1.15),
                 mode: Sequence[str] = ("bilinear", "nearest")):
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, 1.0)
        self.prob_rotate, self.max_angle = prob_rotate, max_angle
        self.prob_zoom, self.zoom_range = prob_zoom, zoom_range
        self.mode = tuple(mode)
        self.angles: tuple[float, float, float] | None = None
        self.zoom: float | None = None

    def randomize(self, data=None) -> None:
        rotate = self.R.rand() < self.prob_rotate
        angles = self.R.uniform(-self.max_angle, self.max_angle, 3)
        zoom = self.R.rand() < self.prob_zoom
        factor = self.R.uniform(*self.zoom_range)
        self.angles = tuple(float(a) for a in angles) if rotate else None
        self.zoom = float(factor) if zoom else None

    def __call__(self, data):
        d = dict(data)
        self.randomize()
        if self.angles is None and self.zoom is None:
            return d
        # Affine scales the sampling grid: a grid scaled by 1/z shows the image z times larger.
        scale = [1.0 / self.zoom] * 3 if self.zoom else None
        for key, mode in zip(self.key_iterator(d), self.mode):
            img = torch.as_tensor(d[key])
            out, _ = Affine(rotate_params=self.angles, scale_params=scale, spatial_size=img.shape[1:],
                            mode=mode, padding_mode="zeros", image_only=False)(img.float())
            d[key] = out.as_tensor() if isinstance(out, MetaTensor) else out
        return d


def patch_augmentation(modality_dropout: float = 0.0) -> Compose:
    """The augmentation of `train_augmentation` for a patch already cut from a
    preprocessed case (`medseg.data.patches`): ``image`` `(4, *patch)` and ``label``
    the `(1, *patch)` label map (regions are made after, from the moved labels).
    Rotation and zoom in one resampling (`RandRotateZoomd`); the same flips,
    intensity scale/shift, gamma, noise and modality dropout."""
    keys = [IMAGE, LABEL]
    dropout = [RandModalityDropoutd(IMAGE, modality_dropout)] if modality_dropout > 0 else []
    return Compose([
        RandRotateZoomd(keys, prob_rotate=0.2, max_angle=0.26, prob_zoom=0.2, zoom_range=(0.85, 1.15)),
        RandFlipd(keys, prob=0.5, spatial_axis=0),
        RandFlipd(keys, prob=0.5, spatial_axis=1),
        RandFlipd(keys, prob=0.5, spatial_axis=2),
        RandScaleIntensityd(IMAGE, factors=0.1, prob=0.5),
        RandShiftIntensityd(IMAGE, offsets=0.1, prob=0.5),
        RandAdjustContrastd(IMAGE, gamma=(0.7, 1.5), prob=0.3),
        RandGaussianNoised(IMAGE, std=0.05, prob=0.15),
        *dropout,
    ], lazy=False)
