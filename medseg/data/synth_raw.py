"""Synthetic RAW scanner MRI studies with known truth, for tests and benchmarks.

`synthesize_raw` writes what a radiologist's study looks like when it comes
straight from the scanner or PACS, for the phantom of `medseg.data.synth`:

* the whole head, not a skull-stripped brain: around the phantom's brain a thin
  outer CSF/meninges layer, the skull (inner and outer cortical tables, dark on
  every sequence, with fatty diploë between them, bright on T1), temporalis
  muscle, subcutaneous fat (bright on T1 and T2) and skin, the eyes in their
  orbital fat, and a neck stump (cord, vertebra, airway, muscle); layer
  thicknesses vary smoothly over the head (`_HEAD_CONTRAST` for their contrast;
  the brain and tumour keep `synth._CONTRAST`);
* separate series on their own grids, as real protocols acquire them: a 3D T1ce
  (~1 mm, sagittal or axial), a T1 that is either a 2D axial spin echo (~0.9 ×
  0.9 × 5-6 mm) or a 3D pre-contrast sequence identical to the T1ce's, a 2D axial
  T2 (~0.45-0.5 mm in-plane, 4-5 mm slices), a FLAIR that is 2D axial or 3D
  sagittal, in some studies one or two of them oblique (slice plane tilted
  10-20°); thick slices average the head over their thickness;
* a patient who moves between series: each series has its own rigid pose
  `world_from_canonical` (rotations up to ±6° about each axis, translations up
  to ±8 mm, on top of one head placement per study of up to 8/15/20 mm);
* per series a smooth multiplicative bias field fixed in the scanner (×0.7-1.3
  over the head), Rician noise (so the air is not zero), an arbitrary scanner
  scale, int16 storage (Philips: RescaleSlope);
* distractors: a 3-plane localizer (one series of three orientations, or three
  short series), DWI (b0 and b1000 trace images in one series, or b1000 only) and
  its ADC map, in some studies a T1ce − T1 subtraction, a T2*-weighted GRE, an MPR
  reformat of the T1ce in another plane;
* DICOM tags as Siemens, GE and Philips write them (series descriptions, protocol
  names, ScanningSequence, SequenceVariant, EchoTime, InversionTime, ImageType,
  ContrastBolusAgent in some studies only, series numbers and times in
  acquisition order), one StudyInstanceUID, FrameOfReferenceUID and PatientID per
  study, in one of three folder layouts.

On disk (``out`` must be empty or absent)::

    out/studies/<study_id>/...         what a user gets from PACS (DICOM only), layout:
        "series": one folder per series, ``5_t2_tse_tra/IM0001.dcm`` or
                  ``SE000005/IM-0005-0001.dcm``
        "flat":   every file of the study in one folder, opaque unique names
        "nested": ``DICOM/PA000000/ST000000/SE000003/IM000012`` (no extensions)
    out/studies_nifti/<study_id>/...   with "nifti" in `formats`: the same study as
        dcm2niix (``-f %s_%d``) writes it: ``<SeriesNumber>_<SeriesDescription>.nii.gz``
        and a ``.json`` sidecar per series (times in seconds, ImageType a list);
        ``.bval``/``.bvec`` beside the DWI; a localizer of several orientations
        gives one file per image (``_i00001`` ...), as dcm2niix does
    out/truth/<study_id>/truth.json    roles, poses, grids, vendor, layout, distractors
    out/truth/<study_id>/labels_<role>.nii.gz   BraTS 2023 labels on the role's native grid
    out/truth/<study_id>/brain_<role>.nii.gz    the true (BraTS) brain mask, same grid
    out/truth/<study_id>/atlas/<study_id>/<study_id>-{t1n,t1c,t2w,t2f,seg}.nii.gz
        the atlas-space version: the phantom as `synth.synthesize` renders it

truth.json holds the study (``study_id``, ``seed``, ``index``, ``scale``,
``vendor``, ``manufacturer``, ``model``, ``field_strength``, ``layout``,
``patient_id``, ``study_uid``, ``frame_of_reference_uid``,
``contrast_agent_tag``), the phantom (``seed``, ``patient``, ``shape``,
``grade``, ``brain_volume_ml``, ``tumour_volume_ml``, ``tumour_centroid_mm`` in
the canonical frame), ``roles`` (t1, t1ce, t2, flair) and ``distractors`` (the
same record plus ``kind``: localizer, dwi, adc, subtraction, mpr, t2star). A
series record: ``series_uid``, ``series_number``, ``series_description``,
``protocol_name``, ``affine`` (voxel → world, RAS, 4 × 4, as
`medseg.data.dicom.read_series` reads it), ``shape``, ``world_from_canonical``
(4 × 4), ``plane``, ``acquisition`` (2D/3D), ``spacing``, ``slice_thickness``,
``oblique_deg``, ``post_contrast``, ``files`` (relative to the study folder),
``nifti`` (relative to the NIfTI study folder), ``stacks`` for a localizer of
several orientations, and for a role ``labels`` and ``brain`` (file names in
the truth folder). `load_truth` adds absolute paths and numpy matrices.

The truth masks are the phantom's classes sampled by nearest neighbour at each
voxel centre of the role's grid, through that series' pose. Everything is
determined by (seed, study index) except the SOPInstanceUIDs, which
`medseg.data.dicom.write_series` draws at random. Study ``i`` of seed ``s``
renders the phantom ``render_case(s, PATIENT_OFFSET + i)``, so the studies never
repeat the cases of `synth.synthesize` with the same seed. Vendors and layouts
cycle through a random order per seed (any three consecutive studies show all
three of each); everything else is drawn per study.

Scales: "full" renders the phantom at 1 mm (its BraTS grid, 240 × 240 × 155,
padded to 260 × 280 × 230 mm for the head) and clinical grids; "small" renders
it on `synth.DEMO_SHAPE` (~2.5 mm) with every spacing 2.5 × coarser and every
head layer at least about a voxel thick, for unit tests. The canonical render is
also the atlas-space case. A full study costs about 1.5-2 × `render_case` at
1 mm beyond that render itself; a small one about a second or two.

The canonical frame is the phantom's (RAS mm, origin at the centre of the BraTS
field of view), the frame of the atlas-space case; ``world`` is the scanner's
patient frame (RAS mm; DICOM's LPS with x and y negated).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from medseg.data import synth
from medseg.data.discover import LAYOUTS
from medseg.data.io import atomic_path, write_json, write_nifti
from medseg.errors import MedsegError

__all__ = ["ROLES", "VENDORS", "STUDY_LAYOUTS", "SCALES", "PATIENT_OFFSET", "synthesize_raw",
           "load_truth", "canonical_points_on_brain_surface", "brain_surface_points",
           "transform_points", "surface_error_mm"]

#: The four series a study must provide, in medseg's channel names.
ROLES = ("t1", "t1ce", "t2", "flair")
VENDORS = ("siemens", "ge", "philips")
#: Folder layouts of `out/studies/<study_id>` (see the module docstring).
STUDY_LAYOUTS = ("series", "flat", "nested")
#: Spacing factor per scale: "small" has every spacing 2.5 × coarser (unit tests).
SCALES = {"full": 1.0, "small": 2.5}
#: Study i renders phantom patient PATIENT_OFFSET + i.
PATIENT_OFFSET = 10_000

# Tissue classes added around the brain (the brain's are synth's 0-8).
MEN, BONE, MARROW, FAT, MUSCLE, SKIN, EYE, CORD = range(9, 17)
_N_CLASSES = 17

# Contrast columns of the canonical tissue images.
_COLS = ("t1", "t1ce", "t2", "flair", "t2star", "b0", "adc")
# T2*, b0 (EPI T2, fat suppressed) and ADC (10⁻³ mm²/s) of the brain classes 0-8.
_BRAIN_EXTRA = np.array([
    # t2*  b0    ADC
    [0.00, 0.00, 0.00],  # background
    [1.30, 1.40, 3.00],  # CSF
    [0.80, 0.80, 0.85],  # grey matter
    [0.62, 0.55, 0.72],  # white matter
    [0.50, 0.70, 0.78],  # deep grey nuclei (iron: dark on T2*)
    [1.00, 1.10, 1.45],  # edema
    [0.40, 1.25, 2.20],  # necrosis (blood products: dark on T2*)
    [0.80, 0.95, 1.00],  # enhancing tumour
    [1.00, 1.20, 1.25],  # non-enhancing tumour
], dtype=np.float32)
# The tissues around the brain, per column of _COLS. Fat is bright on T1 and on
# T2 FSE, suppressed on EPI; bone is dark everywhere; the outer CSF is bright on
# T2, dark on FLAIR; the dura enhances after contrast; vitreous is like CSF.
_HEAD_CONTRAST = np.array([
    # t1   t1ce  t2    flair t2*   b0    ADC
    [0.28, 0.45, 1.35, 0.16, 1.10, 1.30, 2.90],  # MEN: outer CSF and meninges
    [0.03, 0.03, 0.03, 0.03, 0.02, 0.03, 0.00],  # BONE: cortical bone
    [0.95, 0.97, 0.65, 0.70, 0.55, 0.08, 0.30],  # MARROW: fatty diploë / vertebral marrow
    [1.15, 1.15, 1.05, 0.95, 0.90, 0.08, 0.10],  # FAT: subcutaneous and orbital fat
    [0.50, 0.58, 0.32, 0.35, 0.30, 0.35, 1.50],  # MUSCLE
    [0.60, 0.68, 0.55, 0.55, 0.45, 0.50, 1.20],  # SKIN
    [0.15, 0.16, 1.50, 0.10, 1.30, 1.40, 2.90],  # EYE: vitreous
    [0.80, 0.81, 0.60, 0.60, 0.60, 0.60, 0.90],  # CORD: spinal cord below the brain mask
], dtype=np.float32)
_CONTRAST = np.vstack([np.hstack([synth._CONTRAST, _BRAIN_EXTRA]), _HEAD_CONTRAST])

_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
# In-plane (column, row) directions of the standard planes, RAS (DICOM's usual
# ImageOrientationPatient: axial 1\0\0\0\1\0, sagittal 0\1\0\0\0\-1, coronal 1\0\0\0\0\-1).
_PLANES = {"tra": ((-1.0, 0, 0), (0, -1.0, 0)), "sag": ((0, -1.0, 0), (0, 0, -1.0)),
           "cor": ((-1.0, 0, 0), (0, 0, -1.0))}


# ---------------------------------------------------------------- small helpers
def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _rotation(deg) -> np.ndarray:
    ax, ay, az = np.deg2rad(deg)
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _axis_rotation(axis, deg) -> np.ndarray:
    """Rodrigues: rotation by `deg` about unit vector `axis`."""
    a = np.asarray(axis, float) / np.linalg.norm(axis)
    t = math.radians(deg)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + math.sin(t) * k + (1 - math.cos(t)) * k @ k


def transform_points(matrix, points) -> np.ndarray:
    """(N, 3) points mapped by a 4 × 4 affine."""
    p = np.asarray(points, np.float64)
    m = np.asarray(matrix, np.float64)
    return p @ m[:3, :3].T + m[:3, 3]


def _bspline_weights(x: np.ndarray, lo: float, step: float, n: int) -> np.ndarray:
    """(len(x), n) cubic B-spline weights of knots at lo + (i - 1) * step."""
    u = (np.asarray(x, np.float64) - lo) / step + 1.0
    base = np.floor(u).astype(int)
    t = (u - base)[:, None]
    k = np.arange(-1, 3)[None, :]
    d = np.abs(t - k)
    w = np.where(d < 1, 2 / 3 - d**2 + d**3 / 2, np.where(d < 2, (2 - d) ** 3 / 6, 0.0))
    mat = np.zeros((len(u), n), np.float32)
    np.add.at(mat, (np.repeat(np.arange(len(u)), 4), np.clip(base[:, None] + k, 0, n - 1).ravel()),
              w.ravel())
    return mat


def _field(rng: np.random.Generator, axes, lo, hi, scale_mm: float) -> np.ndarray:
    """A smooth random field (≈ unit standard deviation) on the grid `axes` (three 1D
    arrays, mm); its coarse knots span the box [lo, hi], so evaluating a sub-box
    with the same rng state gives the same field there."""
    n = [int(math.ceil((h - l) / scale_mm)) + 3 for l, h in zip(lo, hi)]
    coarse = rng.standard_normal(n).astype(np.float32)
    coarse /= coarse.std() / 2.0
    wx, wy, wz = (_bspline_weights(a, l, scale_mm, m) for a, l, m in zip(axes, lo, n))
    out = np.einsum("ai,ijk->ajk", wx, coarse)
    out = np.einsum("bj,ajk->abk", wy, out)
    return out @ wz.T


def _tm(seconds: float) -> str:
    s = seconds % 86400
    return f"{int(s // 3600):02d}{int(s // 60 % 60):02d}{int(s % 60):02d}.{int(round(s % 1 * 1e6)) % 1000000:06d}"


# --------------------------------------------------------------- the canonical head
@dataclass
class _Head:
    """The head in the canonical frame: tissue classes on a padded grid, its affine,
    tissue texture, the study's contrast table and points for planning."""

    classes: np.ndarray           # (X, Y, Z) uint8, classes 0-16
    affine: np.ndarray            # canonical voxel → canonical mm (RAS)
    texture: np.ndarray           # (X, Y, Z) float32, ≈ 1
    contrast: np.ndarray          # (17, len(_COLS)) float32
    head_pts: np.ndarray          # (N, 3) canonical mm, inside the head (above the neck)
    brain_pts: np.ndarray         # (M, 3) canonical mm, inside the brain
    images: dict = field(default_factory=dict)

    def image(self, kind: str):
        """The clean canonical image of one contrast as a (1, 1, X, Y, Z) tensor."""
        import torch
        if kind not in self.images:
            if kind == "dwi":    # b = 1000 s/mm²: S0 · exp(-b · ADC)
                lut = self.contrast[:, _COLS.index("b0")] * np.exp(-self.contrast[:, _COLS.index("adc")])
            else:
                lut = self.contrast[:, _COLS.index(kind)]
            img = lut.astype(np.float32)[self.classes]
            img *= self.texture
            self.images[kind] = torch.from_numpy(img)[None, None]
        return self.images[kind]

    def class_volume(self):
        import torch
        if "classes" not in self.images:
            self.images["classes"] = torch.from_numpy(self.classes.astype(np.float32))[None, None]
        return self.images["classes"]


