"""Synthetic BraTS-like dataset: brain-shaped multi-modal MRI with brain tumours.

The generator is medseg's built-in dataset for the demo and the tests. It writes
the real on-disk layouts (`medseg.data.discover`), so the same loaders serve real
and synthetic data.

Each case is modelled in millimetres (RAS, origin at the head's centre) inside
BraTS's 240 × 240 × 155 mm field of view and rendered on any grid:

* anatomy: a skull-stripped cerebrum with a folded cortical ribbon (grey matter),
  white matter, sulcal and surface CSF, the interhemispheric fissure, lateral
  and third ventricles, deep grey nuclei, cerebellum and brainstem;
* glioma: a lobulated mass in white matter; high-grade cases have a necrotic
  core inside an enhancing rim, low-grade cases a non-enhancing core and no
  enhancement; edema spreads into white matter and spares the cortex; the mass
  pushes the surrounding anatomy away (mass effect: ventricles compress, midline
  shifts);
* other BraTS tasks (`task`, one of `SYNTH_TASKS`), on the same anatomy:

  - ``gli2021``, ``gli2023`` (default): the adult glioma above;
  - ``ssa2023`` (sub-Saharan Africa): the same glioma, scanned with a lower
    contrast-to-noise ratio (noise × 1.6, a stronger bias field);
  - ``gli2024`` (post-treatment glioma), labelled as BraTS 2024 defines ET
    (thick or nodular enhancement, not the thin linear enhancement of a cavity
    wall): a lobulated fluid-filled resection cavity (RC) where the tumour was;
    1-3 enhancing nodules (ET, 5-12 mm, the larger ones sometimes necrotic) on
    its wall in about 60 % of cases (no ET at all in the others); thin (1-2 mm)
    postoperative enhancement along part of the wall in about 70 %, bright on
    T1ce but not labelled; residual non-enhancing tumour (NCR) as irregular
    patches beside the cavity in about half; edema around;
  - ``ped2024`` (paediatric): a solid tumour (NCR class), mostly in the
    posterior fossa or midline (cerebellum, brainstem, thalamus), patchy
    enhancement (ET) in about 60 %, one or two cysts (CC) inside or beside it in
    about 70 %, edema in most;
  - ``men2023`` (meningioma): an extra-axial enhancing dome on the brain's
    convexity, its base on the inner skull surface and pushing into the brain,
    with a dural tail (a thin enhancing strip along the surface), sometimes a
    small non-enhancing part (NCR), edema in the adjacent brain in about half;
  - ``met2023`` (metastases): 1-6 small lesions (2-12 mm radius) at the
    grey/white junction, solid or ring-enhancing (ET around NCR) and each with
    edema that can be large for the lesion's size;

* contrast per modality as in real MRI (table `_CONTRAST`, and `_CONTRAST_EXTRA`
  for the resection cavity and cysts): ET bright only on T1ce, edema bright on T2
  and FLAIR, CSF bright on T2 and dark on FLAIR, the cavity like CSF, cysts
  bright on T2 but less suppressed on FLAIR;
* acquisition: tissue texture, a smooth bias field per modality, Rician noise,
  a random intensity scale per modality, int16 storage, zero background;
* geometry: some cases stored in non-RAS orientations (LPS, PIR) or with thick
  slices (anisotropic spacing).

Random smooth fields are tensor-product cubic B-splines on a coarse grid fixed in
millimetres, so a case looks the same at any resolution, and a BraTS-size case
(240 × 240 × 155 at 1 mm) takes a few seconds. Everything is determined by
(seed, patient index, time point, task). The default task draws exactly the
random numbers it always drew, so existing datasets are reproduced bit for bit;
the other tasks draw their pathology from separate generators.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from medseg.data.discover import LAYOUTS
from medseg.data.io import atomic_path, write_json, write_nifti
from medseg.errors import MedsegError
from medseg.labels import CHANNELS, CLASS_COLOURS, CLASS_NAMES, get_convention

__all__ = ["FOV_MM", "DEMO_SHAPE", "SYNTH_TASKS", "TASK_CONVENTION", "SynthCase", "render_case",
           "synthesize", "save_preview"]

#: Physical field of view of every synthetic case (BraTS: 240 × 240 × 155 voxels of 1 mm).
FOV_MM = (240.0, 240.0, 155.0)
#: Default grid for fast CPU demos: 2.5 mm in-plane, about 2.4 mm slices.
DEMO_SHAPE = (96, 96, 64)

#: Tumour types the generator renders (see the module docstring).
SYNTH_TASKS = ("gli2021", "gli2023", "ssa2023", "gli2024", "ped2024", "men2023", "met2023")
#: Label convention of the tasks whose labels the layout's convention cannot hold
#: (brats2023 layout only); every other task writes the layout's convention.
TASK_CONVENTION = {"gli2024": "brats2024", "ped2024": "brats2024-ped"}
# BraTS 2023+ cohort named by the case ids of each task (brats2023 layout).
_TASK_COHORT = {"gli2021": "GLI", "gli2023": "GLI", "gli2024": "GLI", "ssa2023": "SSA",
                "ped2024": "PED", "men2023": "MEN", "met2023": "MET"}
# Tasks rendering the adult glioma (ssa2023 differs in the acquisition only).
_GLIOMA_TASKS = ("gli2021", "gli2023", "ssa2023")

# Tissue classes of the rendered class map.
BG, CSF, GM, WM, DGM, ED, NCR, ET, NET = range(9)
RC, CC = 9, 10  # resection cavity (gli2024), cystic component (ped2024)

# Mean intensity per class for (T1, T1ce, T2, FLAIR), WM ≈ 0.9 on T1. Worked
# example of why: on FLAIR CSF is suppressed (0.12) while edema is the brightest
# tissue (1.10); on T2 CSF is brightest (1.45); ET enhances only after contrast
# (0.62 on T1 → 1.45 on T1ce).
_CONTRAST = np.array([
    # T1    T1ce  T2    FLAIR
    [0.00, 0.00, 0.00, 0.00],  # background (skull-stripped)
    [0.25, 0.28, 1.45, 0.12],  # CSF
    [0.62, 0.64, 0.80, 0.72],  # grey matter
    [0.88, 0.90, 0.52, 0.55],  # white matter
    [0.72, 0.74, 0.70, 0.66],  # deep grey nuclei
    [0.55, 0.57, 1.15, 1.10],  # edema
    [0.30, 0.33, 1.30, 0.55],  # necrosis
    [0.62, 1.45, 0.95, 0.92],  # enhancing tumour
    [0.48, 0.50, 1.25, 1.05],  # non-enhancing tumour (low grade)
], dtype=np.float32)
# Classes RC and CC, rows 9 and 10 of the full table. Kept apart from `_CONTRAST`
# (whose nine rows `synth_raw` extends column-wise and whose per-case jitter the
# default task draws) so that glioma cases stay exactly as they were.
_CONTRAST_EXTRA = np.array([
    # T1    T1ce  T2    FLAIR
    [0.22, 0.24, 1.50, 0.15],  # resection cavity: fluid, like CSF
    [0.30, 0.32, 1.55, 0.35],  # cystic component: proteinaceous fluid, less FLAIR-suppressed
], dtype=np.float32)
#: Mean intensity per tissue class 0-10 (glioma classes, then RC and CC).
_CONTRAST_ALL = np.vstack([_CONTRAST, _CONTRAST_EXTRA])

# Tissue class → tumour class key of `LabelConvention.classes()`, and its name.
_TISSUE_CLASS = {ED: "ED", NCR: "NCR", NET: "NCR", ET: "ET", RC: "RC", CC: "CC"}
_TISSUE_NAMES = {ED: "edema", NCR: "necrosis / non-enhancing tumour", NET: "non-enhancing tumour",
                 ET: "enhancing tumour", RC: "resection cavity", CC: "cystic component"}
# Tumour tissue classes each task renders.
_GLIOMA_TISSUES = (ED, NCR, NET, ET)
_TASK_TISSUES = {**{t: _GLIOMA_TISSUES for t in SYNTH_TASKS}, "gli2024": (*_GLIOMA_TISSUES, RC),
                 "ped2024": (*_GLIOMA_TISSUES, CC)}
# Conventions holding the classes that brats2023-style conventions lack.
_CLASS_CONVENTION = {"RC": "brats2024", "CC": "brats2024-ped"}
# Preview colours and legend names of classes medseg's tables may lack.
_COLOURS = {"CC": (200, 80, 255), **CLASS_COLOURS}
_NAMES = {"CC": "cystic component (CC)", "RC": "resection cavity (RC)", **CLASS_NAMES}

_ORIENTATIONS = (("L", "P", "S"), ("P", "I", "R"))


@dataclass(frozen=True)
class SynthCase:
    """One rendered case on a RAS grid: `images` (4, X, Y, Z) float32 in CHANNELS
    order, `classes` (X, Y, Z) uint8 tissue classes, `affine` (4, 4), and the
    storage `orientation` (axis codes) it should be written in. `grade` is
    "high" or "low" for gliomas (low: no enhancement) and paediatric tumours,
    otherwise a short description; `task` is the task it was rendered for."""

    images: np.ndarray
    classes: np.ndarray
    affine: np.ndarray
    orientation: tuple[str, str, str]
    grade: str
    task: str = "gli2023"
    #: Voxels rendered enhancing on T1ce that are not tumour (gli2024: the thin
    #: postoperative enhancement of the cavity wall; their labels are unchanged).
    enhance: np.ndarray | None = None

    def labels(self, convention: str) -> np.ndarray:
        """Label map (X, Y, Z) uint8 in `convention`.

        The task's tumour classes map by class key through
        `LabelConvention.classes()`: NCR and NET to the convention's "NCR" value,
        ED, ET, RC and CC to theirs; every other class is background. A class
        present in the case that the convention has no value for (e.g. a
        resection cavity in brats2023) raises `MedsegError`.
        """
        conv = get_convention(convention)
        value = {key: v for v, key in conv.classes().items()}
        lab = np.zeros(self.classes.shape, np.uint8)
        # Only the task's own tumour classes: class values above NET mean other
        # tissues in class maps built elsewhere (synth_raw's head classes 9-16).
        for tissue in _TASK_TISSUES.get(self.task, _GLIOMA_TISSUES):
            key = _TISSUE_CLASS[tissue]
            mask = self.classes == tissue
            if key in value:
                lab[mask] = value[key]
            elif mask.any():
                hint = (f"; write it in a convention that has {key}, e.g. {_CLASS_CONVENTION[key]!r}"
                        if key in _CLASS_CONVENTION else "")
                raise MedsegError(
                    f"synthetic {self.task} case holds {int(mask.sum())} {_TISSUE_NAMES[tissue]} "
                    f"voxels (class {key}), but label convention {conv.name!r} has no value for {key} "
                    f"(its classes: {conv.classes()}){hint}")
        return lab


def _bspline_matrix(n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) cubic B-spline weights sampling a coarse grid at n_out cell centres."""
    u = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
    base = np.floor(u).astype(int)
    t = (u - base)[:, None]
    k = np.arange(-1, 3)[None, :]
    d = np.abs(t - k)
    w = np.where(d < 1, 2 / 3 - d**2 + d**3 / 2, np.where(d < 2, (2 - d) ** 3 / 6, 0.0))
    mat = np.zeros((n_out, n_in), np.float32)
    np.add.at(mat, (np.repeat(np.arange(n_out), 4), np.clip(base[:, None] + k, 0, n_in - 1).ravel()),
              w.ravel())
    return mat


