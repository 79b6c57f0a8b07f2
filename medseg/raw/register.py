"""Into the model's space and back: bias correction, co-registration, brain
extraction and atlas registration of a raw study (SimpleITK; torch-free).

The BraTS pre-processing, step by step, each step a SimpleITK filter or
registration method (no hand-written optimiser):

1. **N4 bias correction** (`n4`) of every series, fitted on a copy shrunk to about
   4 mm (the field is smooth) inside the head mask and applied at full resolution.
2. **Rigid co-registration** of T1, T2 and FLAIR to the T1ce (`rigid`): Mattes
   mutual information, three resolutions (8, 4, 2 mm smoothing/shrinking… to the
   series' own voxels), regular-step gradient descent on an Euler transform
   started from the scanner's shared frame of reference (the series of one
   study are already close: only patient motion separates them); the metric samples
   the series with the thicker slices and interpolates the other.
3. **Brain extraction** (`brain_mask`, the built-in extractor, then `peel_brain`): see
   their docstrings.
4. **Atlas registration** of the skull-stripped T1ce to the atlas's T1 brain
   (`to_atlas`): affine, mutual information, started from the brains' centres of
   mass; the atlas files come from an installed package (`atlas_files`).
5. **Resampling** of the four bias-corrected, skull-stripped series onto the atlas
   grid through the composed transforms (one interpolation per series).

And back (`to_native`): maps on the atlas grid are resampled onto a reference
series' native grid through the inverse transforms — probabilities, not labels
(the caller thresholds them there).

Coordinates: medseg arrays are `(X, Y, Z)` volumes with a RAS affine (nibabel);
SimpleITK works in LPS. `to_sitk`/`from_sitk` convert. A registration transform
maps points of the fixed image's space to the moving image's space (ITK's
convention), so `Resample(moving, fixed_grid, T)` brings the moving image onto
the fixed grid.
"""

from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from medseg.errors import MedsegError

__all__ = ["ATLASES", "atlas_files", "to_sitk", "from_sitk", "n4", "head_mask", "rigid", "to_atlas",
           "brain_mask", "peel_brain", "resample", "transform_matrix", "affine_transform", "Registration"]

_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])

#: Built-in atlases: name → (package, file inside it, description). MNI152 (ICBM 2009c
#: nonlinear symmetric, 1 mm, skull-stripped T1) ships in nilearn's wheel.
ATLASES = {
    "mni152": ("nilearn", "datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
               "ICBM 2009c nonlinear symmetric MNI152 T1 brain, 1 mm (from nilearn)"),
}


def atlas_files(name: str) -> tuple[Path, str]:
    """An atlas name (`ATLASES`) or a NIfTI file of a skull-stripped T1 atlas →
    (its path, a description). Nothing is downloaded."""
    if name in ATLASES:
        pkg, rel, desc = ATLASES[name]
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.submodule_search_locations:
            raise MedsegError(f"atlas {name!r} comes from the {pkg} package, which is not installed: "
                              f"pip install {pkg}")
        path = Path(list(spec.submodule_search_locations)[0]) / rel
        if not path.is_file():
            raise MedsegError(f"atlas {name!r}: {path} not found in the installed {pkg}; reinstall it "
                              f"(pip install --force-reinstall {pkg})")
        return path, desc
    path = Path(name)
    if path.suffix in (".nii", ".gz") and path.is_file():
        return path, f"user atlas {path.name}"
    if name.lower() == "sri24":
        raise MedsegError("the SRI24 atlas is not shipped with medseg (no installable package carries "
                          "it): pass its skull-stripped T1 file, --atlas /path/to/sri24_t1_brain.nii.gz")
    raise MedsegError(f"atlas {name!r}: expected one of {', '.join(ATLASES)} or a NIfTI file of a "
                      "skull-stripped T1 atlas")


