"""MONAI dictionary transforms, defined once for training, validation and prediction.

Keys: ``image`` (the datalist's file list or 4D file) and ``label``. After
`preprocessing` (`PreprocessCased`: `medseg.pipeline.preprocess`, the code both
prediction engines run): ``image`` is `(4, X, Y, Z)` float32 in CHANNELS order
(T1, T1ce, T2, FLAIR), RAS, at the target spacing, cropped to the brain's
non-zero box and z-scored per channel over brain voxels; ``label`` is
`(3, X, Y, Z)` float32 multi-hot TC/WT/ET.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import Compose, MapTransform, RandomizableTransform

from medseg.data.io import load_array
from medseg.labels import CHANNELS, labels_to_regions
from medseg.pipeline import PipelineSpec, preprocess, read_case

__all__ = ["IMAGE", "LABEL", "SOFT", "MISSING_FILL", "PreprocessCased",
           "RandModalityDropoutd", "LabelsToRegionsd", "RandRotateZoomd",
           "RandFlipAxesd", "RandScaleShiftd", "RandGammad", "RandNoised", "preprocessing", "patch_augmentation"]

IMAGE, LABEL = "image", "label"
#: A teacher's probabilities beside a training patch (distillation, `medseg.teacher`).
SOFT = "soft"

# LoadImaged registers every MONAI reader; with pydicom installed (DICOM input),
# MONAI's GPU DICOM decoder plugin then reports at each load that nvImageCodec is
# absent. medseg decodes DICOM itself (medseg.dicom): the notice is noise.
logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader")


class LabelsToRegionsd(MapTransform):
    """`(1, X, Y, Z)` label map in `convention` → `(R, X, Y, Z)` float multi-hot regions of
    `task`'s outputs (None: TC/WT/ET, the convention's legacy task)."""

    def __init__(self, keys: KeysCollection, convention: str, task: str | None = None):
        super().__init__(keys)
        self.convention, self.task = convention, task

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            lab = d[key]
            arr = lab.detach().cpu().numpy() if isinstance(lab, torch.Tensor) else np.asarray(lab)
            regions = labels_to_regions(np.rint(arr[0]), self.convention, self.task).astype(np.float32)
            out = torch.as_tensor(regions)
            d[key] = MetaTensor(out, meta=lab.meta) if isinstance(lab, MetaTensor) else out
        return d


#: Value of a missing (or dropped) modality after z-scoring: 0, the channel's mean
#: (the pipeline spec's default `missing_fill`).
MISSING_FILL = PipelineSpec.__dataclass_fields__["missing_fill"].default


class PreprocessCased(MapTransform):
    """Files → the model's space: `medseg.pipeline.preprocess` as a MONAI transform.

    ``image``: up to four 3D files (modalities in `channels` order; a missing one is
    filled as the spec says) or one 4D file → `(4, X, Y, Z)` float32 MetaTensor whose
    affine is the preprocessed grid's; ``label`` (when `with_label`): a label-map
    file → `(1, X, Y, Z)` float32 on the same grid (nearest neighbour)."""

    def __init__(self, channels: Sequence[str], spec: PipelineSpec, with_label: bool = True):
        super().__init__([IMAGE, LABEL] if with_label else [IMAGE])
        self.channels, self.spec, self.with_label = list(channels), spec, with_label

    def __call__(self, data):
        d = dict(data)
        files = d[IMAGE] if isinstance(d[IMAGE], (list, tuple)) else [d[IMAGE]]
        vol, ref = read_case(files, self.channels, self.spec.missing_fill)
        label = load_array(Path(d[LABEL]), dtype=np.float32) if self.with_label else None
        x, lab, grid = preprocess(vol, ref.affine, self.spec, label, source=str(files[0]))
        meta = {"affine": torch.as_tensor(grid.affine), "filename_or_obj": str(files[0])}
        d[IMAGE] = MetaTensor(torch.from_numpy(x), meta=dict(meta))
        if self.with_label:
            d[LABEL] = MetaTensor(torch.from_numpy(np.rint(lab)[None].astype(np.float32)), meta=dict(meta))
        return d


class RandModalityDropoutd(RandomizableTransform, MapTransform):
    """With probability `prob`, set a random subset of the image channels to
    MISSING_FILL: one of the 14 non-empty subsets whose complement is non-empty
    (at least one modality always stays), each equally likely. Applied after the
    intensity augmentations, so a dropped channel is exactly the fill value, as a
    missing modality is at prediction time (`medseg.pipeline.fill_channels`)."""

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


def preprocessing(channels: Sequence[str], convention: str, spec: PipelineSpec | Sequence[float],
                  with_label: bool = True) -> Compose:
    """Files → the model's space (`PreprocessCased`) → (with `with_label`) the spec's task's regions.

    `channels` names the image files' modalities in order (a subset of CHANNELS:
    the missing ones are filled); `spec` is the model's `PipelineSpec`, or just a
    spacing (the other preprocessing values at their defaults)."""
    if not isinstance(spec, PipelineSpec):
        spec = PipelineSpec(spacing=tuple(spec), roi=(1, 1, 1), label_convention=convention)
    steps = [PreprocessCased(channels, spec, with_label)]
    if with_label:
        steps.append(LabelsToRegionsd(LABEL, convention, spec.task))
    return Compose(steps)


_GRIDS: dict[tuple, torch.Tensor] = {}


def _identity_grid(shape: tuple[int, ...], device: torch.device | str = "cpu") -> torch.Tensor:
    """`affine_grid`'s identity grid of a volume shape on a device, made once per
    shape (a transformed grid is then one small matrix product, not a new grid)."""
    key = (tuple(shape), str(torch.device(device)))
    if key not in _GRIDS:
        eye = torch.eye(3, 4, device=device)[None]
        if len(_GRIDS) > 4:
            _GRIDS.clear()
        _GRIDS[key] = torch.nn.functional.affine_grid(eye, [1, 1, *shape], align_corners=False)[0]
    return _GRIDS[key]


class RandRotateZoomd(RandomizableTransform, MapTransform):
    """Rotation (probability `prob_rotate`, up to `max_angle` rad about each axis)
    and isotropic zoom (probability `prob_zoom`, factor in `zoom_range`), drawn
    independently as RandRotated and RandZoomd do, applied about the patch centre
    in ONE resampling: one sampling grid (torch `affine_grid`), bilinear for the
    image, nearest for the label (the same grid, so they stay aligned), zeros
    outside. Two resamplings cost twice and blur twice; nnU-Net also composes them."""

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

    def matrix(self, shape: Sequence[int]) -> torch.Tensor:
        """The `affine_grid` matrix (3×4, normalised coordinates, axes in grid order
        z, y, x) of the drawn rotation and zoom about the centre of a `shape` volume."""
        rot = np.eye(3)
        for axis, a in enumerate(self.angles or (0.0, 0.0, 0.0)):
            c, s_ = np.cos(a), np.sin(a)
            i, j = [k for k in range(3) if k != axis]
            r = np.eye(3)
            r[i, i], r[i, j], r[j, i], r[j, j] = c, -s_, s_, c
            rot = r @ rot
        # voxel-space map (output → input): x_in = R x_out / zoom, about the centre;
        # in normalised coordinates S⁻¹ (R / zoom) S with S = half the size per axis.
        half = np.array(shape[::-1], dtype=np.float64) / 2.0
        theta = np.diag(1.0 / half) @ (rot / (self.zoom or 1.0)) @ np.diag(half)
        return torch.as_tensor(np.concatenate([theta, np.zeros((3, 1))], axis=1), dtype=torch.float32)

    def __call__(self, data):
        d = dict(data)
        self.randomize()
        if self.angles is None and self.zoom is None:
            return d
        first = torch.as_tensor(d[self.keys[0]])
        theta = self.matrix(first.shape[1:]).to(first.device)
        grid = torch.addmm(theta[:, 3], _identity_grid(tuple(first.shape[1:]), first.device).view(-1, 3),
                           theta[:, :3].T).view(1, *first.shape[1:], 3)
        for key, mode in zip(self.key_iterator(d), self.mode):
            src = torch.as_tensor(d[key])
            out = torch.nn.functional.grid_sample(src.float()[None], grid, mode=mode, padding_mode="zeros",
                                                  align_corners=False)[0]
            if not src.is_floating_point():      # a label map stays in its integer type
                out = out.round_().to(src.dtype)
            d[key] = MetaTensor(out, meta=d[key].meta) if isinstance(d[key], MetaTensor) else out
        return d


class RandFlipAxesd(RandomizableTransform, MapTransform):
    """Flip each spatial axis with probability `prob` (independently, as three
    RandFlipd), in one copy instead of up to three."""

    def __init__(self, keys: KeysCollection, prob: float = 0.5):
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, 1.0)
        self.prob = prob
        self.axes: tuple[int, ...] = ()

    def randomize(self, data=None) -> None:
        self.axes = tuple(1 + a for a in range(3) if self.R.rand() < self.prob)

    def __call__(self, data):
        d = dict(data)
        self.randomize()
        if self.axes:
            for key in self.key_iterator(d):
                d[key] = torch.flip(torch.as_tensor(d[key]), self.axes)
        return d


class RandScaleShiftd(RandomizableTransform, MapTransform):
    """MONAI RandScaleIntensityd (x·(1 + f), f in ±`factors`, probability `prob_scale`)
    then RandShiftIntensityd (+ o, o in ±`offsets`, probability `prob_shift`), drawn
    independently, applied in one pass."""

    def __init__(self, keys: KeysCollection, factors: float = 0.1, prob_scale: float = 0.5,
                 offsets: float = 0.1, prob_shift: float = 0.5):
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, 1.0)
        self.factors, self.prob_scale, self.offsets, self.prob_shift = factors, prob_scale, offsets, prob_shift
        self.scale, self.shift = 1.0, 0.0

    def randomize(self, data=None) -> None:
        scale = self.R.rand() < self.prob_scale
        f = self.R.uniform(-self.factors, self.factors)
        shift = self.R.rand() < self.prob_shift
        o = self.R.uniform(-self.offsets, self.offsets)
        self.scale = 1.0 + float(f) if scale else 1.0
        self.shift = float(o) if shift else 0.0

    def __call__(self, data):
        d = dict(data)
        self.randomize()
        if self.scale == 1.0 and self.shift == 0.0:
            return d
        for key in self.key_iterator(d):
            d[key] = torch.as_tensor(d[key]).float().mul(self.scale).add_(self.shift)
        return d


class RandGammad(RandomizableTransform, MapTransform):
    """MONAI RandAdjustContrastd's gamma (the image rescaled to [0, 1] over all its
    channels, raised to gamma, scaled back), in float32 in place of its copies."""

    def __init__(self, keys: KeysCollection, gamma: tuple[float, float] = (0.7, 1.5), prob: float = 0.3):
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob)
        self.gamma_range = gamma
        self.gamma = 1.0

    def randomize(self, data=None) -> None:
        super().randomize(None)
        self.gamma = float(self.R.uniform(*self.gamma_range))

    def __call__(self, data):
        d = dict(data)
        self.randomize()
        if not self._do_transform:
            return d
        for key in self.key_iterator(d):
            img = torch.as_tensor(d[key]).float().clone()
            lo, hi = img.min(), img.max()
            rng = hi - lo
            img.sub_(lo).div_(rng + 1e-7).pow_(self.gamma).mul_(rng).add_(lo)
            d[key] = img
        return d


class RandNoised(RandomizableTransform, MapTransform):
    """MONAI RandGaussianNoised (std drawn from [0, `std`], zero mean), the noise made
    by torch in float32 (numpy's float64 normal costs several times more)."""

    def __init__(self, keys: KeysCollection, std: float = 0.05, prob: float = 0.15):
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob)
        self.std = std
        self.sigma, self.seed = 0.0, 0

    def randomize(self, data=None) -> None:
        super().randomize(None)
        self.sigma = float(self.R.uniform(0, self.std))
        self.seed = int(self.R.randint(2**31))

    def __call__(self, data):
        d = dict(data)
        self.randomize()
        if not self._do_transform:
            return d
        for key in self.key_iterator(d):
            img = torch.as_tensor(d[key]).float()
            # made on the image's device (the same numbers on CPU whichever process makes them)
            g = torch.Generator(device=img.device).manual_seed(self.seed)
            d[key] = img + self.sigma * torch.randn(img.shape, generator=g, dtype=torch.float32,
                                                    device=img.device)
        return d


