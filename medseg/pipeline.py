"""The pipeline spec and the one implementation of every preprocessing and
inference step (torch-free: numpy and nibabel only).

**The spec** (`PipelineSpec`, nnU-Net's plans file for medseg) is a small,
declarative record of every choice between a case on disk and its mask:
channel order, orientation, spacing and grid placement, crop, normalisation,
missing-channel fill, window size, overlap, blending, threshold,
post-processing, label convention. Training writes it into the checkpoint
(``meta["pipeline"]``), export copies it unchanged into the ONNX metadata, the
preprocessed dataset is keyed by the hash of its preprocessing part, and both
engines (`medseg.infer.Predictor`, `medseg.edge.EdgePredictor`) read every
parameter from it.

**The steps** are implemented here once and run by the PyTorch engine, the ONNX
edge runtime, the preprocessed dataset build, export's calibration and the
MONAI transforms (`medseg.transforms.PreprocessCased` wraps `preprocess`), so
the two engines agree by construction on any affine, not by tolerance:

    read → CHANNELS order (missing: `missing_fill`) → nearest RAS axis order
    (voxel permutation and flips, exact) → linear resampling along those axes to
    `spacing` (the first voxel centre kept, the input's direction kept) →
    background noise below `negligible` × peak cleared → crop to the non-zero
    box → z-score per channel over non-zero voxels

and back (`restore`): un-crop → linear resampling to the RAS grid → the input's
axis order. Inference: Gaussian-weighted sliding windows over each model's
logits (`sliding_window`), sigmoid, mean over models and mirror flips.

Why resample along the voxel axes (as nnU-Net does) rather than on a world
grid: an oblique scan keeps its voxels' pose, so no rotation blurs the data,
and the grid is exactly recoverable for the inverse.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import nibabel as nib
import numpy as np

from medseg.data.io import load_array, load_header, same_grid
from medseg.errors import DataError, MedsegError
from medseg.labels import CHANNELS, get_task, legacy_task, task_problem

__all__ = ["PREPROCESSING_VERSION", "PipelineSpec", "Grid", "read_case", "fill_channels", "to_ras",
           "voxel_spacing", "resampled_shape", "resample_linear", "resample_nearest", "clear_negligible",
           "foreground_box", "zscore", "preprocess", "restore", "window_starts", "window_corners",
           "gaussian_importance", "sliding_window", "mirror_flips"]

#: Version of the preprocessing implementation. 2: this module (voxel-axis
#: resampling with the full affine, float64 statistics); 1 was MONAI
#: Orientationd + Spacingd + NormalizeIntensityd, which placed an oblique grid
#: differently from the edge runtime.
PREPROCESSING_VERSION = 2

#: Fields of the spec that decide the preprocessed data (the store key hashes them).
_PREPROCESSING_FIELDS = ("channels", "orientation", "spacing", "grid", "image_interpolation",
                         "label_interpolation", "negligible", "crop", "normalization", "missing_fill",
                         "version")


@dataclass(frozen=True)
class PipelineSpec:
    """Every preprocessing and inference choice of a model (values, JSON-ready)."""

    spacing: tuple[float, float, float]
    roi: tuple[int, int, int]
    label_convention: str
    channels: tuple[str, ...] = tuple(CHANNELS)
    #: The model's sigmoid outputs, in order: the task's (`medseg.labels.Task.outputs`).
    regions: tuple[str, ...] = ()
    #: The BraTS task (`medseg.labels.TASKS`); "" (models written before tasks):
    #: `medseg.labels.legacy_task` of the label convention, gli2021 or gli2023.
    task: str = ""
    orientation: str = "RAS"
    #: Output grid: round((n - 1)·a/b + 1) voxels along each (RAS-ordered) input axis,
    #: sharing the first voxel centre (MONAI Spacing's size rule; e.g. 155 slices of
    #: 1 mm → 63 at 2.5 mm).
    grid: str = "voxel-axes, first voxel centre kept"
    image_interpolation: str = "linear"
    label_interpolation: str = "nearest"
    #: Resampled voxels below this fraction of the channel's peak magnitude are 0:
    #: interpolation leaves ~1e-5 float noise in the background, which would move the
    #: crop box and enter the z-score as brain voxels.
    negligible: float = 1e-4
    crop: str = "non-zero box over all channels"
    normalization: str = "z-score per channel over non-zero voxels (float64 statistics; std 0 → 1)"
    #: A missing (or dropped) modality's value after z-scoring: 0, the channel mean.
    missing_fill: float = 0.0
    overlap: float = 0.5
    sw_batch_size: int = 1
    blend: str = "gaussian"
    sigma_scale: float = 0.125
    #: MONAI's floor of the Gaussian weights (`compute_importance_map`).
    weight_floor: float = 1e-3
    threshold: float = 0.5
    min_component_ml: float = 0.0
    et_min_ml: float = 0.0
    version: int = PREPROCESSING_VERSION

    def __post_init__(self):
        object.__setattr__(self, "spacing", tuple(float(s) for s in self.spacing))
        object.__setattr__(self, "roi", tuple(int(r) for r in self.roi))
        object.__setattr__(self, "channels", tuple(self.channels))
        task = get_task(self.task) if self.task else legacy_task(self.label_convention)
        object.__setattr__(self, "task", task.name)
        object.__setattr__(self, "regions", tuple(self.regions) or task.outputs)
        if self.regions != task.outputs:
            raise MedsegError(f"pipeline regions {list(self.regions)}: task {task.name} outputs "
                              f"{list(task.outputs)}; the file was edited by hand or damaged")
        problem = task_problem(task, self.label_convention)
        if problem:
            raise MedsegError(f"pipeline: {problem}")
        if len(self.spacing) != 3 or min(self.spacing) <= 0:
            raise MedsegError(f"pipeline spacing {list(self.spacing)}: expected 3 positive values in mm")
        if len(self.roi) != 3 or min(self.roi) < 1:
            raise MedsegError(f"pipeline roi {list(self.roi)}: expected 3 positive voxel counts")
        if not 0 <= self.overlap < 1:
            raise MedsegError(f"pipeline overlap {self.overlap}: expected a fraction in [0, 1)")
        if sorted(self.channels) != sorted(CHANNELS):
            raise MedsegError(f"pipeline channels {list(self.channels)}: expected an order of {list(CHANNELS)}")
        if self.blend != "gaussian":
            raise MedsegError(f"pipeline blend {self.blend!r}: only 'gaussian' is implemented")
        if self.version != PREPROCESSING_VERSION:
            raise MedsegError(f"pipeline version {self.version}: this medseg implements version "
                              f"{PREPROCESSING_VERSION}; use the medseg that wrote the model")

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict, source: str = "pipeline spec") -> "PipelineSpec":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise MedsegError(f"{source}: unknown pipeline keys {unknown}; known: {sorted(known)} "
                              "(written by a newer medseg?)")
        return cls(**d)

    @classmethod
    def from_meta(cls, meta: dict, source: str = "model") -> "PipelineSpec":
        """The spec of a checkpoint's or ONNX file's metadata; models written before
        the spec existed (no ``pipeline`` key) get it from their separate fields."""
        if "pipeline" in meta:
            spec = cls.from_dict(meta["pipeline"], source)
            if meta.get("label_convention", spec.label_convention) != spec.label_convention:
                raise MedsegError(f"{source}: label convention {meta['label_convention']!r} in its metadata, "
                                  f"{spec.label_convention!r} in its pipeline spec; the file was edited by hand "
                                  "or damaged: re-export it, or use the checkpoint medseg wrote")
            return spec
        inf = meta.get("infer", meta)
        post = meta.get("postprocessing") or {}
        return cls(spacing=meta["spacing"], roi=meta["roi"], label_convention=meta["label_convention"],
                   overlap=float(inf.get("overlap", 0.5)), sw_batch_size=int(inf.get("sw_batch_size", 1)),
                   threshold=float(inf.get("threshold", 0.5)),
                   min_component_ml=float(post.get("min_component_ml", 0.0)),
                   et_min_ml=float(post.get("et_min_ml", 0.0)))

    def replace(self, **changes) -> "PipelineSpec":
        """A copy with `changes` (None values ignored: "not overridden")."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def preprocessing(self) -> dict:
        """The part of the spec that decides the preprocessed data (the store key)."""
        d = self.to_dict()
        return {k: d[k] for k in _PREPROCESSING_FIELDS}