def _outside_distance(brain: np.ndarray, sp: np.ndarray) -> np.ndarray:
    """Distance (mm) of every voxel outside `brain` to it; on fine grids computed at
    half resolution and interpolated (the layers vary by more than the error)."""
    if sp.min() < 1.5 and all(s % 2 == 0 for s in brain.shape):
        import torch
        x, y, z = brain.shape
        coarse = brain.view(np.uint8).reshape(x // 2, 2, y // 2, 2, z // 2, 2).sum(axis=(1, 3, 5)) >= 4
        d = ndi.distance_transform_edt(~coarse, sampling=2 * sp).astype(np.float32)
        d = torch.nn.functional.interpolate(torch.from_numpy(d)[None, None], scale_factor=2,
                                            mode="trilinear", align_corners=False)[0, 0].numpy()
    else:
        d = ndi.distance_transform_edt(~brain, sampling=sp).astype(np.float32)
    return np.maximum(d, 0.5 * float(sp.min()))


def _build_head(case: synth.SynthCase, rng: np.random.Generator) -> _Head:
    sp = np.abs(np.diag(case.affine)[:3]).astype(np.float64)
    pad_lo = np.round(np.array([10.0, 20.0, 45.0]) / sp).astype(int)
    pad_hi = np.round(np.array([10.0, 20.0, 30.0]) / sp).astype(int)
    classes = np.pad(case.classes, list(zip(pad_lo, pad_hi)))
    affine = case.affine.copy()
    affine[:3, 3] -= pad_lo * sp
    shape = classes.shape
    axes = [affine[a, 3] + np.arange(shape[a]) * sp[a] for a in range(3)]
    lo = [a[0] - sp[i] for i, a in enumerate(axes)]
    hi = [a[-1] + sp[i] for i, a in enumerate(axes)]
    brain = classes > 0
    d = _outside_distance(brain, sp)

    # Layers outside the brain, each with a smoothly varying thickness (mm); on a
    # coarse grid every layer is at least about one voxel thick.
    tmin = 0.9 * float(sp.min()) if sp.min() > 1.5 else 0.0
    x, y, z = (a.astype(np.float32).reshape(sh) for a, sh in zip(axes, ((-1, 1, 1), (1, -1, 1), (1, 1, -1))))
    temporal = ((1 / (1 + np.exp(-(np.abs(x) - 45) / 6))) * np.exp(-((z - 5) / 28) ** 2)
                * np.exp(-((y - 5) / 45) ** 2)).astype(np.float32)
    layers = [  # (class, mean thickness, spread, minimum, maximum)
        (MEN, 2.0, 0.8, 0.8, 3.5), (BONE, 1.7, 0.3, 1.1, 2.4), (MARROW, 3.0, 1.5, 0.8, 6.0),
        (BONE, 1.9, 0.4, 1.2, 2.8), (MUSCLE, None, None, None, None), (FAT, 3.5, 1.4, 1.5, 6.5),
        (SKIN, 1.8, 0.3, 1.2, 2.5)]
    bound = np.zeros(shape, np.float32)
    layer = np.zeros(shape, np.uint8)
    for cls, mean, spread, tlo, thi in layers:
        if cls == MUSCLE:   # galea and temporalis: thin everywhere, thick over the temples
            bound += 0.8 + 7.0 * temporal
        else:
            t = mean + spread * _field(rng, axes, lo, hi, 30.0)
            bound += np.clip(t, max(tlo, tmin), thi)
        layer += d > bound
    del bound, temporal
    lut = np.array([c for c, *_ in layers] + [synth.BG], np.uint8)
    classes = np.where(brain, classes, lut[layer])
    del layer, d

    # Neck below the foramen magnum: cord (continuing the brainstem), CSF, vertebral
    # arch and body, airway, muscle, fat and skin in an elliptical cross-section.
    area = brain.sum(axis=(0, 1)) * sp[0] * sp[1]
    big = np.flatnonzero(area > 2000.0)
    z_fm = axes[2][big[0]] - 4.0 if big.size else axes[2][0] + 40.0
    k_fm = int(np.searchsorted(axes[2], z_fm))
    k0 = int(pad_lo[2])
    cord = brain[:, :, k0]
    if cord.any():
        ys = float(axes[1][np.nonzero(cord)[1]].mean())
    else:
        ys = -16.0
        cord = (np.hypot(axes[0][:, None] / 7.0, (axes[1][None, :] - ys) / 8.0) < 1)
    bx = axes[0][np.nonzero(brain.any(axis=(1, 2)))[0]]
    half_w = (bx.max() - bx.min()) / 2 if bx.size else 70.0
    a_n, b_n, yc = 0.72 * half_w, 0.8 * half_w, ys + 14.0
    X, Y = axes[0][:, None], axes[1][None, :]
    rn = np.hypot(X / a_n, (Y - yc) / b_n)
    dc = ndi.distance_transform_edt(~cord, sampling=sp[:2])
    neck = np.where(rn < 1, MUSCLE, synth.BG).astype(np.uint8)
    neck[(rn < 1) & (rn > 1 - 8.0 / a_n)] = FAT
    neck[(rn < 1) & (rn > 1 - max(2.0, tmin) / a_n)] = SKIN
    neck[dc <= 9.5] = BONE
    neck[dc <= 8.0] = MARROW
    neck[dc <= 4.5] = BONE
    neck[dc <= 3.0] = MEN
    body = np.hypot(X / 14.0, (Y - ys - 25.0) / 11.0)
    neck[body < 1] = BONE
    neck[body < 0.8] = MARROW
    neck[np.hypot(X / 10.0, (Y - ys - 50.0) / 7.0) < 1] = synth.BG     # airway
    neck[cord] = CORD
    for k in range(min(k_fm, shape[2])):
        sl = classes[:, :, k]
        classes[:, :, k] = np.where(brain[:, :, k], sl, neck)

    # Eyes: vitreous globes in orbital fat, in front of and below the frontal lobes.
    for side in (-1.0, 1.0):
        xe, ze = side * 31.0, -24.0
        sel_x = np.abs(axes[0] - xe) < 8
        sel_z = np.abs(axes[2] - ze) < 8
        sub = brain[np.ix_(sel_x, np.ones(shape[1], bool), sel_z)]
        yb = axes[1][np.nonzero(sub.any(axis=(0, 2)))[0]]
        ye = (yb.max() if yb.size else 55.0) + 19.0
        box = [np.flatnonzero(np.abs(a - c) < 30) for a, c in zip(axes, (xe, ye, ze))]
        if any(b.size == 0 for b in box):
            continue
        bx_, by_, bz_ = (slice(b[0], b[-1] + 1) for b in box)
        ex, ey, ez = axes[0][bx_, None, None], axes[1][None, by_, None], axes[2][None, None, bz_]
        r = np.sqrt((ex - xe) ** 2 + (ey - ye) ** 2 + (ez - ze) ** 2)
        orbit = np.sqrt(((ex - 0.95 * xe) / 15) ** 2 + ((ey - ye + 11) / 20) ** 2 + ((ez - ze) / 14) ** 2)
        blk = classes[bx_, by_, bz_]
        free = (blk == synth.BG) | (blk >= BONE)
        blk[free & (orbit < 1)] = FAT
        blk[free & (r > 12) & (r < 12 + max(1.8, tmin)) & (ey > ye)] = SKIN   # eyelids
        blk[free & (r <= 12)] = EYE

    # Texture (a tissue property, shared by all sequences) and the study's contrast.
    texture = 1 + 0.035 * _field(rng, axes, lo, hi, 5.0)
    et = np.argwhere(classes == synth.ET)
    if len(et):
        a0, a1 = et.min(0), et.max(0) + 1
        sub_axes = [ax[s:e] for ax, s, e in zip(axes, a0, a1)]
        het = 0.12 * _field(rng, sub_axes, lo, hi, 4.0)
        blk = texture[a0[0]:a1[0], a0[1]:a1[1], a0[2]:a1[2]]
        blk += np.where(classes[a0[0]:a1[0], a0[1]:a1[1], a0[2]:a1[2]] == synth.ET, het, 0)
    texture = texture.astype(np.float32)
    contrast = (_CONTRAST * rng.uniform(0.95, 1.05, _CONTRAST.shape)).astype(np.float32)

    # Points for planning fields of view (neck cut 40 mm below the foramen magnum).
    st = max(1, int(round(3.0 / sp.min())))
    hv = np.argwhere(classes[::st, ::st, ::st] > 0) * st
    hp = transform_points(affine, hv)
    hp = hp[hp[:, 2] >= z_fm - 40.0]
    bv = np.argwhere(brain[::st, ::st, ::st]) * st
    return _Head(classes, affine, texture, contrast, hp, transform_points(affine, bv))


# ------------------------------------------------------------------ sampling
def _sample(vol, index_from_voxel: np.ndarray, shape, offsets=(0.0,), mode: str = "bilinear",
            padding: str = "border", max_points: int = 1 << 22) -> np.ndarray:
    """`vol` (1, 1, X, Y, Z) sampled on a grid of `shape` whose voxel (i, j, k)
    lies at `index_from_voxel @ (i, j, k + δ, 1)` in `vol`'s index space, averaged
    over the slice offsets δ (trilinear, or nearest with mode="nearest"). The
    output is traversed in the order that keeps consecutive samples closest in
    `vol`'s memory (several times faster for thick or rotated slices)."""
    import torch
    import torch.nn.functional as F
    mat = np.asarray(index_from_voxel, np.float64)
    strides = np.array(vol.stride()[2:], np.float64)
    jump = (np.abs(mat[:3, :3]) * strides[:, None]).sum(0)          # memory step per output axis
    perm = [int(a) for a in np.argsort(-jump, kind="stable")]         # slowest axis first
    size = torch.tensor(vol.shape[2:], dtype=torch.float64)
    m = torch.as_tensor(mat[:3]) * (2.0 / (size - 1))[:, None]
    m[:, 3] -= 1.0
    m = m[[2, 1, 0]].float().T        # (4, 3): per voxel axis, grid_sample's (W, H, D) = (z, y, x) order
    n = [int(shape[a]) for a in perm]
    steps = [torch.arange(n[i], dtype=torch.float32)[:, None] * m[perm[i]] for i in range(3)]
    base = steps[1][:, None, :] + steps[2][None, :, :] + m[3]         # (n1, n2, 3)
    out = torch.empty(n, dtype=torch.float32)
    chunk = max(1, max_points // max(1, n[1] * n[2]))
    for a0 in range(0, n[0], chunk):
        first = steps[0][a0:a0 + chunk, None, None, :]
        acc = None
        for d in offsets:
            g = (first + (base + float(d) * m[2]))[None]
            s = F.grid_sample(vol, g, mode=mode, padding_mode=padding, align_corners=True)[0, 0]
            acc = s if acc is None else acc.add_(s)
        if len(offsets) > 1:
            acc /= len(offsets)
        out[a0:a0 + len(first)] = acc
    return np.ascontiguousarray(out.numpy().transpose(np.argsort(perm)))


@dataclass
class _Grid:
    affine: np.ndarray        # voxel → world, RAS
    shape: tuple
    thickness: float          # acquired slice thickness (mm)
    plane: str                # tra, sag, cor
    acquisition: str          # 2D, 3D
    oblique: float = 0.0      # tilt of the slice plane (degrees)

    @property
    def spacing(self) -> np.ndarray:
        return np.linalg.norm(self.affine[:3, :3], axis=0)


def _render(head: _Head, kind: str, grid: _Grid, pose: np.ndarray) -> np.ndarray:
    """Clean intensities of canonical contrast `kind` on `grid`, the head in `pose`;
    thick slices average several samples across their thickness; in-plane pixels
    finer than the canonical grid are rendered at half resolution and interpolated
    (as a scanner's 512 matrix interpolates a 256 acquisition)."""
    import torch
    csp = float(np.abs(np.diag(head.affine)[:3]).min())
    sp = grid.spacing
    factor = 2 if (sp[:2].max() < 0.6 * csp and grid.shape[0] % 2 == 0 and grid.shape[1] % 2 == 0) else 1
    affine = grid.affine @ np.array([[factor, 0, 0, (factor - 1) / 2], [0, factor, 0, (factor - 1) / 2],
                                     [0, 0, 1, 0], [0, 0, 0, 1]], float)
    shape = (grid.shape[0] // factor, grid.shape[1] // factor, grid.shape[2])
    n_sub = int(np.clip(math.ceil(grid.thickness / (2.0 * csp)), 1, 6)) if grid.thickness > 1.5 * csp else 1
    offsets = [((m + 0.5) / n_sub - 0.5) * grid.thickness / sp[2] for m in range(n_sub)]
    index = np.linalg.inv(head.affine) @ np.linalg.inv(pose) @ affine
    img = _sample(head.image(kind), index, shape, offsets)
    if factor > 1:
        img = torch.nn.functional.interpolate(torch.from_numpy(img)[None, None], size=tuple(grid.shape),
                                              mode="trilinear", align_corners=False)[0, 0].numpy()
    return img


def _truth_classes(head: _Head, grid: _Grid, pose: np.ndarray) -> np.ndarray:
    """The phantom's classes at the voxel centres of `grid` (nearest neighbour)."""
    index = np.linalg.inv(head.affine) @ np.linalg.inv(pose) @ grid.affine
    cls = _sample(head.class_volume(), index, grid.shape, mode="nearest", padding="border")
    return np.rint(cls).astype(np.uint8)


def _bias(rng: np.random.Generator, grid: _Grid, head_world: np.ndarray) -> np.ndarray:
    """A smooth multiplicative field fixed in the scanner: a few coil elements
    around the head and a gradient, spanning ×0.7-1.3 (at most) over the head."""
    import torch
    centre = head_world.mean(0)
    k = 5
    dirs = rng.standard_normal((k, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    pos = centre + dirs * rng.uniform(80, 130, (k, 1))
    width = rng.uniform(60, 120, k)
    amp = rng.uniform(0.3, 1.0, k)
    grad = rng.standard_normal(3) * 0.3

    def f(w):
        d2 = ((w[..., None, :] - pos) ** 2).sum(-1)
        return np.log(0.5 + (amp * np.exp(-d2 / (2 * width**2))).sum(-1)) + (w - centre) @ grad / 100.0

    vals = f(head_world)
    span = max(float(vals.max() - vals.min()), 1e-6)
    target = math.log(rng.uniform(1.35, 1.85))
    coarse = [np.linspace(0, n - 1, min(n, max(2, int(math.ceil(n / 8)) + 1))) for n in grid.shape]
    ci, cj, ck = np.meshgrid(*coarse, indexing="ij")
    w = transform_points(grid.affine, np.stack([ci, cj, ck], -1).reshape(-1, 3)).reshape(*ci.shape, 3)
    logb = ((f(w) - vals.mean()) * target / span).astype(np.float32)
    out = torch.nn.functional.interpolate(torch.from_numpy(np.exp(logb))[None, None], size=tuple(grid.shape),
                                          mode="trilinear", align_corners=True)[0, 0]
    return out.numpy()


def _rician(rng: np.random.Generator, img: np.ndarray, sigma: float) -> np.ndarray:
    """Magnitude of the image plus complex Gaussian noise of `sigma` per channel."""
    import torch
    gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
    x = torch.from_numpy(np.ascontiguousarray(img, np.float32))
    re = torch.randn(x.shape, generator=gen).mul_(sigma).add_(x)
    im = torch.randn(x.shape, generator=gen).mul_(sigma)
    return torch.hypot(re, im).numpy()


def _quantize(img: np.ndarray, scale: float) -> np.ndarray:
    return np.clip(np.rint(img * scale), 0, 32767).astype(np.int16)


# ---------------------------------------------------------------- planning grids
def _plane_axes(plane: str, tilt: float, rng: np.random.Generator) -> np.ndarray:
    """(3, 3) RAS columns u, v, n (n = u × v) of a plane, tilted by `tilt` degrees
    about a random in-plane axis."""
    u, v = (np.asarray(a, float) for a in _PLANES[plane])
    n = np.cross(u, v)
    if tilt:
        phi = rng.uniform(0, 2 * math.pi)
        r = _axis_rotation(math.cos(phi) * u + math.sin(phi) * v, tilt)
        u, v, n = r @ u, r @ v, r @ n
    return np.stack([u, v, n], 1)


def _plan(rng: np.random.Generator, plane: str, inplane: float, thickness: float, gap: float,
          acquisition: str, head_world: list[np.ndarray], brain_world: list[np.ndarray],
          fov: float, tilt: float = 0.0, slab: str | None = None, point_margin: float = 3.0) -> _Grid:
    """A grid covering the head in-plane (FOV at least `fov` mm) and, along the
    slice normal, the whole head (3D) or the whole brain with a margin that may
    cut the vertex's scalp and the neck (2D, `slab` "brain")."""
    axes = _plane_axes(plane, tilt, rng)
    hp = np.concatenate(head_world) @ axes
    bp = np.concatenate(brain_world) @ axes
    spacing = [inplane, inplane, thickness + gap]
    n, centre = [], []
    for a in range(3):
        if a == 2 and (slab or ("brain" if acquisition == "2D" else "head")) == "brain":
            lo_, hi_ = bp[:, 2].min() - point_margin, bp[:, 2].max() + point_margin
            lo_ -= rng.uniform(2.0, 10.0)
            hi_ += rng.uniform(2.0, 6.0)
            count = int(math.ceil((hi_ - lo_) / spacing[2])) + 1
            c = (lo_ + hi_) / 2
        else:
            lo_, hi_ = hp[:, a].min() - point_margin, hp[:, a].max() + point_margin
            margin = rng.uniform(3.0, 10.0)
            need = hi_ - lo_ + 2 * margin
            length = max(need, fov if a < 2 else 0.0)
            count = int(math.ceil(length / spacing[a]))
            count += count % 2
            slack = (count * spacing[a] - (hi_ - lo_)) / 2 - 2.0
            c = (lo_ + hi_) / 2 + rng.uniform(-1, 1) * min(3.0, max(0.0, slack))
        n.append(count)
        centre.append(c)
    affine = np.eye(4)
    affine[:3, :3] = axes * np.array(spacing)
    affine[:3, 3] = axes @ np.array(centre) - affine[:3, :3] @ ((np.array(n) - 1) / 2)
    affine[:3, 3] = np.round(affine[:3, 3], 4)
    return _Grid(affine, tuple(n), thickness, plane, acquisition, float(tilt))


def _localizer_grids(rng, sf: float, centre: np.ndarray, slices: int) -> list[_Grid]:
    """Three orthogonal stacks of a few thick slices centred at the isocentre (not
    planned on the head)."""
    out = []
    inplane = round(280.0 / 256, 4) * sf
    thick = float(_pick(rng, (7.0, 8.0, 10.0))) * sf
    step = float(rng.uniform(12, 22)) * sf
    for plane in ("sag", "cor", "tra"):
        axes = _plane_axes(plane, 0.0, rng)
        n = (int(round(280.0 / inplane)) // 2 * 2, int(round(280.0 / inplane)) // 2 * 2, slices)
        affine = np.eye(4)
        affine[:3, :3] = axes * np.array([inplane, inplane, step])
        affine[:3, 3] = np.round(centre - affine[:3, :3] @ ((np.array(n) - 1) / 2), 4)
        out.append(_Grid(affine, n, thick, plane, "2D"))
    return out


# ------------------------------------------------------------- vendor protocols
@dataclass
class _Series:
    key: str                  # loc, t1, t1ce, t2, flair, dwi, adc, sub, mpr, t2star
    kind: str                 # role, or localizer, dwi, adc, subtraction, mpr, t2star
    description: str
    protocol: str
    tags: dict
    post: bool = False        # after the contrast injection
    derived_from: str | None = None
    grids: list = field(default_factory=list)
    pose: np.ndarray | None = None
    number: int = 0
    uid: str = ""
    time: float = 0.0         # SeriesTime (s after midnight)
    acq_time: float = 0.0     # AcquisitionTime (the source's, for a derived series)
    files: list = field(default_factory=list)
    nifti: list = field(default_factory=list)

    @property
    def role(self) -> str | None:
        return self.kind if self.kind in ROLES else None


_VENDOR = {
    "siemens": dict(manufacturer=("SIEMENS",),
                    models=(("Skyra", 3.0), ("Prisma_fit", 3.0), ("MAGNETOM Vida", 3.0), ("Aera", 1.5),
                            ("Avanto_fit", 1.5)),
                    study=("Kopf^Routine", "HEAD^ROUTINE", "MRT Schaedel nativ + KM", "Neuro^Tumor")),
    "ge": dict(manufacturer=("GE MEDICAL SYSTEMS",),
               models=(("DISCOVERY MR750", 3.0), ("SIGNA Premier", 3.0), ("Optima MR450w", 1.5),
                       ("SIGNA Artist", 1.5)),
               study=("MR BRAIN W/WO CONTRAST", "BRAIN TUMOR", "MRI HEAD WITH AND WITHOUT CONTRAST")),
    "philips": dict(manufacturer=("Philips Medical Systems", "Philips"),
                    models=(("Ingenia", 3.0), ("Achieva dStream", 1.5), ("Ingenia Elition X", 3.0),
                            ("Ingenia", 1.5)),
                    study=("Brain", "HERSENEN^Tumor", "MRI Brain + Gd", "Neuro^Brain tumor")),
}


def _image_type(vendor: str, family: str) -> list[str]:
    """ImageType of an original magnitude image as each vendor writes it."""
    if vendor == "siemens":
        return ["ORIGINAL", "PRIMARY", "M", "ND", "NORM"]
    if vendor == "ge":
        return ["ORIGINAL", "PRIMARY", "OTHER"]
    return {"SE": ["ORIGINAL", "PRIMARY", "M_SE", "M", "SE"], "IR": ["ORIGINAL", "PRIMARY", "M_IR", "M", "IR"],
            "GR": ["ORIGINAL", "PRIMARY", "M_FFE", "M", "FFE"]}[family]


def _acq(seq, var, mr, te, tr, fa, ti=None, opts=None, name=None, etl=None) -> dict:
    tags = {"ScanningSequence": seq, "SequenceVariant": var, "MRAcquisitionType": mr,
            "EchoTime": round(float(te), 2), "RepetitionTime": round(float(tr), 1),
            "FlipAngle": round(float(fa), 1)}
    if ti is not None:
        tags["InversionTime"] = round(float(ti), 1)
    if opts:
        tags["ScanOptions"] = opts
    if name:
        tags["SequenceName"] = name
    if etl:
        tags["EchoTrainLength"] = int(etl)
    return tags


def _protocols(vendor: str, rng: np.random.Generator, plan: dict) -> dict[str, _Series]:
    """The series of one study as `vendor` names and parameterises them."""
    u = rng.uniform
    ce_plane, flair3d, t1_3d = plan["t1ce_plane"], plan["flair_3d"], plan["t1_3d"]
    s: dict[str, _Series] = {}
    if vendor == "siemens":
        ori = "sag" if ce_plane == "sag" else "tra"
        base = _pick(rng, (f"t1_mprage_{ori}_p2_iso", f"t1_mprage_{ori}_iso", f"t1_mprage_{ori}_p2"))
        mprage = _acq("GR\\IR", "SK\\SP\\MP", "3D", u(2.2, 3.4), u(1900, 2300), _pick(rng, (8, 9)),
                      u(900, 1100), "IR\\PFP", "*tfl3d1_16ns")
        it = _image_type(vendor, "GR")
        post = _pick(rng, (f"{base}_KM", f"{base} KM", f"{base}_post", f"{base}_Gd", f"{base}_KM_post"))
        s["t1ce"] = _Series("t1ce", "t1ce", post, post, {**mprage, "ImageType": it}, post=True)
        if t1_3d:
            s["t1"] = _Series("t1", "t1", base, base, {**mprage, "ImageType": it})
        else:
            d = _pick(rng, ("t1_se_tra", "t1_se_tra_p2", "t1_tse_tra"))
            tse = "tse" in d
            s["t1"] = _Series("t1", "t1", d, d, {**_acq("SE", "SK\\SP" if tse else "SP", "2D", u(8, 14), u(450, 650),
                                                         150 if tse else 90, None, "SAT1" if tse else None,
                                                         "*tse2d1_3" if tse else "*se2d1", 3 if tse else 1),
                                                 "ImageType": it})
        d = _pick(rng, ("t2_tse_tra_512", "t2_tse_tra_512", "t2_tse_tra", "t2_tse_tra_p2_512"))
        s["t2"] = _Series("t2", "t2", d, d, {**_acq("SE", "SK\\SP\\OSP", "2D", u(85, 105), u(4000, 6500), 150,
                                                   None, "PFP\\SAT1", "*tse2d1_15", 15), "ImageType": it})
        if flair3d:
            d = _pick(rng, ("t2_space_dark-fluid_sag_p2_iso", "t2_spc_da-fl_sag_p2_iso", "t2_space_dark-fluid_sag"))
            tags = _acq("SE\\IR", "SK\\SP\\MP", "3D", u(380, 400), 5000, 120, u(1750, 1850), "IR\\PFP",
                        "*spcir3d1_278ns", 278)
        else:
            d = _pick(rng, ("t2_tirm_tra_dark-fluid", "t2_tirm_tra_dark-fluid_p2", "t2_tirm_tra_FLAIR"))
            tags = _acq("SE\\IR", "SK\\SP\\MP\\OSP", "2D", u(81, 95), u(8000, 9000), 150, u(2370, 2500),
                        "IR\\PFP", "*tir2d1_16", 16)
        s["flair"] = _Series("flair", "flair", d, d, {**tags, "ImageType": it})
        d = _pick(rng, ("ep2d_diff_3scan_trace", "ep2d_diff_3scan_trace_p2", "ep2d_diff_tra_3scan_p2"))
        s["dwi"] = _Series("dwi", "dwi", d, d, {**_acq("EP", "SK\\SP", "2D", u(80, 95), u(4500, 6000), 90,
                                                       None, "PFP\\FS", "*ep_b1000t"),
                                                "ImageType": ["ORIGINAL", "PRIMARY", "DIFFUSION", "TRACEW", "ND",
                                                              "NORM"]})
        s["adc"] = _Series("adc", "adc", f"{d}_ADC", d, {**s["dwi"].tags, "ImageType": [
            "DERIVED", "PRIMARY", "DIFFUSION", "ADC", "ND", "NORM"]}, derived_from="dwi")
        s["sub"] = _Series("sub", "subtraction", f"{post}_SUB", post, {**mprage, "ImageType": [
            "DERIVED", "PRIMARY", "SUBTRACTION", "ND", "NORM"]}, post=True, derived_from="t1ce")
        s["mpr"] = _Series("mpr", "mpr", f"{post}_MPR_{plan['mpr_plane']}", post, {**mprage, "ImageType": [
            "DERIVED", "SECONDARY", "MPR", "ND", "NORM"]}, post=True, derived_from="t1ce")
        d = _pick(rng, ("t2_fl2d_tra_hemo", "t2_fl2d_tra_hemosens", "t2star_tra"))
        s["t2star"] = _Series("t2star", "t2star", d, d, {**_acq("GR", "SP\\OSP", "2D", u(19, 25), u(600, 800), 20,
                                                               None, None, "*fl2d1"), "ImageType": it})
        loc = _pick(rng, ("localizer", "localizer", "AAHead_Scout_32ch-head-coil"))
        s["loc"] = _Series("loc", "localizer", loc, loc, {**_acq("GR", "SP", "2D", 4.0, 8.6, 20, None, None,
                                                               "*fl2d1"),
                                                          "ImageType": ["ORIGINAL", "PRIMARY", "M", "NORM", "DIS2D"]})
    elif vendor == "ge":
        ori = "Sag" if ce_plane == "sag" else "Ax"
        base = _pick(rng, (f"{ori} 3D BRAVO", f"{ori} FSPGR BRAVO", f"{ori.upper()} 3D T1 BRAVO"))
        bravo = _acq("GR", "SS\\SK", "3D", u(2.8, 3.4), u(7.0, 8.6), 12, 450,
                     "FAST_GEMS\\EDR_GEMS\\FILTERED_GEMS\\ACC_GEMS", "efgre3d")
        it = _image_type(vendor, "GR")
        post = _pick(rng, (f"{base} +C", f"{base} +C", f"{base} POST", f"{base} + C"))
        s["t1ce"] = _Series("t1ce", "t1ce", post, post, {**bravo, "ImageType": it}, post=True)
        if t1_3d:
            s["t1"] = _Series("t1", "t1", base, base, {**bravo, "ImageType": it})
        elif rng.random() < 0.65:
            d = _pick(rng, ("Ax T1 FLAIR", "AX T1 FLAIR", "Ax T1 FLAIR"))
            s["t1"] = _Series("t1", "t1", d, d, {**_acq("SE\\IR", "SK\\OSP", "2D", u(9, 24), u(1750, 2500), 90,
                                                        u(720, 860), "FAST_GEMS\\IR_GEMS", "fsirs", 7),
                                                 "ImageType": it})
        else:
            d = _pick(rng, ("Ax T1 SE", "AX T1 SE"))
            s["t1"] = _Series("t1", "t1", d, d, {**_acq("SE", "SK\\OSP", "2D", u(10, 14), u(450, 600), 90, None,
                                                        "FAST_GEMS", "se", 1), "ImageType": it})
        d = _pick(rng, ("Ax T2 FSE", "Ax T2 PROPELLER", "AX T2 FRFSE", "Ax T2 FSE"))
        s["t2"] = _Series("t2", "t2", d, d, {**_acq("SE", "SK\\OSP", "2D", u(95, 110), u(4000, 6000), 125, None,
                                                   "FAST_GEMS\\SEQ_GEMS", "fse", 20), "ImageType": it})
        if flair3d:
            d = _pick(rng, ("Sag CUBE FLAIR", "Sag T2 FLAIR CUBE", "SAG CUBE FLAIR"))
            tags = _acq("SE\\IR", "SK\\OSP", "3D", u(110, 130), 6000, 90, u(1800, 1900), "FAST_GEMS\\IR_GEMS",
                        "cube_ir", 180)
        else:
            d = _pick(rng, ("Ax T2 FLAIR", "AX T2 FLAIR", "Ax FLAIR"))
            tags = _acq("SE\\IR", "SK\\OSP", "2D", u(110, 140), u(8000, 10000), 90, u(2200, 2500),
                        "FAST_GEMS\\IR_GEMS", "fsirs", 24)
        s["flair"] = _Series("flair", "flair", d, d, {**tags, "ImageType": it})
        d = _pick(rng, ("Ax DWI", "AX DWI 1000b", "Ax DWI ASSET"))
        s["dwi"] = _Series("dwi", "dwi", d, d, {**_acq("EP\\SE", "SK\\SS", "2D", u(70, 90), u(5000, 8000), 90,
                                                       None, "EPI_GEMS\\PFF", "epi2"),
                                                "ImageType": ["ORIGINAL", "PRIMARY", "DIFFUSION", "TRACEW"]})
        adc = _pick(rng, ("Apparent Diffusion Coefficient (mm2/s)", "ADC", "ADC (10^-6 mm2/s)"))
        s["adc"] = _Series("adc", "adc", adc, d, {**s["dwi"].tags, "ImageType": ["DERIVED", "PRIMARY", "ADC"]},
                           derived_from="dwi")
        s["sub"] = _Series("sub", "subtraction", f"SUB {post}", post, {**bravo, "ImageType": [
            "DERIVED", "SECONDARY", "SUBTRACTION"]}, post=True, derived_from="t1ce")
        pl = {"tra": "Ax", "cor": "Cor", "sag": "Sag"}[plan["mpr_plane"]]
        s["mpr"] = _Series("mpr", "mpr", _pick(rng, (f"{pl} Reformat", f"{pl.upper()} REFORMAT", f"{pl} MPR +C")),
                           post, {**bravo, "ImageType": ["DERIVED", "SECONDARY", "REFORMATTED", "AVERAGE"]},
                           post=True, derived_from="t1ce")
        d = _pick(rng, ("Ax T2* GRE", "AX GRE", "Ax T2 GRE"))
        s["t2star"] = _Series("t2star", "t2star", d, d, {**_acq("GR", "SS", "2D", u(15, 25), u(500, 700), 20, None,
                                                               "FAST_GEMS", "fgre"), "ImageType": it})
        d = _pick(rng, ("3-Plane Loc", "3 Plane Loc", "3PLANE LOC", "Loc"))
        s["loc"] = _Series("loc", "localizer", d, d, {**_acq("GR", "SS\\SK", "2D", 1.6, 5.0, 30, None,
                                                           "FAST_GEMS", "fgre"),
                                                      "ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]})
    else:
        base = _pick(rng, ("T1W_3D_TFE", "T1W_3D_TFE_SENSE", "3D_T1W_TFE"))
        tfe = _acq("GR", "SK\\MP", "3D", u(3.4, 4.6), u(7.5, 8.5), 8)
        it = _image_type(vendor, "GR")
        post = _pick(rng, (f"{base} +C", "sT1W_3D_TFE_Gd", f"{base}_Gd", f"{base} post"))
        s["t1ce"] = _Series("t1ce", "t1ce", post, post, {**tfe, "ImageType": it}, post=True)
        if t1_3d:
            s["t1"] = _Series("t1", "t1", base, base, {**tfe, "ImageType": it})
        else:
            d = _pick(rng, ("T1W_SE", "T1W_SE_TRA", "T1W_TSE", "T1W_SE_SENSE"))
            s["t1"] = _Series("t1", "t1", d, d, {**_acq("SE", "SK", "2D", u(10, 15), u(450, 600), 90),
                                                 "ImageType": _image_type(vendor, "SE")})
        d = _pick(rng, ("T2W_TSE", "T2W_TSE_TRA", "T2W_TSE_SENSE"))
        s["t2"] = _Series("t2", "t2", d, d, {**_acq("SE", "SK", "2D", u(80, 110), u(3000, 5000), 90,
                                                   etl=int(u(12, 18))),
                                             "ImageType": _image_type(vendor, "SE")})
        if flair3d:
            d = _pick(rng, ("3D_Brain_VIEW_FLAIR", "3D_Brain_VIEW_FLAIR_SHC", "VISTA_FLAIR"))
            tags = _acq("IR", "SK", "3D", u(300, 350), 4800, 90, u(1600, 1700))
        else:
            d = _pick(rng, ("T2W_FLAIR", "T2W_FLAIR_TRA", "T2W_FLAIR_SENSE"))
            tags = _acq("IR", "SK", "2D", u(120, 140), u(8000, 11000), 90, u(2600, 2800))
        s["flair"] = _Series("flair", "flair", d, d, {**tags, "ImageType": _image_type(vendor, "IR")})
        d = _pick(rng, ("DWI", "DWI_SENSE", "DWI_b1000", "Diffusion"))
        s["dwi"] = _Series("dwi", "dwi", d, d, {**_acq("EP\\SE", "SK", "2D", u(70, 90), u(3000, 5000), 90),
                                                "ImageType": ["ORIGINAL", "PRIMARY", "DIFFUSION", "TRACEW", "M",
                                                              "SE"]})
        s["adc"] = _Series("adc", "adc", _pick(rng, ("dADC", f"{d}_ADC", "dADC_SENSE")), d,
                           {**s["dwi"].tags, "ImageType": ["DERIVED", "PRIMARY", "ADC", "ADC"]}, derived_from="dwi")
        s["sub"] = _Series("sub", "subtraction", _pick(rng, (f"SUB {post}", f"{post} SUB", "Subtraction")), post,
                           {**tfe, "ImageType": ["DERIVED", "PRIMARY", "SUBTRACTION", "M", "FFE"]}, post=True,
                           derived_from="t1ce")
        s["mpr"] = _Series("mpr", "mpr", f"{post} MPR {plan['mpr_plane']}", post,
                           {**tfe, "ImageType": ["DERIVED", "SECONDARY", "MPR", "M", "FFE"]}, post=True,
                           derived_from="t1ce")
        d = _pick(rng, ("T2*_FFE", "T2_FFE_TRA", "T2*W_FFE"))
        s["t2star"] = _Series("t2star", "t2star", d, d, {**_acq("GR", "SP", "2D", u(16, 23), u(600, 800), 18),
                                                         "ImageType": it})
        d = _pick(rng, ("Survey", "SmartBrain", "SmartBrain_SENSE", "sSurvey"))
        s["loc"] = _Series("loc", "localizer", d, d, {**_acq("GR", "SP", "2D", 4.6, 11.0, 15), "ImageType": it})
    if vendor == "ge":   # GE's ProtocolName is the exam protocol, the same for every series
        exam = _pick(rng, ("BRAIN W/WO", "ROUTINE BRAIN TUMOR", "BRAIN TUMOR W WO"))
        for ser in s.values():
            ser.protocol = exam
    elif vendor == "philips" and rng.random() < 0.5:
        for ser in s.values():
            ser.protocol = f"WIP {ser.protocol}" if ser.derived_from is None else ser.protocol
    return s


def _durations(key: str, acquisition: str) -> float:
    """Scan time (s) of a series, for SeriesTime / AcquisitionTime."""
    return {"loc": 25, "t1": 300 if acquisition == "3D" else 180, "t1ce": 300, "t2": 150,
            "flair": 320 if acquisition == "3D" else 210, "dwi": 90, "t2star": 200}.get(key, 0)


# ---------------------------------------------------------------- writing
def _sanitize(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9+\-]+", "_", text).strip("_") or "series"


_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_GROUP_LENGTH, _MEDIA_UID, _SOP_UID = 0x00020000, 0x00020003, 0x00080018
_INSTANCE, _POSITION, _PIXELS = 0x00200013, 0x00200032, 0x7FE00010


def _elements(raw: bytes) -> tuple[list[tuple[int, bytes, bytes]], int] | None:
    """Top-level (tag, VR, value) of an explicit-VR little-endian Part 10 file and
    where its dataset starts; None for anything else (sequences, undefined lengths)."""
    if raw[128:132] != b"DICM":
        return None
    out, pos, start = [], 132, None
    while pos < len(raw):
        group, elem = int.from_bytes(raw[pos:pos + 2], "little"), int.from_bytes(raw[pos + 2:pos + 4], "little")
        vr = raw[pos + 4:pos + 6]
        if start is None and group != 2:
            start = len(out)
        if vr in _LONG_VRS:
            length, head = int.from_bytes(raw[pos + 8:pos + 12], "little"), 12
        else:
            length, head = int.from_bytes(raw[pos + 6:pos + 8], "little"), 8
        if vr == b"SQ" or length == 0xFFFFFFFF or not vr.isalpha():
            return None
        out.append(((group << 16) | elem, vr, raw[pos + head:pos + head + length]))
        pos += head + length
    return out, (start if start is not None else len(out))


def _encode(tag: int, vr: bytes, value: bytes) -> bytes:
    head = tag.to_bytes(4, "big")
    head = head[1::-1] + head[3:1:-1] + vr        # group, element little-endian
    if vr in _LONG_VRS:
        return head + b"\0\0" + len(value).to_bytes(4, "little") + value
    return head + len(value).to_bytes(2, "little") + value


def _even(text: str, pad: bytes = b" ") -> bytes:
    b = text.encode("ascii")
    return b + pad if len(b) % 2 else b


_PER_SLICE = {"checked": False}   # write_series varies only the expected elements per slice


def _write_series_fast(stored: np.ndarray, affine: np.ndarray, folder: Path, description: str, uids: dict,
                       slope: float, patient_id: str, tags: dict, start: int = 1) -> list[Path]:
    """What `medseg.data.dicom.write_series` writes, with InstanceNumbers from `start`,
    much faster. The first call writes two slices with `write_series` and checks
    that only the SOP instance UID, instance number, position and pixel data differ
    between them; every call then writes its first slice with `write_series` and
    repeats exactly those per-slice changes (computed as `write_series` computes
    them, which is checked on that slice) for every slice. Anything unexpected falls
    back to `write_series` for every slice. `stored` holds int16 values, the image's
    values are `stored * slope`."""
    from pydicom.uid import generate_uid
    from pydicom.valuerep import format_number_as_ds
    from medseg.data.dicom import write_series
    stored = np.asarray(stored, np.int16)
    n = stored.shape[2]
    probe = folder.parent / f".probe-{folder.name}"
    lps = _LPS @ affine
    planes = np.ascontiguousarray(stored.transpose(2, 1, 0), "<i2")     # (slices, rows, columns)

    def image(arr: np.ndarray) -> nib.Nifti1Image:
        return nib.Nifti1Image(arr.astype(np.float64) * slope if slope != 1.0 else arr, affine)

    def position(k: int) -> bytes:
        return _even("\\".join(format_number_as_ds(float(v)) for v in (lps @ [0, 0, k, 1])[:3]))

    def expected(k: int, els) -> bool:
        got = {t: v for t, _, v in els}
        return (got.get(_INSTANCE) == _even(str(k + 1)) and got.get(_POSITION) == position(k)
                and got.get(_PIXELS) == planes[k].tobytes() and got.get(_MEDIA_UID) == got.get(_SOP_UID)
                and els[0][0] == _GROUP_LENGTH)

    two = not _PER_SLICE["checked"] and n >= 2
    files = write_series(image(stored[:, :, :2 if two else 1]), probe, description, uids, (slope, 0.0),
                         patient_id, tags=tags)
    raws = [f.read_bytes() for f in files]
    shutil.rmtree(probe, ignore_errors=True)
    parsed = [_elements(raw) for raw in raws]
    ok = all(x is not None for x in parsed) and all(expected(k, x[0]) for k, x in enumerate(parsed))
    if ok and two:
        (a, _), (b, _) = parsed
        vary = {_GROUP_LENGTH, _MEDIA_UID, _SOP_UID, _INSTANCE, _POSITION, _PIXELS}
        ok = [t for t, _, _ in a] == [t for t, _, _ in b] and all(
            x == y or t in vary for (t, _, x), (_, _, y) in zip(a, b))
        _PER_SLICE["checked"] = ok
    folder.mkdir(parents=True, exist_ok=True)
    if not (ok and _PER_SLICE["checked"]):
        out = write_series(image(stored), folder, description, uids, (slope, 0.0), patient_id, tags=tags)
        if start != 1:
            import pydicom
            for k, path in enumerate(out):
                ds = pydicom.dcmread(path)
                ds.InstanceNumber = start + k
                ds.save_as(path, enforce_file_format=True)
        return out
    els, ds_start = parsed[0]
    preamble, group_vr = raws[0][:132], els[0][1]
    varying = (_MEDIA_UID, _SOP_UID, _INSTANCE, _POSITION, _PIXELS)

    def segments(part):    # constant elements pre-encoded; a varying one stays its tag
        out_, run = [], []
        for t, vr, v in part:
            if t in varying:
                out_ += [b"".join(run), (t, vr)]
                run = []
            else:
                run.append(_encode(t, vr, v))
        return out_ + [b"".join(run)]

    meta_parts, body_parts = segments(els[1:ds_start]), segments(els[ds_start:])
    out = []
    for k in range(n):
        uid = _even(str(generate_uid()), b"\0")
        new = {_MEDIA_UID: uid, _SOP_UID: uid, _INSTANCE: _even(str(k + start)), _POSITION: position(k)}
        meta = b"".join(x if isinstance(x, bytes) else _encode(x[0], x[1], new[x[0]]) for x in meta_parts)
        path = folder / f"IM{k + 1:04d}.dcm"
        with open(path, "wb") as f:
            f.write(preamble + _encode(_GROUP_LENGTH, group_vr, len(meta).to_bytes(4, "little")) + meta)
            for x in body_parts:
                if isinstance(x, bytes):
                    f.write(x)
                elif x[0] == _PIXELS:
                    f.write(_encode(x[0], x[1], b"")[:-4] + (2 * planes[k].size).to_bytes(4, "little"))
                    f.write(planes[k].data)
                else:
                    f.write(_encode(x[0], x[1], new[x[0]]))
        out.append(path)
    return out


class _Writer:
    """Writes one study's series to staging folders, moves them into the study
    layout, and writes the dcm2niix-like NIfTI variant."""

    def __init__(self, out: Path, sid: str, rng: np.random.Generator, layout: str, formats, study_tags: dict,
                 uids: dict, patient_id: str):
        self.out, self.sid, self.rng, self.layout = out, sid, rng, layout
        self.formats, self.study_tags, self.uids, self.patient_id = formats, study_tags, uids, patient_id
        self.study = out / "studies" / sid
        self.nifti = out / "studies_nifti" / sid
        self.stage = Path(tempfile.mkdtemp(prefix=".staging-", dir=out))
        self.n_series = 0
        self.used: set[str] = set()
        self.folder_style = _pick(rng, ("named", "se"))
        self.file_style = _pick(rng, ("IM{k:04d}.dcm", "IM-{num:04d}-{k:04d}.dcm", "{k:06d}.dcm"))
        self.flat_ext = _pick(rng, ("", ".dcm"))

    def close(self) -> None:
        shutil.rmtree(self.stage, ignore_errors=True)

    def _target(self, ser: _Series, k: int) -> Path:
        if self.layout == "series":
            folder = (f"{ser.number}_{_sanitize(ser.description)}" if self.folder_style == "named"
                      else f"SE{ser.number:06d}")
            return self.study / folder / self.file_style.format(k=k + 1, num=ser.number)
        if self.layout == "nested":
            return self.study / "DICOM" / "PA000000" / "ST000000" / f"SE{self.n_series:06d}" / f"IM{k:06d}"
        while True:
            name = f"{int(self.rng.integers(16**8)):08X}{self.flat_ext}"
            if name not in self.used:
                self.used.add(name)
                return self.study / name

    def dicom(self, ser: _Series, volumes: list[tuple[np.ndarray, _Grid, dict]], slope: float) -> None:
        """Write `volumes` ((stored int16, grid, per-volume tags), one or more: several
        stacks of one series) as series `ser`, then move them into the layout."""
        tags = {**self.study_tags, **ser.tags, "SeriesDescription": ser.description,
                "ProtocolName": ser.protocol, "SeriesNumber": ser.number, "SeriesInstanceUID": ser.uid,
                "SeriesTime": _tm(ser.time), "AcquisitionTime": _tm(ser.acq_time),
                "ContentTime": _tm(ser.time + 30)}
        written, start = [], 1
        for v, (stored, grid, extra) in enumerate(volumes):
            t = dict(tags)
            if grid.acquisition == "2D":
                t["SliceThickness"] = round(grid.thickness, 4)
            t["SpacingBetweenSlices"] = round(float(grid.spacing[2]), 4)
            t.update(extra)
            folder = self.stage / f"{self.n_series:03d}_{v}"
            files = _write_series_fast(stored, grid.affine, folder, ser.description, self.uids, slope,
                                       self.patient_id, t, start)
            start += len(files)
            written += files
        for k, src in enumerate(written):
            dst = self._target(ser, k)
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dst)
            ser.files.append(dst.relative_to(self.study).as_posix())
        self.n_series += 1

    def nifti_files(self, ser: _Series, volumes: list[tuple[np.ndarray, _Grid, dict]], slope: float,
                    bvals: list[float] | None = None) -> None:
        """The series as dcm2niix writes it: one NIfTI (4D for several volumes on one
        grid), or one per image when the stacks differ in orientation."""
        name = f"{ser.number}_{_sanitize(ser.description)}"
        same = all(np.allclose(g.affine, volumes[0][1].affine) and g.shape == volumes[0][1].shape
                   for _, g, _ in volumes)
        if same:
            data = volumes[0][0] if len(volumes) == 1 else np.stack([v for v, _, _ in volumes], -1)
            items = [(name, data, volumes[0][1].affine, volumes[0][1])]
        else:
            items, n = [], 0
            for stored, grid, _ in volumes:
                for k in range(stored.shape[2]):
                    n += 1
                    aff = grid.affine.copy()
                    aff[:3, 3] = transform_points(grid.affine, [[0, 0, k]])[0]
                    items.append((f"{name}_i{n:05d}", stored[:, :, k:k + 1], aff, grid))
        for stem, data, aff, grid in items:
            img = nib.Nifti1Image(np.asarray(data, np.int16), aff)
            img.set_qform(aff, 1)
            img.set_sform(aff, 1)
            img.header.set_xyzt_units("mm", "sec")
            if slope != 1.0:
                img.header.set_slope_inter(slope, 0.0)
            with atomic_path(self.nifti / f"{stem}.nii.gz") as tmp:
                nib.save(img, str(tmp))
            write_json(self._sidecar(ser, grid, slope), self.nifti / f"{stem}.json")
            ser.nifti.append(f"{stem}.nii.gz")
        if bvals is not None:
            (self.nifti / f"{name}.bval").write_text(" ".join(f"{b:g}" for b in bvals) + "\n")
            (self.nifti / f"{name}.bvec").write_text("\n".join(" ".join("0" for _ in bvals) for _ in range(3)) + "\n")

    def _sidecar(self, ser: _Series, grid: _Grid, slope: float) -> dict:
        st, t = self.study_tags, ser.tags
        lps = _LPS @ grid.affine
        iop = np.concatenate([lps[:3, 0] / grid.spacing[0], lps[:3, 1] / grid.spacing[1]])
        side = {"Modality": "MR", "MagneticFieldStrength": st["MagneticFieldStrength"],
                "ImagingFrequency": st["ImagingFrequency"], "Manufacturer": st["Manufacturer"],
                "ManufacturersModelName": st["ManufacturerModelName"], "InstitutionName": st["InstitutionName"],
                "BodyPartExamined": st["BodyPartExamined"], "PatientPosition": "HFS",
                "SeriesDescription": ser.description, "ProtocolName": ser.protocol,
                "ScanningSequence": t["ScanningSequence"], "SequenceVariant": t["SequenceVariant"]}
        if "ScanOptions" in t:
            side["ScanOptions"] = t["ScanOptions"]
        if "SequenceName" in t:
            side["SequenceName"] = t["SequenceName"]
        side["ImageType"] = list(t["ImageType"])
        side.update({"RawImage": t["ImageType"][0] == "ORIGINAL", "SeriesNumber": ser.number,
                     "AcquisitionTime": f"{_tm(ser.acq_time)[:2]}:{_tm(ser.acq_time)[2:4]}:{_tm(ser.acq_time)[4:]}",
                     "AcquisitionNumber": 1, "SliceThickness": round(grid.thickness, 4),
                     "SpacingBetweenSlices": round(float(grid.spacing[2]), 4),
                     "EchoTime": round(t["EchoTime"] / 1000, 6),
                     "RepetitionTime": round(t["RepetitionTime"] / 1000, 6)})
        if "InversionTime" in t:
            side["InversionTime"] = round(t["InversionTime"] / 1000, 6)
        side.update({"FlipAngle": t["FlipAngle"], "MRAcquisitionType": t["MRAcquisitionType"]})
        if "ContrastBolusAgent" in t:
            side["ContrastBolusAgent"] = t["ContrastBolusAgent"]
        if slope != 1.0:
            side.update({"PhilipsRescaleSlope": slope, "PhilipsRescaleIntercept": 0,
                         "UsePhilipsFloatNotDisplayScaling": 1})
        side.update({"ImageOrientationPatientDICOM": [round(float(v), 8) for v in iop],
                     "SeriesInstanceUID": ser.uid, "ConversionSoftware": "dcm2niix",
                     "ConversionSoftwareVersion": "v1.0.20240202"})
        return side


# ------------------------------------------------------------------- one study
_KINDS = {"loc": "t1", "dwi": "dwi"}   # canonical image each series key renders (else its own name)
_SCANNER_SCALE = {"siemens": (700.0, 3200.0), "ge": (900.0, 9000.0), "philips": (600.0, 3000.0)}
_NOISE = {"t1": 0.025, "t1ce": 0.025, "t2": 0.03, "flair": 0.035, "b0": 0.04, "dwi": 0.04, "t2star": 0.035}


def _study(out: Path, seed: int, index: int, scale: str, formats) -> dict:
    sf = SCALES[scale]
    sid = f"RAW-{index:05d}"
    plan_rng = np.random.default_rng([seed, index, 11])
    patient = PATIENT_OFFSET + index
    shape = (240, 240, 155) if scale == "full" else synth.DEMO_SHAPE
    case = synth.render_case(seed, patient, 0, shape, geometry_variation=False)
    head = _build_head(case, np.random.default_rng([seed, index, 12]))
    csp = np.abs(np.diag(case.affine)[:3])

    # Vendor and layout cycle through random orders, so any 3 consecutive studies
    # show every vendor and every layout.
    order = np.random.default_rng([seed, 7919])
    vendors, layouts = order.permutation(3), order.permutation(3)
    vendor = VENDORS[int(vendors[index % 3])]
    layout = STUDY_LAYOUTS[int(layouts[(index + index // 3) % 3])]
    r = plan_rng
    plan = {"t1_3d": bool(r.random() < 0.5), "t1ce_plane": "sag" if r.random() < 0.6 else "tra",
            "flair_3d": bool(r.random() < 0.45)}
    plan["mpr_plane"] = _pick(r, ("tra", "cor")) if plan["t1ce_plane"] == "sag" else _pick(r, ("cor", "sag"))
    present = {"sub": plan["t1_3d"] and r.random() < 0.65, "mpr": r.random() < 0.5, "t2star": r.random() < 0.4}
    dwi_b0 = r.random() < 0.7
    agent_tag = r.random() < 0.5
    model, field_t = _pick(r, _VENDOR[vendor]["models"])
    series = _protocols(vendor, r, plan)

    # Acquisition order: localizer, pre-contrast series (shuffled), T1ce; derived
    # series follow their source.
    pre = ["t1", "t2", "flair", "dwi"] + (["t2star"] if present["t2star"] else [])
    pre = [pre[i] for i in r.permutation(len(pre))]
    acquired = ["loc", *pre, "t1ce"]
    derived = {"dwi": ["adc"], "t1ce": [k for k in ("sub", "mpr") if present[k]]}
    keys = []
    for k in acquired:
        keys += [k] + derived.get(k, [])
    series = {k: series[k] for k in keys}
    siemens_scout = vendor == "siemens" and series["loc"].description.startswith("AAHead")

    # Poses: one head placement per study, then each acquisition its own motion.
    offset = r.uniform([-8, -15, -20], [8, 15, 20])
    poses = {}
    for k in acquired:
        p = np.eye(4)
        p[:3, :3] = _rotation(r.uniform(-6, 6, 3))
        p[:3, 3] = offset + r.uniform(-8, 8, 3)
        poses[k] = p
    for k, ds in derived.items():
        for d in ds:
            poses[d] = poses[k]

    # Obliques: in some studies one or two acquisitions tilted 10-20°.
    oblique = {}
    if r.random() < 0.45:
        cand = ["t1ce", "t2", "flair", "dwi"] + ([] if plan["t1_3d"] else ["t1"])
        for k in r.choice(cand, size=int(r.integers(1, 3)), replace=False):
            oblique[str(k)] = float(r.uniform(10, 20))

    def world(pts, key):
        return transform_points(poses[key], pts)

    def plan_grid(key, plane, inplane, thick, gap, acq, fov, keys_sharing=None):
        ks = keys_sharing or [key]
        return _plan(r, plane, inplane * sf, thick * sf, gap * sf, acq, [world(head.head_pts, k) for k in ks],
                     [world(head.brain_pts, k) for k in ks], fov, oblique.get(key, 0.0),
                     point_margin=3.0 * float(csp.max()))

    ce_in = float(_pick(r, (1.0, 1.0, 0.9375, 0.9)))
    ce_keys = ["t1ce", "t1"] if plan["t1_3d"] else ["t1ce"]
    series["t1ce"].grids = [plan_grid("t1ce", plan["t1ce_plane"], ce_in, 1.0, 0.0, "3D",
                                      256.0 if plan["t1ce_plane"] == "sag" else 240.0, ce_keys)]
    if plan["t1_3d"]:
        series["t1"].grids = list(series["t1ce"].grids)
    else:
        th = float(_pick(r, (5.0, 5.0, 6.0)))
        gap = float(_pick(r, (0.0, 0.5, 1.0))) if th == 5.0 else 0.0      # slices every 5-6 mm
        series["t1"].grids = [plan_grid("t1", "tra", round(230 / 256, 6), th, gap, "2D", 230.0)]
    t2_in = float(_pick(r, (230 / 512, 240 / 512, 256 / 512)))
    th = float(_pick(r, (4.0, 5.0)))
    series["t2"].grids = [plan_grid("t2", "tra", round(t2_in, 6), th, th * float(_pick(r, (0.0, 0.1, 0.2))), "2D",
                                    230.0)]
    if plan["flair_3d"]:
        series["flair"].grids = [plan_grid("flair", "sag", 1.0, 1.0, 0.0, "3D", 250.0)]
    else:
        series["flair"].grids = [plan_grid("flair", "tra", round(230 / 256, 6), 5.0, float(_pick(r, (0.0, 0.5, 1.0))),
                                           "2D", 230.0)]
    dwi_in = float(_pick(r, (230 / 192, 230 / 128, 240 / 160)))
    th = float(_pick(r, (4.0, 5.0)))
    series["dwi"].grids = [plan_grid("dwi", "tra", round(dwi_in, 6), th, th * float(_pick(r, (0.0, 0.2))), "2D",
                                     230.0)]
    series["adc"].grids = list(series["dwi"].grids)
    if "t2star" in series:
        series["t2star"].grids = [plan_grid("t2star", "tra", round(230 / 256, 6), 5.0, 1.0, "2D", 230.0)]
    if "sub" in series:
        series["sub"].grids = list(series["t1ce"].grids)
    if "mpr" in series:
        th = float(_pick(r, (1.0, 2.0, 3.0)))
        series["mpr"].grids = [_plan(r, plan["mpr_plane"], 1.0 * sf, th * sf, 0.0, "2D",
                                     [world(head.head_pts, "t1ce")], [world(head.brain_pts, "t1ce")],
                                     240.0, slab="head", point_margin=3.0 * float(csp.max()))]
    iso = offset + np.array([0.0, 0.0, r.uniform(-10, 10)])
    loc_grids = _localizer_grids(r, sf, iso, 5 if siemens_scout else 3)

    # Numbers, UIDs and times.
    start = float(r.uniform(7.5, 17.5) * 3600)
    t = start
    number = 2 if siemens_scout else 1     # the 3D scout itself (1) is not exported
    n_acq = 0
    for k in keys:
        ser = series[k]
        ser.pose = poses[k]
        if ser.derived_from is None:
            n_acq += 1
            if k == "t1ce":
                t += r.uniform(60, 180)   # contrast injection
            ser.time = ser.acq_time = t
            t += _durations(k, ser.grids[0].acquisition if ser.grids else "2D") + r.uniform(15, 70)
            if vendor == "philips":
                ser.number = 100 * n_acq + 1
            else:
                ser.number = number
                number += 3 if (k == "loc" and siemens_scout) else 1
        else:
            src = series[ser.derived_from]
            ser.time = src.time + _durations(src.key, src.grids[0].acquisition) + 5
            ser.acq_time = src.acq_time
            nth = derived[ser.derived_from].index(k) + 1
            if vendor == "siemens":
                ser.number = number
                number += 1
            elif vendor == "ge":
                ser.number = 100 * src.number + nth - 1
            else:
                ser.number = src.number + nth
        ser.uid = _uid(seed, index, k)
        if ser.post and agent_tag:
            ser.tags["ContrastBolusAgent"] = _pick(r, ("Gadovist", "DOTAREM", "MultiHance", "Gd-DTPA",
                                                       "10 ml Gadovist"))
    date = f"{int(r.integers(2015, 2025))}{int(r.integers(1, 13)):02d}{int(r.integers(1, 29)):02d}"
    patient_id = f"SYN{int(r.integers(10**7)):07d}"
    uids = {"StudyInstanceUID": _uid(seed, index, "study"), "FrameOfReferenceUID": _uid(seed, index, "frame")}
    study_tags = {
        "Manufacturer": _pick(r, _VENDOR[vendor]["manufacturer"]), "ManufacturerModelName": model,
        "MagneticFieldStrength": field_t, "ImagingFrequency": round(42.577 * field_t, 4),
        "InstitutionName": "SYNTHETIC HOSPITAL", "StationName": f"MR{int(r.integers(1, 9))}",
        "StudyDescription": _pick(r, _VENDOR[vendor]["study"]), "StudyDate": date, "SeriesDate": date,
        "AcquisitionDate": date, "ContentDate": date, "StudyTime": _tm(start - 60),
        "StudyID": str(int(r.integers(1000, 99999))), "AccessionNumber": f"A{int(r.integers(10**8)):08d}",
        "PatientName": f"SYNTHETIC^PATIENT{index:05d}", "PatientSex": _pick(r, ("M", "F")),
        "PatientAge": f"{int(r.integers(25, 85)):03d}Y", "PatientPosition": "HFS",
        "BodyPartExamined": _pick(r, ("HEAD", "BRAIN")), "NumberOfAverages": 1,
    }

    # Render and write each series.
    acq_rng = np.random.default_rng([seed, index, 13])
    lo_s, hi_s = _SCANNER_SCALE[vendor]
    writer = _Writer(out, sid, np.random.default_rng([seed, index, 14]), layout, formats, study_tags, uids,
                     patient_id)
    kept: dict[str, tuple] = {}
    truth_roles: dict[str, dict] = {}
    distractors = []
    import torch
    head_bias_pts = head.head_pts[np.random.default_rng([seed, index, 15]).choice(
        len(head.head_pts), size=min(len(head.head_pts), 1500), replace=False)]
    try:
        same_rng = np.random.default_rng([seed, index, 17])    # T1 and T1ce of one 3D protocol
        same_slope = float(same_rng.integers(40, 200)) / 64.0 if vendor == "philips" else 1.0
        same_scale = float(same_rng.uniform(lo_s, hi_s)) / 1.3 / same_slope
        for n_done, k in enumerate(keys):
            ser = series[k]
            slope = float(acq_rng.integers(40, 200)) / 64.0 if vendor == "philips" else 1.0
            vols: list[tuple[np.ndarray, _Grid, dict]] = []
            bvals = None
            sc = float(acq_rng.uniform(lo_s, hi_s)) / 1.3 / slope
            if k in ("t1", "t1ce") and plan["t1_3d"]:
                # the same sequence twice: same coil profile, receiver scale and slope
                slope, sc = same_slope, same_scale * (float(acq_rng.uniform(0.98, 1.02)) if k == "t1ce" else 1.0)
            if k == "loc":
                for g in loc_grids:
                    img = _render(head, "t1", g, ser.pose)
                    img *= _bias(acq_rng, g, world(head_bias_pts, k))
                    img = _rician(acq_rng, img, 0.04)
                    vols.append((_quantize(img, sc), g, {}))
            elif k in ("t1", "t1ce", "t2", "flair", "t2star"):
                g = ser.grids[0]
                img = _render(head, k, g, ser.pose)
                same = k in ("t1", "t1ce") and plan["t1_3d"]
                brng = np.random.default_rng([seed, index, 16]) if same else acq_rng
                img *= _bias(brng, g, world(head_bias_pts, k))
                img = _rician(acq_rng, img, _NOISE[k] * float(acq_rng.uniform(0.6, 1.4)))
                vols.append((_quantize(img, sc), g, {}))
            elif k == "dwi":
                g = ser.grids[0]
                b0 = _render(head, "b0", g, ser.pose)
                b1 = _render(head, "dwi", g, ser.pose)
                bias = _bias(acq_rng, g, world(head_bias_pts, k))
                sigma = _NOISE["dwi"] * float(acq_rng.uniform(0.7, 1.3))
                b0 = _rician(acq_rng, b0 * bias, sigma)
                b1 = _rician(acq_rng, b1 * bias, sigma)
                q0, q1 = _quantize(b0, sc), _quantize(b1, sc)
                kept["dwi"] = (b0, b1, sigma)
                it = list(ser.tags["ImageType"])
                trace = {"DiffusionBValue": 1000.0, "ImageType": it}
                if vendor == "siemens":
                    trace["SequenceName"] = "*ep_b1000t"
                if dwi_b0:
                    none = {"DiffusionBValue": 0.0, "ImageType": [("NONE" if v == "TRACEW" else v) for v in it]}
                    if vendor == "siemens":
                        none["SequenceName"] = "*ep_b0"
                    vols += [(q0, g, none), (q1, g, trace)]
                    bvals = [0.0, 1000.0]
                else:
                    vols.append((q1, g, trace))
                    bvals = [1000.0]
            elif k == "adc":
                b0, b1, sigma = kept.pop("dwi")
                with np.errstate(divide="ignore", invalid="ignore"):
                    adc = np.log(np.maximum(b0, 1e-6) / np.maximum(b1, 1e-6)) * 1000.0
                adc = np.where(b0 > 6 * sigma, np.clip(adc, 0, 4000), 0)
                slope = 1.0
                vols.append((np.rint(adc).astype(np.int16), ser.grids[0], {}))
            elif k == "sub":
                (c, sl), (p, _) = kept["t1ce"], kept["t1"]
                slope = sl
                vols.append((np.clip(c.astype(np.int32) - p.astype(np.int32), 0, 32767).astype(np.int16),
                             ser.grids[0], {}))
            elif k == "mpr":
                c, sl = kept["t1ce"]
                src = series["t1ce"].grids[0]
                g = ser.grids[0]
                n_sub = max(1, int(round(g.thickness / src.spacing.min())))
                offs = [((m + 0.5) / n_sub - 0.5) * g.thickness / g.spacing[2] for m in range(n_sub)]
                vol = torch.from_numpy(c.astype(np.float32))[None, None]
                img = _sample(vol, np.linalg.inv(src.affine) @ g.affine, g.shape, offs, padding="zeros")
                slope = sl
                vols.append((np.clip(np.rint(img), 0, 32767).astype(np.int16), g, {}))
            if (k == "t1" and present["sub"]) or (k == "t1ce" and (present["sub"] or present["mpr"])):
                kept[k] = (vols[0][0], slope)
            later = {_KINDS.get(x, x) for x in keys[n_done + 1:]}
            for kind in [x for x in head.images if x != "classes" and x not in later and x != "b0"]:
                head.images.pop(kind)
            if "dwi" not in keys[n_done + 1:]:
                head.images.pop("b0", None)

            if siemens_scout and k == "loc":
                base_no, base_desc = ser.number, ser.description
                for j, (pl, vol) in enumerate(zip(("sag", "cor", "tra"), vols)):
                    sub_ser = _Series("loc", "localizer", f"{base_desc}_MPR_{pl}", ser.protocol,
                                      {**ser.tags, "ImageType": ["DERIVED", "PRIMARY", "MPR", "NORM", "DIS3D"]},
                                      derived_from=None, pose=ser.pose, number=base_no + j,
                                      uid=_uid(seed, index, f"loc{j}"), time=ser.time + j,
                                      acq_time=ser.acq_time + j)
                    sub_ser.grids = [vol[1]]
                    _emit(writer, sub_ser, [vol], 1.0, None, formats, distractors)
            else:
                ser.grids = ser.grids or [v[1] for v in vols]
                _emit(writer, ser, vols, slope, bvals, formats, distractors)
            if ser.role:
                truth_roles[ser.role] = ser
    finally:
        writer.close()

    # Truth on each role's native grid, and the atlas-space case.
    tdir = out / "truth" / sid
    roles = {}
    for role in ROLES:
        ser = truth_roles[role]
        g = ser.grids[0]
        cls = _truth_classes(head, g, ser.pose)
        labels = synth.SynthCase(None, cls, g.affine, ("R", "A", "S"), case.grade).labels("brats2023")
        brain = ((cls > 0) & (cls <= synth.NET)).astype(np.uint8)
        write_nifti(labels, g.affine, tdir / f"labels_{role}.nii.gz", intent="label", cal=(0.0, 3.0),
                    descrip="medseg synth_raw truth labels=brats2023")
        write_nifti(brain, g.affine, tdir / f"brain_{role}.nii.gz", intent="label", cal=(0.0, 1.0),
                    descrip="medseg synth_raw truth brain")
        roles[role] = {**_series_record(ser), "labels": f"labels_{role}.nii.gz", "brain": f"brain_{role}.nii.gz"}
    _write_atlas_case(case, tdir / "atlas", sid)
    lab = case.labels("brats2023")
    vox_ml = float(np.prod(csp)) / 1000.0
    tumour = np.argwhere(lab > 0)
    truth = {
        "study_id": sid, "seed": seed, "index": index, "scale": scale,
        "phantom": {"seed": seed, "patient": patient, "timepoint": 0, "shape": list(shape), "grade": case.grade,
                    "brain_volume_ml": float((case.classes > 0).sum() * vox_ml),
                    "tumour_volume_ml": float(len(tumour) * vox_ml),
                    "tumour_centroid_mm": transform_points(case.affine, tumour.mean(0)[None])[0].tolist()
                    if len(tumour) else None},
        "vendor": vendor, "manufacturer": study_tags["Manufacturer"], "model": model, "field_strength": field_t,
        "layout": layout, "patient_id": patient_id, "study_uid": uids["StudyInstanceUID"],
        "frame_of_reference_uid": uids["FrameOfReferenceUID"], "contrast_agent_tag": agent_tag,
        "formats": list(formats), "roles": roles, "distractors": distractors,
        "atlas_case": f"atlas/{sid}",
    }
    write_json(truth, tdir / "truth.json")
    return truth


def _emit(writer: _Writer, ser: _Series, vols, slope, bvals, formats, distractors: list) -> None:
    if "dicom" in formats:
        writer.dicom(ser, vols, slope)
    if "nifti" in formats:
        writer.nifti_files(ser, vols, slope, bvals)
    if ser.role is None:
        distractors.append({**_series_record(ser), "kind": ser.kind})


def _series_record(ser: _Series) -> dict:
    g = ser.grids[0]
    rec = {"series_uid": ser.uid, "series_number": ser.number, "series_description": ser.description,
           "protocol_name": ser.protocol, "affine": np.round(g.affine, 6).tolist(), "shape": list(g.shape),
           "world_from_canonical": np.round(ser.pose, 9).tolist(), "plane": g.plane,
           "acquisition": g.acquisition, "spacing": np.round(g.spacing, 6).tolist(),
           "slice_thickness": g.thickness, "oblique_deg": round(g.oblique, 3),
           "post_contrast": ser.post, "files": list(ser.files), "nifti": list(ser.nifti)}
    if len(ser.grids) > 1:
        rec["stacks"] = [{"affine": np.round(x.affine, 6).tolist(), "shape": list(x.shape), "plane": x.plane}
                         for x in ser.grids]
    return rec


def _uid(seed: int, index: int, what: str) -> str:
    from pydicom.uid import generate_uid
    return str(generate_uid(entropy_srcs=["medseg-synth-raw", str(seed), str(index), what]))


def _write_atlas_case(case: synth.SynthCase, root: Path, cid: str) -> None:
    """The phantom as `synth.synthesize` writes a BraTS 2023 case."""
    lay = LAYOUTS["brats2023"]
    for ch, img in zip(synth.CHANNELS, case.images):
        data, aff = synth._storage(np.round(img).astype(np.int16), case.affine, case.orientation)
        write_nifti(data, aff, root / cid / f"{cid}{lay.sep}{lay.keys[ch]}.nii.gz")
    data, aff = synth._storage(case.labels(lay.convention), case.affine, case.orientation)
    write_nifti(data, aff, root / cid / f"{cid}{lay.sep}{lay.label_key}.nii.gz")


# ------------------------------------------------------------------- public API
def synthesize_raw(out: str | Path, n_studies: int, seed: int = 0, scale: str = "full",
                   formats=("dicom",), progress=None) -> list[dict]:
    """Write `n_studies` raw scanner studies and their truth under `out` (see the
    module docstring for the layout) → one dict per study, as `load_truth` returns
    it. Refuses a folder that already holds files."""
    if scale not in SCALES:
        raise MedsegError(f"unknown scale {scale!r}; expected one of {', '.join(SCALES)}")
    if n_studies < 1:
        raise MedsegError(f"n_studies must be at least 1, found {n_studies}")
    formats = tuple(formats)
    bad = [f for f in formats if f not in ("dicom", "nifti")]
    if bad or not formats:
        raise MedsegError(f"formats must be one or both of 'dicom', 'nifti', found {formats}")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise MedsegError(f"{out}: folder is not empty; medseg never overwrites data: "
                          "choose a new output folder or remove this one")
    out.mkdir(parents=True, exist_ok=True)
    result = []
    for i in range(n_studies):
        truth = _study(out, seed, i, scale, formats)
        result.append(load_truth(out, truth["study_id"]))
        if progress is not None:
            progress(i + 1, n_studies, truth["study_id"])
    return result


def load_truth(out: str | Path, study_id: str) -> dict:
    """truth.json of one study, with numpy 4 × 4 matrices (`affine`,
    `world_from_canonical`) and absolute paths added: `study_dir`, `nifti_dir`,
    `truth_dir`, `atlas_dir`, and per role `labels_path`, `brain_path`, `dicom_files`
    and `nifti_files`."""
    out = Path(out)
    tdir = out / "truth" / study_id
    path = tdir / "truth.json"
    if not path.is_file():
        raise MedsegError(f"{path}: no truth for study {study_id!r}; expected a folder written by synthesize_raw")
    truth = json.loads(path.read_text())
    study, nifti = out / "studies" / study_id, out / "studies_nifti" / study_id
    truth.update({"study_dir": str(study), "nifti_dir": str(nifti), "truth_dir": str(tdir),
                  "atlas_dir": str(tdir / truth["atlas_case"])})
    for rec in [*truth["roles"].values(), *truth["distractors"]]:
        rec["affine"] = np.asarray(rec["affine"], np.float64)
        rec["world_from_canonical"] = np.asarray(rec["world_from_canonical"], np.float64)
        rec["dicom_files"] = [str(study / f) for f in rec["files"]]
        rec["nifti_files"] = [str(nifti / f) for f in rec["nifti"]]
    for role, rec in truth["roles"].items():
        rec["labels_path"], rec["brain_path"] = str(tdir / rec["labels"]), str(tdir / rec["brain"])
    return truth


def brain_surface_points(mask: np.ndarray, affine: np.ndarray, n: int = 2000, seed: int = 0) -> np.ndarray:
    """(n, 3) points (mm through `affine`) on the boundary of `mask`: midpoints of
    the faces between a voxel inside and its neighbour outside, drawn at random."""
    mask = np.asarray(mask, bool)
    pts = []
    for a in range(3):
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[a], hi[a] = slice(0, -1), slice(1, None)
        edge = mask[tuple(lo)] != mask[tuple(hi)]
        idx = np.argwhere(edge).astype(np.float64)
        idx[:, a] += 0.5
        pts.append(idx)
    pts = np.concatenate(pts)
    if not len(pts):
        raise MedsegError("the mask is empty: no brain surface")
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(pts), size=n, replace=len(pts) < n)
    return transform_points(affine, pts[pick])


def canonical_points_on_brain_surface(out: str | Path, study_id: str, n: int = 2000, seed: int = 0) -> np.ndarray:
    """(n, 3) points (mm, canonical frame) on the true brain surface of a study,
    from its atlas-space case (brain = T1 > 0, as the phantom is skull-stripped).
    `transform_points(truth["roles"][role]["world_from_canonical"], points)` puts
    them where they are in that series' scanner frame."""
    truth = load_truth(out, study_id)
    img = nib.load(str(Path(truth["atlas_dir"]) / f"{study_id}-t1n.nii.gz"))
    return brain_surface_points(np.asarray(img.dataobj) > 0, img.affine, n, seed)


def surface_error_mm(points: np.ndarray, world_from_canonical_a, world_from_canonical_b,
                     b_from_a_estimate) -> np.ndarray:
    """Registration error (mm) per canonical point: where an estimated transform
    from series a's world coordinates to series b's puts each point against where
    the true poses put it."""
    pa = transform_points(world_from_canonical_a, points)
    return np.linalg.norm(transform_points(b_from_a_estimate, pa) - transform_points(world_from_canonical_b, points),
                          axis=1)