# ----------------------------------------------------------------- conversion
def to_sitk(vol: np.ndarray, affine: np.ndarray) -> sitk.Image:
    """`(X, Y, Z)` array with a RAS affine → a float32 SimpleITK image."""
    lps = _LPS @ np.asarray(affine, np.float64)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(vol, np.float32).T))
    img.SetSpacing([float(s) for s in spacing])
    img.SetOrigin([float(v) for v in lps[:3, 3]])
    img.SetDirection([float(v) for v in (lps[:3, :3] / spacing).ravel()])
    return img


def from_sitk(img: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """A SimpleITK image → (`(X, Y, Z)` array, RAS affine)."""
    d = np.asarray(img.GetDirection(), np.float64).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = d * np.asarray(img.GetSpacing())
    lps[:3, 3] = img.GetOrigin()
    return sitk.GetArrayFromImage(img).T, _LPS @ lps


def transform_matrix(t: sitk.Transform) -> np.ndarray:
    """A linear SimpleITK transform (LPS, fixed → moving points) → its 4×4 RAS matrix."""
    pts = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], np.float64)
    out = np.array([t.TransformPoint(tuple(float(v) for v in p)) for p in pts])
    m = np.eye(4)
    m[:3, 3] = out[0]
    m[:3, :3] = (out[1:] - out[0]).T
    return _LPS @ m @ _LPS


def affine_transform(m_ras: np.ndarray, centre=None) -> sitk.AffineTransform:
    """A 4×4 RAS point map → the same map as a SimpleITK (LPS) affine transform,
    parameterised about `centre` (LPS mm; default the origin)."""
    m = _LPS @ np.asarray(m_ras, np.float64) @ _LPS
    a, t = m[:3, :3], m[:3, 3]
    c = np.zeros(3) if centre is None else np.asarray(centre, np.float64)
    out = sitk.AffineTransform(3)
    out.SetMatrix([float(v) for v in a.ravel()])
    out.SetCenter([float(v) for v in c])
    out.SetTranslation([float(v) for v in t - c + a @ c])
    return out


# ----------------------------------------------------------------- steps
def _shrink_factors(img: sitk.Image, target_mm: float) -> list[int]:
    return [max(1, int(round(target_mm / s))) for s in img.GetSpacing()]


def head_mask(img: sitk.Image, work_mm: float = 2.5) -> sitk.Image:
    """The head: Otsu foreground, its largest connected component, closed and
    hole-filled (uint8), found on a copy shrunk to about `work_mm` and mapped back
    onto `img`'s grid."""
    small = sitk.Shrink(img, _shrink_factors(img, work_mm))
    fg = sitk.OtsuThreshold(small, 0, 1, 128)
    cc = sitk.RelabelComponent(sitk.ConnectedComponent(fg), sortByObjectSize=True)
    big = sitk.Cast(cc == 1, sitk.sitkUInt8)
    radius = [max(1, int(round(4.0 / s))) for s in small.GetSpacing()]
    closed = sitk.BinaryFillhole(sitk.BinaryMorphologicalClosing(big, radius))
    return sitk.Cast(resample(closed, img, None, linear=False) > 0.5, sitk.sitkUInt8)


def n4(img: sitk.Image, mask: sitk.Image | None = None, shrink_mm: float = 6.0,
       iterations: tuple[int, ...] = (40, 30)) -> sitk.Image:
    """N4 bias correction: fitted at about `shrink_mm` inside `mask` (default: the
    head) with two fitting levels (4 and 8 control points per axis: the field of a
    head coil is smooth), applied at full resolution → float32 corrected image."""
    img = sitk.Cast(img, sitk.sitkFloat32)
    img = sitk.Maximum(img, 1e-3)
    mask = head_mask(img) if mask is None else mask
    factors = _shrink_factors(img, shrink_mm)
    small, small_mask = sitk.Shrink(img, factors), sitk.Shrink(mask, factors)
    f = sitk.N4BiasFieldCorrectionImageFilter()
    f.SetMaximumNumberOfIterations(list(iterations))
    f.Execute(small, small_mask)
    # The field is smooth: evaluated on the shrunk grid, interpolated onto the full one.
    field = resample(f.GetLogBiasFieldAsImage(small), img, None, linear=True)
    return sitk.Cast(img / sitk.Exp(field), sitk.sitkFloat32)