class _Fields:
    """Smooth random fields with unit standard deviation on one grid."""

    def __init__(self, shape: tuple[int, int, int]):
        self.shape = shape

    def __call__(self, rng: np.random.Generator, scale_mm: float) -> np.ndarray:
        n = [max(2, math.ceil(f / scale_mm)) + 3 for f in FOV_MM]
        coarse = rng.standard_normal(n).astype(np.float32)
        coarse /= coarse.std() / 2.0  # B-spline smoothing halves the spread; restore ≈ unit std
        wx, wy, wz = (_bspline_matrix(s, c) for s, c in zip(self.shape, n))
        out = np.einsum("ai,ijk->ajk", wx, coarse)
        out = np.einsum("bj,ajk->abk", wy, out)
        return out @ wz.T


def _grid(shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Voxel-centre coordinates (mm) per axis and the RAS affine of `shape` over FOV_MM."""
    spacing = np.array(FOV_MM) / np.array(shape)
    axes = [((np.arange(n) - (n - 1) / 2) * s).astype(np.float32) for n, s in zip(shape, spacing)]
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [a[0] for a in axes]
    return axes, affine


def _ellipsoid(x, y, z, centre, axes) -> np.ndarray:
    """Normalised radius of an axis-aligned ellipsoid (< 1 inside)."""
    return np.sqrt(((x - centre[0]) / axes[0]) ** 2 + ((y - centre[1]) / axes[1]) ** 2
                   + ((z - centre[2]) / axes[2]) ** 2)


def _push(x, y, z, centre, radius: float, strength: float = 0.55):
    """Mass effect of a lesion at `centre` (mm): the points where the anatomy is
    sampled, pulled towards the centre so tissue appears pushed outwards, and the
    distance of (x, y, z) to the centre. At the rim of a 20 mm tumour the shift is
    about strength * 20 * e^-0.44 mm (7 mm for 0.55), fading to < 1 mm beyond 45 mm."""
    dx, dy, dz = x - centre[0], y - centre[1], z - centre[2]
    r = np.sqrt(dx * dx + dy * dy + dz * dz) + 1e-3
    sigma = 1.5 * radius + 8.0
    shrink = 1.0 - strength * radius / sigma * np.exp(-((r / sigma) ** 2))
    return centre[0] + dx * shrink, centre[1] + dy * shrink, centre[2] + dz * shrink, r


def _cerebrum_rho(x, y, z, size: float):
    """Normalised radius of the cerebrum's envelope (< 1 inside): an ellipsoid
    narrower at the front and flatter below (without the lumpy outline)."""
    a_lr = 68 * size * (1 - 0.10 * np.clip(y / 85, -1, 1))
    c_si = np.where(z < 0, 48, 64) * size
    return np.sqrt((x / a_lr) ** 2 + (y / (86 * size)) ** 2 + ((z - 8) / c_si) ** 2)


def _distance(x, y, z, centre) -> np.ndarray:
    return np.sqrt((x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2) + 1e-3


def _lobulated(prng, fields, x, y, z, centre, rad: float, lobes: float):
    """(distance to `centre` in mm, distance in units of a lobulated radius `rad`
    whose outline varies by ±`lobes`)."""
    d = _distance(x, y, z, centre)
    return d, d / (rad * (1 + lobes * fields(prng, max(8.0, rad))))


def _edema_reach(prng, fields, rad: float, lo: float, hi: float) -> np.ndarray:
    """How far oedema reaches from a lesion of radius `rad`: `rad` + U(lo, hi) mm,
    modulated by a smooth field."""
    return rad + prng.uniform(lo, hi) * (1 + 0.45 * fields(prng, 12))


def _some(mask: np.ndarray, field: np.ndarray, threshold: float) -> np.ndarray:
    """`mask` where `field` > threshold; its highest-field voxel when that is empty."""
    sel = mask & (field > threshold)
    if not sel.any() and mask.any():
        sel = mask & (field >= field[mask].max())
    return sel


def _plan_pathology(task: str, prng: np.random.Generator, c, side: float, size: float,
                    growth: float) -> dict:
    """Lesion sites and sizes (mm) of a non-glioma task, drawn before the anatomy
    (their mass effect deforms it). `c`: the centre of the glioma this patient
    has in the default task; `growth`: its growth factor at this time point."""
    if task == "gli2024":
        # The resected tumour was large; the cavity is 0.5-0.9 of it, at least 12 mm.
        before = float(np.exp(prng.uniform(np.log(18.0), np.log(32.0))))
        cavity = max(12.0, prng.uniform(0.5, 0.9) * before)
        return {"centre": c, "radius": cavity, "masses": [(c, cavity, 0.25)]}
    if task == "ped2024":
        u = prng.random()
        radius = float(np.exp(prng.uniform(np.log(10.0), np.log(26.0))))
        if u < 0.35:    # cerebellum / fourth ventricle (medulloblastoma, pilocytic astrocytoma)
            centre = (prng.uniform(-10, 10), -48 * size + prng.uniform(-6, 6),
                      -30 * size + prng.uniform(-4, 6))
        elif u < 0.55:  # brainstem (diffuse midline glioma of the pons)
            centre = (prng.uniform(-3, 3), -16 + prng.uniform(-3, 3), prng.uniform(-38, -24))
            radius = prng.uniform(11.0, 18.0)
        elif u < 0.7:   # thalamus / midline
            centre = (side * prng.uniform(4, 14), -6 + prng.uniform(-5, 5), 4 + prng.uniform(-4, 4))
        else:           # cerebral hemisphere
            centre = tuple(float(v) for v in c)
        centre = np.array(centre, np.float32)
        radius *= growth
        return {"centre": centre, "radius": radius, "masses": [(centre, radius, 0.55)]}
    if task == "men2023":
        # A dome centred on the cerebral convexity, 0-2 mm outside the envelope,
        # pushing the brain from a point outside it.
        radius = float(np.exp(prng.uniform(np.log(10.0), np.log(26.0)))) * growth
        theta, phi = prng.uniform(0, 2 * np.pi), prng.uniform(-0.15, 1.25)
        direction = np.array([np.cos(phi) * np.cos(theta), np.cos(phi) * np.sin(theta), np.sin(phi)])
        target = 1.0 + prng.uniform(0.0, 0.03)
        lo, hi = 0.0, 200.0
        for _ in range(40):  # the envelope's radius along `direction`, by bisection
            mid = (lo + hi) / 2
            p = np.array([0.0, 0.0, 8.0]) + mid * direction
            lo, hi = (mid, hi) if float(_cerebrum_rho(p[0], p[1], p[2], size)) < target else (lo, mid)
        centre = (np.array([0.0, 0.0, 8.0]) + lo * direction).astype(np.float32)
        pusher = (centre + 0.5 * radius * direction).astype(np.float32)
        tangent = np.cross(direction, prng.standard_normal(3))
        tangent /= np.linalg.norm(tangent) + 1e-9
        return {"centre": centre, "radius": radius, "direction": direction, "tangent": tangent,
                "masses": [(pusher, radius, 0.8)]}
    if task == "met2023":
        n = 1 if prng.random() < 0.35 else int(prng.integers(2, 7))
        radii = np.sort(np.exp(prng.uniform(np.log(2.0), np.log(12.0), n)))[::-1] * growth
        return {"radii": [float(r) for r in radii], "size": size, "masses": []}
    raise AssertionError(task)


def _render_pathology(task: str, plan: dict, prng: np.random.Generator, classes: np.ndarray,
                      brain: np.ndarray, x, y, z, fields, spacing, envelope, growth: float) -> str:
    """Draw the lesions of a non-glioma `task` into `classes`; returns the case's grade.
    May set `plan["enhance"]`: a mask of voxels that enhance on T1ce without being
    tumour (their tissue class, hence their label, is unchanged)."""
    near = (classes == WM) | (classes == DGM)  # where edema spreads (it spares the cortex)
    if task == "gli2024":
        # The BraTS 2024 post-treatment labels: ET is thick or nodular enhancement
        # (residual or recurrent tumour); the thin linear enhancement that lines a
        # resection cavity after surgery is *not* ET. Both are rendered, so a model
        # has to tell them apart by shape, as a reader does.
        centre, rad = plan["centre"], plan["radius"]
        d, rt = _lobulated(prng, fields, x, y, z, centre, rad, 0.25)
        cavity = (rt < 1) & brain
        reach = rad + prng.uniform(8, 25) * growth * (1 + 0.45 * fields(prng, 12))
        classes[(d < reach) & brain & ~cavity & (near | (rt < 1.4))] = ED
        outside = ndi.distance_transform_edt(~cavity, sampling=spacing)  # mm from the cavity
        if prng.random() < 0.5:  # residual non-enhancing tumour: irregular patches beside the cavity
            depth = max(prng.uniform(4, 10) * growth, 1.5 * float(max(spacing)))
            shell = brain & ~cavity & (outside <= depth)
            classes[_some(shell, fields(prng, 9), 0.6)] = NCR
        classes[cavity] = RC
        # The wall: brain voxels within one voxel (or 1-2 mm) of the cavity.
        wall = brain & ~cavity & ((outside <= prng.uniform(1, 2)) | ndi.binary_dilation(cavity))
        if prng.random() < 0.7:  # thin postoperative enhancement along part of the wall: not labelled
            plan["enhance"] = _some(wall, fields(prng, 20), prng.uniform(-0.6, 0.3))
        enhancing = prng.random() < 0.6
        if enhancing:  # 1-3 enhancing nodules on the wall, bulging into the cavity
            sites = np.argwhere(wall)
            for _ in range(1 if prng.random() < 0.5 else int(prng.integers(2, 4))):
                i, j, k = sites[prng.integers(len(sites))]
                site = np.array([x.ravel()[i], y.ravel()[j], z.ravel()[k]], np.float32)
                nrad = max(prng.uniform(5, 12) * growth, 1.5 * float(max(spacing)))
                _, nt = _lobulated(prng, fields, x, y, z, site, min(nrad, 0.7 * rad), 0.2)
                nodule = (nt < 1) & brain
                classes[nodule] = ET
                if nrad > 7 and prng.random() < 0.4:  # a necrotic centre in a large nodule
                    classes[nodule & (nt < prng.uniform(0.35, 0.55))] = NCR
        if "enhance" in plan:  # on the wall's non-tumour tissue only
            plan["enhance"] &= ~np.isin(classes, (ET, NCR))
        return "enhancing residual" if enhancing else "no enhancing residual"
    if task == "ped2024":
        centre, rad = plan["centre"], plan["radius"]
        d, rt = _lobulated(prng, fields, x, y, z, centre, rad, 0.2)
        solid = (rt < 1) & brain
        if prng.random() < 0.8:
            reach = _edema_reach(prng, fields, rad, 4, 16)
            classes[(d < reach) & brain & ~solid & (near | (rt < 1.3))] = ED
        classes[solid] = NCR
        enhancing = prng.random() < 0.6
        if enhancing:  # patchy enhancement of 15-60 % of the solid part
            classes[_some(solid, fields(prng, 6), prng.uniform(-0.3, 1.0))] = ET
        if prng.random() < 0.7:  # one or two cysts inside or beside the tumour
            for _ in range(1 if prng.random() < 0.6 else 2):
                v = prng.standard_normal(3)
                cc = centre + v / np.linalg.norm(v) * prng.uniform(0.3, 0.9) * rad
                cr = prng.uniform(0.35, 0.65) * rad
                cyst = (_distance(x, y, z, cc) / (cr * (1 + 0.1 * fields(prng, 8))) < 1) & brain
                classes[cyst] = CC
        return "high" if enhancing else "low"
    if task == "men2023":
        centre, rad = plan["centre"], plan["radius"]
        skull = envelope < 1.0  # the inner skull surface: the brain's envelope, undeformed
        d, rt = _lobulated(prng, fields, x, y, z, centre, rad, 0.15)
        dome = (rt < 1) & skull
        if prng.random() < 0.5:
            reach = _edema_reach(prng, fields, rad, 5, 20)
            classes[(d < reach) & brain & ~dome & (near | (rt < 1.4))] = ED
        # Dural tail: a thin strip along the inner skull surface, on one or both sides.
        depth = ndi.distance_transform_edt(skull, sampling=spacing)  # mm inside the skull surface
        length = prng.uniform(8, 25)
        along = ((x - centre[0]) * plan["tangent"][0] + (y - centre[1]) * plan["tangent"][1]
                 + (z - centre[2]) * plan["tangent"][2]) / d
        along = np.abs(along) if prng.random() < 0.35 else along
        surface = skull & ((depth <= prng.uniform(1.5, 3.0)) | ~ndi.binary_erosion(skull))
        classes[surface & (d < rad + length) & (along > 0.35)] = ET
        classes[dome] = ET
        necrotic = prng.random() < 0.3
        if necrotic:  # a small non-enhancing / necrotic part deep in the dome
            core = centre - 0.35 * rad * plan["direction"]
            classes[dome & (_distance(x, y, z, core) < prng.uniform(0.2, 0.4) * rad)] = NCR
        return "meningioma"
    if task == "met2023":
        # Sites: random points in the cerebrum (85 %) or cerebellum, moved to the
        # nearest grey/white junction voxel, at least r_i + r_j + 8 mm apart.
        size = plan["size"]
        junction = (classes == WM) & ndi.binary_dilation(classes == GM) & brain
        if not junction.any():
            junction = brain
        _, nearest = ndi.distance_transform_edt(~junction, sampling=spacing, return_indices=True)
        axes = [np.ravel(a) for a in (x, y, z)]
        lob = 1 + 0.12 * fields(prng, 8)
        swell = 1 + 0.3 * fields(prng, 12)
        sites: list[tuple[np.ndarray, float]] = []
        for rad in plan["radii"]:
            for _ in range(30):
                if prng.random() < 0.85:
                    box = np.array([68.0, 86.0, 64.0]) * size
                    p = np.array([0.0, 0.0, 8.0]) + prng.uniform(-1, 1, 3) * box
                    if float(_cerebrum_rho(p[0], p[1], p[2], size)) > 0.9:
                        continue
                else:
                    box = np.array([45.0, 25.0, 18.0])
                    p = (np.array([0.0, -48.0, -30.0]) + prng.uniform(-0.85, 0.85, 3) * box) * size
                idx = [int(np.clip(np.argmin(np.abs(a - v)), 0, len(a) - 1)) for a, v in zip(axes, p)]
                j = nearest[:, idx[0], idx[1], idx[2]]
                site = np.array([axes[0][j[0]], axes[1][j[1]], axes[2][j[2]]], np.float32)
                if all(np.linalg.norm(site - s) > rad + r + 8 for s, r in sites):
                    sites.append((site, rad))
                    break
        lesions = []
        for site, rad in sites:
            d = _distance(x, y, z, site)
            rt = d / (rad * lob)
            reach = rad + prng.uniform(2, 28)
            classes[(d < reach * swell) & brain & (near | (rt < 1.5))] = ED
            lesions.append((rt, rad))
        for rt, rad in lesions:
            core = (rt < 1) & brain
            classes[core] = ET
            if rad > 5 and prng.random() < 0.75:  # ring enhancement around necrosis
                nec = core & (rt < prng.uniform(0.4, 0.75) * (1 + 0.1 * fields(prng, 6)))
                if (core & ~nec).sum() >= 0.3 * core.sum():
                    classes[nec] = NCR
        return f"{len(sites)} metastases" if len(sites) > 1 else "1 metastasis"
    raise AssertionError(task)


def render_case(seed: int, patient: int, timepoint: int = 0, shape=DEMO_SHAPE,
                geometry_variation: bool = True, task: str = "gli2023") -> SynthCase:
    """Render one case of patient `patient` at `timepoint` on a grid of `shape`.

    Anatomy and tumour depend on (seed, patient); the acquisition (noise, bias,
    intensity scale, tumour growth) also on the time point. `task` (one of
    `SYNTH_TASKS`) picks the pathology; a patient has the same head in every task.
    """
    if task not in SYNTH_TASKS:
        raise MedsegError(f"unknown synthetic task {task!r}; expected one of {', '.join(SYNTH_TASKS)}")
    shape = tuple(int(s) for s in shape)
    rng = np.random.default_rng([seed, patient, 0])       # anatomy and tumour
    acq = np.random.default_rng([seed, patient, 1, timepoint])  # acquisition
    # Other tasks' pathology and acquisition extras: separate streams, so the
    # default task draws exactly what it always drew.
    prng = np.random.default_rng([seed, patient, 7])
    xacq = np.random.default_rng([seed, patient, 8, timepoint])

    # Geometry: thick slices for some cases (the same head, coarser along z).
    orientation = ("R", "A", "S")
    if geometry_variation:
        u = rng.random()
        if u < 0.15:
            shape = (shape[0], shape[1], max(8, shape[2] // 2))
        v = rng.random()
        orientation = _ORIENTATIONS[0] if v < 0.25 else _ORIENTATIONS[1] if v < 0.4 else orientation
    (ax, ay, az), affine = _grid(shape)
    spacing = np.diag(affine)[:3]
    fields = _Fields(shape)
    x, y, z = ax[:, None, None], ay[None, :, None], az[None, None, :]

    # Tumour centre and size (mm): log-uniform radius, from small to large.
    side = rng.choice([-1.0, 1.0])
    c = np.array([side * rng.uniform(18, 38), rng.uniform(-45, 40), rng.uniform(0, 35)], np.float32)
    radius = float(np.exp(rng.uniform(np.log(5.0), np.log(28.0))))
    growth = acq.uniform(0.8, 1.25) if timepoint else 1.0
    radius *= growth
    grade = "low" if rng.random() < 0.25 else "high"
    size = rng.uniform(0.93, 1.05)

    # Mass effect: anatomy is sampled at points pulled towards the tumour centre,
    # so tissue appears pushed outwards (`_push`).
    if task in _GLIOMA_TASKS:
        wx, wy, wz, r = _push(x, y, z, c, radius)
    else:
        plan = _plan_pathology(task, prng, c, float(side), size, growth)
        wx, wy, wz = np.broadcast_arrays(x, y, z)
        for centre, rad, strength in plan["masses"]:
            wx, wy, wz, _ = _push(wx, wy, wz, centre, rad, strength)

    # Cerebrum: an ellipsoid narrower at the front and flatter below, with a
    # lumpy outline.
    lump = fields(rng, 40)
    rho = _cerebrum_rho(wx, wy, wz, size) + 0.025 * lump
    cerebellum = _ellipsoid(wx, wy, wz, (0, -48 * size, -30 * size), (52 * size, 30 * size, 22 * size))
    taper = np.clip(1 + (wz + 20) / 120, 0.6, 1.0)  # the brainstem narrows downwards
    stem = np.sqrt((wx / (12 * taper)) ** 2 + ((wy + 16) / (14 * taper)) ** 2) + np.where(wz > -15, 9.0, 0.0)
    brain = (rho < 1) | (cerebellum < 1) | (stem < 1)

    # Cortex: grey-matter depth varies with a gyral field (about 4-15 mm), so
    # white matter reaches into the gyri; sulci are the zero level set of another
    # field, filled with CSF from the surface inwards.
    gyri = fields(rng, 13)
    depth = 0.055 + 0.16 / (1 + np.exp(-2.5 * gyri))
    classes = np.zeros(shape, np.uint8)
    classes[brain] = GM
    classes[rho < 1 - depth] = WM
    sulci = (np.abs(fields(rng, 16)) < 0.08) & (rho > 0.74) & (rho < 1)
    classes[sulci | ((rho > 0.985) & (rho < 1))] = CSF
    cb = (cerebellum < 1) & (rho >= 1)
    folia = np.abs(np.sin(0.9 * (wz + 0.5 * wy + 2.0 * fields(rng, 20)))) < 0.22
    classes[cb & folia & (cerebellum > 0.5)] = CSF
    classes[cb & (cerebellum < 0.42 + 0.1 * gyri)] = WM
    classes[(stem < 1) & (rho >= 1) & (cerebellum >= 1)] = WM
    fissure = (np.abs(wx - 1.5 * fields(rng, 60)) < 1.4) & (((wz > 22) & (rho < 1)) | (rho > 0.82)) & (rho < 1)
    classes[fissure] = CSF

    # Deep grey nuclei and ventricles (butterfly-shaped lateral ventricles that dip at both horns).
    for sx in (-1, 1):
        classes[_ellipsoid(wx, wy, wz, (sx * 14, -6, 4), (9, 14, 9)) < 1] = DGM     # thalamus
        classes[_ellipsoid(wx, wy, wz, (sx * 20, 12, 6), (6, 13, 9)) < 1] = DGM     # putamen
    v = rng.uniform(0.75, 1.3)
    for sx in (-1, 1):
        bend = 14 - 0.006 * wy**2
        horn = _ellipsoid(wx, wy, wz - bend, (sx * 8 * v, -2, 0), (4.5 * v, 30, 6.5 * v))
        classes[horn < 1] = CSF
    classes[_ellipsoid(wx, wy, wz, (0, -4, 0), (1.8, 12, 9)) < 1] = CSF
    classes[~brain] = BG

    if task in _GLIOMA_TASKS:
        # Glioma: lobulated core; necrosis inside an enhancing rim for high grade.
        lobes = 1 + 0.22 * fields(rng, max(8.0, radius))
        rt = r / (radius * lobes)
        core = (rt < 1) & brain
        edema_reach = radius + rng.uniform(6, 22) * (1 + 0.45 * fields(rng, 12))
        edema = (r < edema_reach) & brain & ~core & ((classes == WM) | (classes == DGM) | (rt < 1.3))
        classes[edema] = ED
        if grade == "high":
            nec_frac = rng.uniform(0.35, 0.7) if radius > 9 else 0.0
            rim = 1 + 0.12 * fields(rng, 6)
            classes[core] = ET
            classes[core & (rt < nec_frac * rim)] = NCR
        else:
            classes[core] = NET
    else:
        envelope = _cerebrum_rho(x, y, z, size) + 0.025 * lump if task == "men2023" else None
        grade = _render_pathology(task, plan, prng, classes, brain, x, y, z, fields, spacing,
                                  envelope, growth)

    # Intensities: class means jittered per case, tissue texture, partial volume.
    contrast = _CONTRAST * acq.uniform(0.95, 1.05, _CONTRAST.shape).astype(np.float32)
    if task not in ("gli2021", "gli2023"):  # RC and CC rows, jittered from the extra stream
        extra = _CONTRAST_EXTRA * xacq.uniform(0.95, 1.05, _CONTRAST_EXTRA.shape).astype(np.float32)
        contrast = np.vstack([contrast, extra])
    texture = 1 + 0.035 * fields(acq, 5)
    texture = np.where(classes == ET, texture + 0.12 * fields(acq, 4), texture)
    inside = classes > 0
    blur = 0.45  # voxels: partial-volume softening of tissue boundaries
    images = np.empty((4, *shape), np.float32)
    noise_sd = acq.uniform(0.012, 0.035)
    if task == "ssa2023":  # older, lower-field scanners: lower contrast-to-noise
        noise_sd *= 1.6
    enhance = plan.get("enhance") if task not in _GLIOMA_TASKS else None
    for m in range(4):
        img = contrast[classes, m] * texture
        if enhance is not None and m == 1:  # enhancement that is not tumour (gli2024: the cavity wall)
            img = np.where(enhance, 0.9 * contrast[ET, 1] * texture, img)
        img = ndi.gaussian_filter(img, blur)
        img *= np.exp(0.12 * fields(acq, 90))  # smooth bias field
        if task == "ssa2023":
            img *= np.exp(0.18 * fields(xacq, 70))  # and a stronger one
        n1 = acq.standard_normal(shape, dtype=np.float32) * noise_sd
        n2 = acq.standard_normal(shape, dtype=np.float32) * noise_sd
        img = np.sqrt((img + n1) ** 2 + n2**2)  # Rician magnitude noise
        img *= acq.uniform(300, 3000)  # arbitrary scanner scale
        images[m] = np.where(inside, np.maximum(img, 1.0), 0.0)
    return SynthCase(images, classes, affine, orientation, grade, task, enhance)


def _case_plan(n_cases: int, layout: str, seed: int,
               cohort: str = "GLI") -> list[tuple[str, str, int, int]]:
    """(case_id, patient_id, patient index, time point) for each case.

    In the 2023 layout about one patient in five has a second time point
    (`BraTS-GLI-00007-000` and `-001`), as in the real data; its ids name the
    `cohort` (`BraTS-MEN-00007-000`).
    """
    rng = np.random.default_rng([seed, 999])
    plan, patient = [], 0
    while len(plan) < n_cases:
        points = 2 if layout == "brats2023" and rng.random() < 0.2 and len(plan) + 2 <= n_cases else 1
        for t in range(points):
            if layout == "brats2021":
                cid = pid = f"BraTS2021_{patient:05d}"
            elif layout == "brats2023":
                pid = f"BraTS-{cohort}-{patient:05d}"
                cid = f"{pid}-{t:03d}"
            else:
                cid = pid = f"BRATS_{patient + 1:03d}"
            plan.append((cid, pid, patient, t))
        patient += 1
    return plan


def _storage(array: np.ndarray, affine: np.ndarray, orientation) -> tuple[np.ndarray, np.ndarray]:
    """Reorient a RAS array (spatial axes first) to `orientation` axis codes."""
    img = nib.Nifti1Image(array, affine)
    ornt = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt(("R", "A", "S")),
                                           nib.orientations.axcodes2ornt(orientation))
    out = img.as_reoriented(ornt)
    return np.asarray(out.dataobj), out.affine


def _msd_dataset_json(train: list[str], test: list[str], task: str = "gli2023") -> dict:
    what = "" if task in ("gli2021", "gli2023") else f" (task {task})"
    return {
        "name": "BRATS",
        "description": f"medseg synthetic BraTS-like data{what} in the MSD Task01_BrainTumour layout",
        "tensorImageSize": "4D",
        "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
        "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
        "numTraining": len(train),
        "numTest": len(test),
        "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in train],
        "test": [f"./imagesTs/{c}.nii.gz" for c in test],
    }


def synthesize(out: str | Path, n_cases: int, layout: str = "brats2023", seed: int = 0,
               shape=DEMO_SHAPE, test_cases: int = 0, geometry_variation: bool = True,
               preview: str | Path | None = None, progress=None, task: str = "gli2023") -> list[str]:
    """Write `n_cases` labelled (+ `test_cases` unlabelled) cases of `task` under
    `out` in `layout`.

    Returns the case ids (in the brats2023 layout they name the task's cohort:
    BraTS-GLI, -SSA, -PED, -MEN, -MET). Labels are in the layout's convention,
    except gli2024 (brats2024: 4 = resection cavity) and ped2024 (brats2024-ped),
    which only the brats2023 layout takes. Refuses to write into a folder that
    already holds files, so an existing dataset is never overwritten.
    """
    if layout not in LAYOUTS:
        raise MedsegError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    if task not in SYNTH_TASKS:
        raise MedsegError(f"unknown synthetic task {task!r}; expected one of {', '.join(SYNTH_TASKS)}")
    if task in TASK_CONVENTION and layout != "brats2023":
        raise MedsegError(
            f"task {task!r} writes {TASK_CONVENTION[task]} labels (BraTS 2024 file names), which "
            f"layout {layout!r} cannot hold: use layout 'brats2023' for task {task!r}")
    if n_cases < 1:
        raise MedsegError(f"--cases must be at least 1, found {n_cases}")
    if len(shape) != 3 or min(shape) < 16:
        raise MedsegError(f"--shape must be three sizes of at least 16 voxels, found {tuple(shape)}")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise MedsegError(f"{out}: folder is not empty; medseg never overwrites data: "
                          "choose a new --out folder or remove this one")
    lay = LAYOUTS[layout]
    try:
        conv = get_convention(TASK_CONVENTION.get(task, lay.convention))
    except MedsegError as e:
        raise MedsegError(f"task {task!r}: {e}") from None
    plan = _case_plan(n_cases + test_cases, layout, seed, _TASK_COHORT[task])
    shown = []
    for i, (cid, pid, patient, t) in enumerate(plan):
        labelled = i < n_cases
        case = render_case(seed, patient, t, shape, geometry_variation, task)
        if preview is not None and len(shown) < 4:
            shown.append((cid, case))
        label = case.labels(conv.name)
        if layout == "msd":
            order = [CHANNELS.index(ch) for ch in lay.channels]
            img4d = np.moveaxis(case.images[order], 0, -1).astype(np.float32)
            data, aff = _storage(img4d, case.affine, case.orientation)
            folder = "imagesTr" if labelled else "imagesTs"
            write_nifti(data, aff, out / folder / f"{cid}.nii.gz")
            if labelled:
                lab, aff = _storage(label, case.affine, case.orientation)
                write_nifti(lab, aff, out / "labelsTr" / f"{cid}.nii.gz")
        else:
            for ch, img in zip(CHANNELS, case.images):
                data, aff = _storage(np.round(img).astype(np.int16), case.affine, case.orientation)
                write_nifti(data, aff, out / cid / f"{cid}{lay.sep}{lay.keys[ch]}.nii.gz")
            if labelled:
                lab, aff = _storage(label, case.affine, case.orientation)
                write_nifti(lab, aff, out / cid / f"{cid}{lay.sep}{lay.label_key}.nii.gz")
        if progress is not None:
            progress(i + 1, len(plan), cid)
    ids = [p[0] for p in plan]
    if layout == "msd":
        write_json(_msd_dataset_json(ids[:n_cases], ids[n_cases:], task), out / "dataset.json")
    if preview is not None:
        save_preview(shown, preview)
    return ids


def save_preview(cases: list[tuple[str, SynthCase]], path: str | Path) -> None:
    """PNG montage: per case, axial T1/T1ce/T2/FLAIR through the tumour, the labels
    over FLAIR (with the resection cavity and cysts where a case has them), and
    coronal and sagittal T1ce."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import ListedColormap
    except ImportError:
        raise MedsegError("--preview needs matplotlib: pip install 'medseg[viz]'") from None
    cols = ["T1", "T1ce", "T2", "FLAIR", "labels", "T1ce cor.", "T1ce sag."]
    fig, axes = plt.subplots(len(cases), len(cols), figsize=(2.2 * len(cols), 2.3 * len(cases)),
                             squeeze=False, facecolor="black")
    # Labels 1 edema, 2 necrosis/NET, 3 enhancing, then 4, 5 resection cavity and
    # cyst where any case has them: medseg's one colour table.
    classes = ["ED", "NCR", "ET"]
    classes += [k for k, t in (("RC", RC), ("CC", CC))
                if any(c.task in ("gli2024", "ped2024") and (c.classes == t).any() for _, c in cases)]
    tissues = {"ED": (ED,), "NCR": (NCR, NET), "ET": (ET,), "RC": (RC,), "CC": (CC,)}
    lab_cmap = ListedColormap([(0, 0, 0, 0)] + [(*(c / 255 for c in _COLOURS[k]), 0.7) for k in classes])
    for row, (cid, case) in enumerate(cases):
        tumour = np.argwhere(case.classes >= ED)
        cx, cy, cz = (tumour.mean(0).astype(int) if len(tumour) else np.array(case.classes.shape) // 2)
        core = case.classes > ED
        if case.task not in ("gli2021", "gli2023") and core.any() and not core[:, :, cz].any():
            # Several lesions (metastases): the axial slice with the most lesion core.
            cz = int(np.argmax(core.sum((0, 1))))
            cx, cy = np.argwhere(core[:, :, cz]).mean(0).astype(int)
        zoom = np.diag(case.affine)[:3]
        lab = np.zeros(case.classes.shape, np.uint8)
        for value, k in enumerate(classes, 1):
            lab[np.isin(case.classes, tissues[k])] = value
        views = [(case.images[m][:, :, cz], zoom[1] / zoom[0]) for m in range(4)]
        views += [(case.images[3][:, :, cz], zoom[1] / zoom[0]),
                  (case.images[1][:, cy, :], zoom[2] / zoom[0]),
                  (case.images[1][cx, :, :], zoom[2] / zoom[1])]
        for col, (sl, aspect) in enumerate(views):
            ax = axes[row, col]
            vmax = np.percentile(sl[sl > 0], 99.5) if np.any(sl > 0) else 1
            ax.imshow(sl.T, cmap="gray", origin="lower", vmin=0, vmax=vmax, aspect=aspect)
            if col == 4:
                ax.imshow(lab[:, :, cz].T, cmap=lab_cmap, origin="lower", vmin=0, vmax=len(classes),
                          interpolation="nearest", aspect=aspect)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(cols[col], color="white", fontsize=9)
        what = f"{case.grade} grade" if case.grade in ("high", "low") else case.grade
        if case.task not in ("gli2021", "gli2023"):
            what = f"{case.task}: {what}"
        axes[row, 0].set_ylabel(f"{cid}\n{what}", color="white", fontsize=8)
    fig.tight_layout(rect=(0, 0.05 / max(1, len(cases)) * 2, 1, 1))
    from matplotlib.patches import Patch
    fig.legend(handles=[Patch(color=tuple(c / 255 for c in _COLOURS[k]), label=_NAMES[k])
                        for k in ("NCR", "ED", "ET", *classes[3:])], loc="lower center",
               ncol=len(classes), fontsize=8,
               frameon=False, labelcolor="white")
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, dpi=90, facecolor="black", format="png")
    plt.close(fig)