def patch_augmentation(modality_dropout: float = 0.0, soft: bool = False) -> Compose:
    """Training augmentation of a patch cut from a preprocessed case
    (`medseg.data.patches`): ``image`` `(4, *patch)` and ``label`` the `(1, *patch)`
    label map (regions are made after, from the moved labels). The probabilities and
    ranges of MONAI's RandRotated (0.2, ±0.26 rad), RandZoomd (0.2, 0.85–1.15),
    RandFlipd per axis (0.5), RandScaleIntensityd/RandShiftIntensityd (0.5, ±0.1),
    RandAdjustContrastd (0.3, gamma 0.7–1.5) and RandGaussianNoised (0.15, std
    0.05), made cheaper per 128³ sample: rotation and zoom in one resampling
    (`RandRotateZoomd`), the three flips in one copy (`RandFlipAxesd`), intensity
    scale and shift in one pass (`RandScaleShiftd`), gamma and noise in float32
    (`RandGammad`, `RandNoised`); then modality dropout. With `soft`, a third key
    ``soft`` (a teacher's `(3, *patch)` probabilities, distillation) moves with the
    image and label (bilinear, the same draws: the random stream does not depend
    on the keys) and takes no intensity change."""
    keys = [IMAGE, LABEL] + ([SOFT] if soft else [])
    modes = ("bilinear", "nearest") + (("bilinear",) if soft else ())
    dropout = [RandModalityDropoutd(IMAGE, modality_dropout)] if modality_dropout > 0 else []
    return Compose([
        RandRotateZoomd(keys, prob_rotate=0.2, max_angle=0.26, prob_zoom=0.2, zoom_range=(0.85, 1.15),
                        mode=modes),
        RandFlipAxesd(keys, prob=0.5),
        RandScaleShiftd(IMAGE, factors=0.1, prob_scale=0.5, offsets=0.1, prob_shift=0.5),
        RandGammad(IMAGE, gamma=(0.7, 1.5), prob=0.3),
        RandNoised(IMAGE, std=0.05, prob=0.15),
        *dropout,
    ], lazy=False)