def _register(fixed: sitk.Image, moving: sitk.Image, initial: sitk.Transform,
              fixed_mask: sitk.Image | None, levels_mm: tuple[float, ...], iterations: int,
              samples: int, seed: int) -> tuple[sitk.Transform, float]:
    """Multi-resolution Mattes MI registration. Both images are first averaged down to
    about the finest level's voxel size (`levels_mm[-1]`; a thick-slice axis stays as
    it is), so the pyramid never smooths millions of voxels it would not use."""
    finest = levels_mm[-1]
    fixed = sitk.BinShrink(fixed, _shrink_factors(fixed, finest))
    moving = sitk.BinShrink(moving, _shrink_factors(moving, finest))
    if fixed_mask is not None:
        fixed_mask = sitk.Cast(resample(fixed_mask, fixed, None, linear=False) > 0.5, sitk.sitkUInt8)
    r = sitk.ImageRegistrationMethod()
    r.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    r.SetMetricSamplingStrategy(r.RANDOM)
    r.SetInterpolator(sitk.sitkLinear)
    r.SetOptimizerAsRegularStepGradientDescent(learningRate=2.0, minStep=1e-3, numberOfIterations=iterations,
                                               relaxationFactor=0.6, gradientMagnitudeTolerance=1e-6)
    r.SetOptimizerScalesFromPhysicalShift()
    sp = min(fixed.GetSpacing())
    shrink = [max(1, int(round(l / sp))) for l in levels_mm]
    r.SetShrinkFactorsPerLevel(shrink)
    r.SetSmoothingSigmasPerLevel([l / 2.0 if l > finest else 0.0 for l in levels_mm])
    r.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    # About `samples` metric points per level, whatever the image size.
    n = float(np.prod(fixed.GetSize()))
    if fixed_mask is not None:
        n *= max(float(np.asarray(sitk.GetArrayViewFromImage(fixed_mask)).mean()), 0.05)
        r.SetMetricFixedMask(fixed_mask)
    r.SetMetricSamplingPercentagePerLevel([min(1.0, samples * f ** 3 / n) for f in shrink], seed)
    r.SetInitialTransform(initial, inPlace=False)
    out = r.Execute(fixed, moving)
    return out, float(r.GetMetricValue())


def _centre(img: sitk.Image) -> tuple[float, ...]:
    size = np.asarray(img.GetSize(), np.float64)
    return img.TransformContinuousIndexToPhysicalPoint(tuple(float(v) for v in (size - 1) / 2))


def rigid(fixed: sitk.Image, moving: sitk.Image, fixed_mask: sitk.Image | None = None,
          same_frame: bool = True, seed: int = 1, moving_mask: sitk.Image | None = None
          ) -> tuple[sitk.Transform, float]:
    """Rigid (Euler) registration of `moving` to `fixed` by Mattes mutual information
    → (transform fixed → moving points, final metric value: negative MI).
    `same_frame`: the series share the scanner's frame of reference, so the identity
    is the start; otherwise the images' centres of mass are aligned first.

    The metric samples the coarser image's grid and interpolates the finer one: a
    thick-slice series interpolated between slices 4-6 mm apart gives mutual
    information grid-aligned local optima (1-3 mm off on the generated studies,
    against about 0.3 mm this way round). So when `moving` has the thicker slices
    the roles swap (`moving_mask`, default its head mask, restricts the samples)
    and the inverse comes back."""
    if max(moving.GetSpacing()) > 1.5 * max(fixed.GetSpacing()):
        mask = moving_mask if moving_mask is not None else sitk.BinaryDilate(head_mask(moving), [2, 2, 1])
        t, metric = rigid(moving, fixed, mask, same_frame=same_frame, seed=seed)
        return t.GetInverse(), metric
    if same_frame:
        init = sitk.Euler3DTransform()
        init.SetCenter(_centre(fixed))
    else:
        init = sitk.CenteredTransformInitializer(fixed, moving, sitk.Euler3DTransform(),
                                                 sitk.CenteredTransformInitializerFilter.MOMENTS)
    return _register(fixed, moving, init, fixed_mask, (8.0, 4.0, 2.0), 100, 20000, seed)