# ----------------------------------------------------------------------------- reading
def read_case(images: Sequence[str | Path], channels: Sequence[str],
              missing_fill: float = 0.0) -> tuple[np.ndarray, nib.Nifti1Image]:
    """Up to four 3D files (modalities in `channels` order) or one 4D file (channels
    last) → (`(4, X, Y, Z)` float32 in CHANNELS order, a missing modality all
    `missing_fill`; the first file's header image)."""
    images = [Path(p) for p in images]
    heads = [load_header(p) for p in images]
    if len(heads[0].shape) == 4:
        vol = np.moveaxis(load_array(images[0], heads[0]), -1, 0)
    else:
        for p, h in zip(images[1:], heads[1:]):
            if not same_grid(h.shape, h.affine, heads[0].shape, heads[0].affine):
                raise DataError(f"{p}: grid {h.shape[:3]} does not match {images[0].name} {heads[0].shape[:3]} "
                                "(shape or affine differ); all modalities of a case must be co-registered on "
                                "one grid: resample this file onto it")
        vol = np.stack([load_array(p, h) for p, h in zip(images, heads)])
    if vol.shape[0] != len(channels):
        raise DataError(f"{images[0]}: {vol.shape[0]} channel(s) for the modalities {list(channels)}; "
                        "expected one image per named modality")
    return fill_channels(vol, channels, missing_fill), heads[0]