def to_atlas(atlas: sitk.Image, brain: sitk.Image, atlas_mask: sitk.Image | None = None,
             seed: int = 1, initial: sitk.Transform | None = None) -> tuple[sitk.Transform, float]:
    """Affine registration of a skull-stripped image to the atlas brain → (transform
    atlas → image points, final metric value), started from `initial` or else from
    the centres of mass."""
    init = (affine_transform(transform_matrix(initial), _centre(atlas)) if initial is not None else
            sitk.CenteredTransformInitializer(atlas, brain, sitk.AffineTransform(3),
                                              sitk.CenteredTransformInitializerFilter.MOMENTS))
    levels = (8.0, 4.0, 2.0) if initial is None else (4.0, 2.0)
    return _register(atlas, brain, init, atlas_mask, levels, 150, 30000, seed)


def resample(img: sitk.Image, reference: sitk.Image, transform: sitk.Transform | None = None,
             linear: bool = True, default: float = 0.0) -> sitk.Image:
    """`img` on `reference`'s grid through `transform` (reference → img points)."""
    t = transform if transform is not None else sitk.Transform(3, sitk.sitkIdentity)
    return sitk.Resample(img, reference, t, sitk.sitkLinear if linear else sitk.sitkNearestNeighbor,
                         default, sitk.sitkFloat32)


def _percentile(img: sitk.Image, mask: sitk.Image, q: float) -> float:
    """The `q`th percentile of `img` inside `mask` (1.0 for an empty mask)."""
    a, m = sitk.GetArrayViewFromImage(img), sitk.GetArrayViewFromImage(mask) > 0
    return float(np.percentile(a[m], q)) if m.any() else 1.0


def _robust_scale(img: sitk.Image, mask: sitk.Image) -> sitk.Image:
    """Divide by the 95th percentile inside `mask` (for sequence-independent thresholds)."""
    return img / max(_percentile(img, mask, 95), 1e-6)


def _component_holding(mask: sitk.Image, deep: sitk.Image) -> sitk.Image | None:
    """The connected component of `mask` that holds the most of `deep` (None if none)."""
    cc = sitk.ConnectedComponent(mask)
    stats = sitk.LabelStatisticsImageFilter()
    stats.Execute(sitk.Cast(deep, sitk.sitkFloat32), cc)
    labels = [l for l in stats.GetLabels() if l != 0]
    if not labels:
        return None
    return sitk.Cast(cc == max(labels, key=lambda l: stats.GetSum(l)), sitk.sitkUInt8)


def _distance(mask: sitk.Image) -> sitk.Image:
    """Signed distance (mm) to the mask's surface: negative inside."""
    return sitk.SignedMaurerDistanceMap(sitk.Cast(mask > 0, sitk.sitkUInt8), insideIsPositive=False,
                                        squaredDistance=False, useImageSpacing=True)


def _erode(mask: sitk.Image, mm: float) -> sitk.Image:
    """The voxels farther than `mm` from every voxel outside the mask: the exact dual
    of `_dilate`, so a closing (dilate, then erode by the same) keeps the mask. (The
    signed map's inside distances run to the mask's own border voxels, a voxel short.)"""
    outside = sitk.Cast(sitk.Cast(mask > 0, sitk.sitkUInt8) == 0, sitk.sitkUInt8)
    return sitk.Cast(_distance(outside) > mm, sitk.sitkUInt8)