def fill_channels(vol: np.ndarray, channels: Sequence[str], missing_fill: float = 0.0) -> np.ndarray:
    """`(k, …)` images of the `channels` modalities (in that order) → `(4, …)` in
    CHANNELS order, the missing channels all `missing_fill`."""
    unknown = [c for c in channels if c not in CHANNELS]
    if unknown or not channels or len(set(channels)) != len(channels):
        raise MedsegError(f"modalities {list(channels)}: expected distinct names from {list(CHANNELS)}")
    out = np.full((len(CHANNELS), *vol.shape[1:]), missing_fill, np.float32)
    for i, c in enumerate(channels):
        out[CHANNELS.index(c)] = vol[i]
    return out


# ----------------------------------------------------------------------------- geometry
_RAS = nib.orientations.axcodes2ornt(("R", "A", "S"))


def voxel_spacing(affine: np.ndarray) -> np.ndarray:
    """Voxel size along each array axis in mm: the affine's column norms (the truth
    of the grid, also for an oblique affine whose header zooms may disagree)."""
    return np.sqrt((np.asarray(affine, np.float64)[:3, :3] ** 2).sum(0))


def to_ras(vol: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`(C, X, Y, Z)` → (the voxels in the nearest RAS axis order, its affine, the
    orientation transform applied): a permutation and flips, no interpolation."""
    ornt = nib.orientations.ornt_transform(nib.io_orientation(affine), _RAS)
    ras = np.stack([nib.orientations.apply_orientation(v, ornt) for v in vol])
    aff = np.asarray(affine, np.float64) @ nib.orientations.inv_ornt_aff(ornt, vol.shape[1:])
    return ras, aff, ornt


def resampled_shape(shape: Sequence[int], spacing_in: Sequence[float],
                    spacing_out: Sequence[float]) -> list[int]:
    """Grid size after resampling: the first and last voxel centres span (n - 1)·a mm,
    so round((n - 1)·a/b + 1) voxels. E.g. 155 slices at 1 mm → 2.5 mm: 63 (not
    round(155/2.5) = 62); 28 slices of 5.54 mm → 1 mm: 151 (not 155)."""
    return [max(1, int(np.round((n - 1) * a / b + 1.0))) for n, a, b in zip(shape, spacing_in, spacing_out)]


def _positions(n_in: int, n_out: int, factor: float) -> np.ndarray:
    """Input positions of the output voxels: i · factor, clamped to the input."""
    return np.clip(np.arange(n_out, dtype=np.float64) * factor, 0, n_in - 1)


def resample_linear(arr: np.ndarray, factors: Sequence[float], out_shape: Sequence[int]) -> np.ndarray:
    """Separable linear resampling of the last 3 axes: output voxel i samples input
    position i · factor (voxel centres aligned at index 0, edges clamped). An axis
    with factor 1 and the same size is left as it is (exactly what the formula gives)."""
    out = arr.astype(np.float32, copy=False)
    for ax, (f, n_out) in enumerate(zip(factors, out_shape)):
        axis = out.ndim - 3 + ax
        n_in = out.shape[axis]
        if f == 1.0 and n_out == n_in:
            continue
        pos = _positions(n_in, n_out, f)
        lo = np.floor(pos).astype(np.int64)
        hi = np.minimum(lo + 1, n_in - 1)
        shape = [1] * out.ndim
        shape[axis] = n_out
        w = (pos - lo).astype(np.float32).reshape(shape)
        out = np.take(out, lo, axis=axis) * (1 - w) + np.take(out, hi, axis=axis) * w
    return out


def resample_nearest(arr: np.ndarray, factors: Sequence[float], out_shape: Sequence[int]) -> np.ndarray:
    """Nearest-neighbour resampling of the last 3 axes on `resample_linear`'s grid
    (label maps: values are never mixed)."""
    out = arr
    for ax, (f, n_out) in enumerate(zip(factors, out_shape)):
        axis = out.ndim - 3 + ax
        n_in = out.shape[axis]
        if f == 1.0 and n_out == n_in:
            continue
        idx = np.minimum(np.floor(_positions(n_in, n_out, f) + 0.5).astype(np.int64), n_in - 1)
        out = np.take(out, idx, axis=axis)
    return out


def clear_negligible(x: np.ndarray, fraction: float) -> np.ndarray:
    """`(C, …)` with every voxel below `fraction` × its channel's peak magnitude set to 0."""
    peak = np.abs(x).reshape(x.shape[0], -1).max(1).reshape(-1, *[1] * (x.ndim - 1))
    return x * (np.abs(x) >= fraction * peak)


def foreground_box(x: np.ndarray) -> tuple[slice, slice, slice] | None:
    """The box of voxels > 0 in any channel of `(C, X, Y, Z)`, or None when there is none."""
    fg = (x > 0).any(0)
    if not fg.any():
        return None
    box = []
    for ax in range(3):
        hit = np.flatnonzero(fg.any(tuple(a for a in range(3) if a != ax)))
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)