def _dilate(mask: sitk.Image, mm: float) -> sitk.Image:
    return sitk.Cast(_distance(mask) <= mm, sitk.sitkUInt8)


def _tissue(t1ce: sitk.Image, t2: sitk.Image | None, head: sitk.Image) -> sitk.Image:
    """Not bone, not air: T1ce + T2 (each over its 95th percentile in the head) above a threshold."""
    s = _robust_scale(t1ce, head)
    thr = 0.35
    if t2 is not None:
        s, thr = s + _robust_scale(t2, head), 0.55
    return sitk.Cast((s > thr) * head, sitk.sitkUInt8)


def brain_mask(t1ce: sitk.Image, t2: sitk.Image | None = None, head: sitk.Image | None = None,
               atlas_prior: sitk.Image | None = None, work_mm: float = 2.0) -> sitk.Image:
    """The built-in brain extractor (no download, no GPU): the brain is the tissue
    the skull encloses.

    Bone is dark on every sequence, brain and cerebrospinal fluid are not (CSF is
    bright on T2), so on the sum of the T1ce and T2 (each scaled by its 95th
    percentile in the head) a threshold keeps brain, CSF, marrow and scalp and
    drops bone and air. On a copy averaged to about `work_mm`: eroding that
    tissue by 5 mm cuts the bridges through the skull's foramina and the spinal
    canal; the component that holds the most of the head's deep interior (the
    head eroded by 20 mm) is the brain; it grows back by 8 mm within the tissue,
    and is closed (4 mm). With `atlas_prior` (the atlas brain mask mapped onto
    this grid) the tissue more than 8 mm outside it (eyes, spinal cord, neck) is
    dropped first. Back on the full grid, the surface is decided voxel by voxel
    within 2 mm of the coarse one (tissue or not), and holes are filled.
    Morphology runs on distance maps, in mm on any grid. Without a T2, CSF goes
    with the bone and the outer CSF is excluded.
    """
    head = head_mask(t1ce) if head is None else head
    f = _shrink_factors(t1ce, work_mm)
    small = sitk.BinShrink(t1ce, f)
    shrink_mask = lambda m: sitk.Cast(sitk.BinShrink(sitk.Cast(m > 0, sitk.sitkFloat32), f) > 0.5,  # noqa: E731
                                      sitk.sitkUInt8)
    head_s = shrink_mask(head)
    tissue = _tissue(small, sitk.BinShrink(t2, f) if t2 is not None else None, head_s)
    if atlas_prior is not None:
        tissue = tissue * _dilate(shrink_mask(atlas_prior), 8.0)
    # (The erosions here go one working voxel further than their figure: 5 mm + 1 voxel
    # to cut the bridges; the closing leaves the surface a voxel inside, which the
    # full-resolution step below then decides.)
    vox = min(small.GetSpacing())
    core = _erode(tissue, 5.0 + vox)
    deep = _erode(head_s, 20.0 + vox)
    best = _component_holding(core, deep)
    if best is None:
        raise MedsegError("brain extraction found no tissue inside the head: the T1ce series is empty "
                          "or not a head scan")
    brain = _dilate(best, 8.0) * tissue
    brain = _erode(_dilate(brain, 4.0), 4.0 + vox)
    # Full resolution: inside the coarse surface by > 2 mm: brain; within ±2 mm: tissue decides.
    d = resample(_distance(brain), t1ce, None, linear=True, default=1e3)
    fine = _tissue(t1ce, t2, head)
    full = (d < -2.0) | ((d < 2.0) * fine)
    return sitk.Cast(sitk.BinaryFillhole(sitk.Cast(full, sitk.sitkUInt8)), sitk.sitkUInt8)


#: peel_brain: the erosion that parts the brain from what touches it through the
#: skull (mm), and the geodesic regrowth after it (voxels).
_PEEL_CORE_MM, _PEEL_STEPS = 1.5, 3


def peel_brain(t1ce: sitk.Image, brain: sitk.Image, flair: sitk.Image | None = None,
               rim_mm: float = 1.0, close_mm: float = 3.0) -> sitk.Image:
    """The brain within `brain` (the tissue the skull encloses): the parenchyma and
    a `rim_mm` rim of the CSF over it, without the outer CSF and meninges, and
    without the diploë or fat that reached it through a thin spot of the skull.

    Grey and white matter are bright on the T1ce (over 0.55 of the deep brain's
    80th percentile, about white matter), CSF, meninges and bone are dark; oedema,
    about as dark as grey matter on the T1ce, is bright on FLAIR (when given, on
    the T1ce's grid). The T1ce (3D, about 1 mm) draws the dark band of meninges and
    inner skull table between the brain and the skull's marrow sharply: eroded by
    1.5 mm, the parenchyma's component holding the deep brain is the brain; it grows
    back three voxels along the parenchyma only (geodesic, so it does not jump the
    band), is closed by `close_mm` (sulci) and hole-filled (ventricles, necrosis).
    Runs on the mask's bounding box."""
    box = sitk.LabelShapeStatisticsImageFilter()
    box.Execute(sitk.Cast(brain > 0, sitk.sitkUInt8))
    if 1 not in box.GetLabels():
        return brain
    x0, y0, z0, sx, sy, sz = box.GetBoundingBox(1)
    pad = [int(np.ceil((close_mm + rim_mm + 2.0) / sp)) for sp in t1ce.GetSpacing()]
    lo = [max(0, v - p) for v, p in zip((x0, y0, z0), pad)]
    hi = [min(n, v + w + p) for v, w, p, n in zip((x0, y0, z0), (sx, sy, sz), pad, t1ce.GetSize())]
    size = [h - l for l, h in zip(lo, hi)]
    crop = lambda im: sitk.RegionOfInterest(im, size, lo)  # noqa: E731
    b = sitk.Cast(crop(brain) > 0, sitk.sitkUInt8)
    deep = _erode(b, 12.0)
    if not sitk.GetArrayViewFromImage(deep).any():
        return brain
    t = crop(sitk.Cast(t1ce, sitk.sitkFloat32))
    t = sitk.SmoothingRecursiveGaussian(t / max(_percentile(t, deep, 80), 1e-6), 0.5)
    par = t > 0.55
    if flair is not None:
        f = crop(sitk.Cast(flair, sitk.sitkFloat32))
        par = par | ((f / max(_percentile(f, deep, 50), 1e-6) > 1.4) & (t > 0.45))
    par = sitk.Cast(par * b, sitk.sitkUInt8)
    grown = _component_holding(_erode(par, _PEEL_CORE_MM), deep)
    if grown is None:
        return brain
    for _ in range(_PEEL_STEPS):
        grown = sitk.BinaryDilate(grown, [1, 1, 1]) * par
    grown = sitk.BinaryFillhole(_erode(_dilate(grown, close_mm), close_mm))
    out = sitk.Cast(_dilate(grown, rim_mm) * b, sitk.sitkUInt8)
    full = sitk.Image(brain.GetSize(), sitk.sitkUInt8)
    full.CopyInformation(brain)
    return sitk.Paste(full, out, out.GetSize(), [0, 0, 0], lo)


@dataclass
class Registration:
    """What one case went through: per role the transform T1ce → role (rigid, LPS),
    the atlas → T1ce transform, metric values and step times."""

    native: dict[str, sitk.Transform] = field(default_factory=dict)
    atlas: sitk.Transform | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def timed(self, step: str, t0: float) -> None:
        self.seconds[step] = round(self.seconds.get(step, 0.0) + time.perf_counter() - t0, 3)