def zscore(x: np.ndarray) -> np.ndarray:
    """`(C, …)` → each channel's non-zero voxels z-scored (mean and population std in
    float64; std 0 → 1), zeros kept: a missing channel (all `missing_fill` = 0) stays 0."""
    out = x.astype(np.float32, copy=True)
    for c in range(out.shape[0]):
        m = out[c] != 0
        if m.any():
            v = out[c][m].astype(np.float64)
            mu, sd = v.mean(), v.std()
            out[c][m] = ((v - mu) / (sd if sd > 0 else 1.0)).astype(np.float32)
    return out


@dataclass
class Grid:
    """How a case was brought into the model's space (what `restore` undoes)."""

    input_shape: tuple[int, int, int]
    input_affine: np.ndarray
    ornt: np.ndarray                    # input axes → RAS (nibabel orientation transform)
    ras_shape: tuple[int, int, int]
    spacing_in: np.ndarray              # of the RAS-ordered axes, mm
    spacing_out: np.ndarray
    resampled_shape: tuple[int, int, int]
    box: tuple[slice, slice, slice]
    affine: np.ndarray = field(repr=False)   # of the preprocessed (cropped) array

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(s.stop - s.start for s in self.box)


def preprocess(vol: np.ndarray, affine: np.ndarray, spec: PipelineSpec, label: np.ndarray | None = None,
               source: str = "case") -> tuple[np.ndarray, np.ndarray | None, Grid]:
    """`(4, X, Y, Z)` images in CHANNELS order on `affine` (and an `(X, Y, Z)` label map)
    → (`(4, x, y, z)` float32 model input, the label map on the same grid or None,
    the `Grid` that `restore` inverts). See the module docstring for the steps."""
    if spec.orientation != "RAS":
        raise MedsegError(f"pipeline orientation {spec.orientation!r}: only 'RAS' is implemented")
    ras, ras_aff, ornt = to_ras(vol.astype(np.float32, copy=False), affine)
    sp_in = voxel_spacing(ras_aff)
    sp_out = np.asarray(spec.spacing, np.float64)
    factors = sp_out / sp_in
    shape = resampled_shape(ras.shape[1:], sp_in, sp_out)
    res = clear_negligible(resample_linear(ras, factors, shape), spec.negligible)
    box = foreground_box(res)
    if box is None:
        raise DataError(f"{source}: every voxel is zero after resampling; expected a skull-stripped brain "
                        "with positive intensities")
    lo = np.array([b.start for b in box], np.float64)
    out_aff = ras_aff @ np.diag([*factors, 1.0])
    out_aff = out_aff @ np.vstack([np.column_stack([np.eye(3), lo]), [0, 0, 0, 1]])
    x = zscore(res[(slice(None), *box)])
    lab = None
    if label is not None:
        lab_ras = nib.orientations.apply_orientation(np.asarray(label), ornt)
        lab = np.ascontiguousarray(resample_nearest(lab_ras, factors, shape)[box])
    grid = Grid(tuple(vol.shape[1:]), np.asarray(affine, np.float64), ornt, tuple(ras.shape[1:]), sp_in, sp_out,
                tuple(shape), box, out_aff)
    return x, lab, grid


def restore(maps: np.ndarray, grid: Grid) -> np.ndarray:
    """`(C, …)` maps on the preprocessed grid → `(C, X, Y, Z)` float32 on the input
    grid: un-crop (0 outside the box), linear resampling back, input axis order."""
    full = np.zeros((maps.shape[0], *grid.resampled_shape), np.float32)
    full[(slice(None), *grid.box)] = maps
    back = resample_linear(full, grid.spacing_in / grid.spacing_out, grid.ras_shape)
    inv = nib.orientations.ornt_transform(_RAS, nib.io_orientation(grid.input_affine))
    return np.stack([nib.orientations.apply_orientation(b, inv) for b in back]).astype(np.float32)


# ----------------------------------------------------------------------------- windows
def window_starts(size: int, roi: int, overlap: float) -> list[int]:
    """Window start indices along one axis: stride int(roi × (1 - overlap)) (at least
    1), the last window flush with the end; one window when the axis fits in it."""
    if size <= roi:
        return [0]
    step = max(1, int(roi * (1 - overlap)))
    starts = list(range(0, size - roi + 1, step))
    if starts[-1] != size - roi:
        starts.append(size - roi)
    return starts


def window_corners(shape: Sequence[int], roi: Sequence[int], overlap: float) -> list[tuple[int, int, int]]:
    """Every window's first voxel over a (padded) volume of `shape`."""
    return list(itertools.product(*(window_starts(s, r, overlap) for s, r in zip(shape, roi))))


def gaussian_importance(roi: Sequence[int], sigma_scale: float = 0.125, floor: float = 1e-3) -> np.ndarray:
    """Window weights `(*roi)` float32: a product of exp(-x² / 2σ²) over x centred at
    (n - 1) / 2, σ = `sigma_scale` × size per axis, not renormalised, floored at
    max(its minimum, `floor`) (as MONAI's `compute_importance_map` makes them)."""
    g = np.ones((), np.float32)
    for n in roi:
        x = np.arange(n, dtype=np.float32) - (n - 1) / 2.0
        k = np.exp(x**2 / (-2 * (sigma_scale * n) ** 2)).astype(np.float32)
        g = g[..., None] * k
    return np.maximum(g, max(float(g.min()), floor)).astype(np.float32)


def sliding_window(x, run: Callable[[list], object], roi: Sequence[int], overlap: float, batch_size: int,
                   weights, zeros: Callable[[tuple], object]):
    """Gaussian-blended sliding-window inference, for numpy arrays and torch tensors
    alike (only slicing and arithmetic are used, so both engines run this code).

    `x` `(C, X, Y, Z)`; `run(windows)` maps a list of `(C, *roi)` windows to their
    `(B, K, R, *roi)` logits (K models, R regions); `weights` `(*roi)` of x's kind;
    `zeros(shape)` makes a zero array of x's kind and device. A volume smaller than
    `roi` is zero-padded symmetrically first. → `(K, R, X, Y, Z)` blended logits:
    Σ w·logits / Σ w over the windows covering each voxel."""
    size = tuple(int(s) for s in x.shape[1:])
    pads = [((max(r - s, 0)) // 2, max(r - s, 0) - (max(r - s, 0)) // 2) for s, r in zip(size, roi)]
    padded = tuple(s + a + b for s, (a, b) in zip(size, pads))
    inner = tuple(slice(a, a + s) for (a, _), s in zip(pads, size))
    xp = x
    if padded != size:
        xp = zeros((x.shape[0], *padded))
        xp[(slice(None), *inner)] = x
    corners = window_corners(padded, roi, overlap)
    acc, norm = None, zeros(padded)
    step = max(1, int(batch_size))
    for i in range(0, len(corners), step):
        boxes = [tuple(slice(c, c + r) for c, r in zip(corner, roi)) for corner in corners[i:i + step]]
        out = run([xp[(slice(None), *b)] for b in boxes])
        if acc is None:
            acc = zeros((out.shape[1], out.shape[2], *padded))
        for b, o in zip(boxes, out):
            acc[(slice(None), slice(None), *b)] += o * weights
            norm[b] += weights
    acc /= norm
    return acc[(slice(None), slice(None), *inner)]


def mirror_flips(mirror: bool) -> list[tuple[int, ...]]:
    """Spatial axes (of a `(C, X, Y, Z)` array) flipped by each mirror-TTA member: every
    subset of (1, 2, 3), 8 in all, the identity first; `[()]` without TTA."""
    if not mirror:
        return [()]
    return [c for n in range(4) for c in itertools.combinations((1, 2, 3), n)]
