"""Synthetic BraTS-like dataset: brain-shaped multi-modal MRI with gliomas.

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
* contrast per modality as in real MRI (table `_CONTRAST`): ET bright only on
  T1ce, edema bright on T2 and FLAIR, CSF bright on T2 and dark on FLAIR;
* acquisition: tissue texture, a smooth bias field per modality, Rician noise,
  a random intensity scale per modality, int16 storage, zero background;
* geometry: some cases stored in non-RAS orientations (LPS, PIR) or with thick
  slices (anisotropic spacing).

Random smooth fields are tensor-product cubic B-splines on a coarse grid fixed in
millimetres, so a case looks the same at any resolution, and a BraTS-size case
(240 × 240 × 155 at 1 mm) takes a few seconds. Everything is determined by
(seed, patient index, time point).
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

__all__ = ["FOV_MM", "DEMO_SHAPE", "SynthCase", "render_case", "synthesize", "save_preview"]

#: Physical field of view of every synthetic case (BraTS: 240 × 240 × 155 voxels of 1 mm).
FOV_MM = (240.0, 240.0, 155.0)
#: Default grid for fast CPU demos: 2.5 mm in-plane, about 2.4 mm slices.
DEMO_SHAPE = (96, 96, 64)

# Tissue classes of the rendered class map.
BG, CSF, GM, WM, DGM, ED, NCR, ET, NET = range(9)

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

_ORIENTATIONS = (("L", "P", "S"), ("P", "I", "R"))


@dataclass(frozen=True)
class SynthCase:
    """One rendered case on a RAS grid: `images` (4, X, Y, Z) float32 in CHANNELS
    order, `classes` (X, Y, Z) uint8 tissue classes, `affine` (4, 4), and the
    storage `orientation` (axis codes) it should be written in."""

    images: np.ndarray
    classes: np.ndarray
    affine: np.ndarray
    orientation: tuple[str, str, str]
    grade: str

    def labels(self, convention: str) -> np.ndarray:
        """Label map (X, Y, Z) uint8 in `convention`."""
        conv = get_convention(convention)
        lab = np.zeros(self.classes.shape, np.uint8)
        lab[self.classes == ED] = conv.ed
        lab[(self.classes == NCR) | (self.classes == NET)] = conv.ncr
        lab[self.classes == ET] = conv.et
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


def render_case(seed: int, patient: int, timepoint: int = 0, shape=DEMO_SHAPE,
                geometry_variation: bool = True) -> SynthCase:
    """Render one case of patient `patient` at `timepoint` on a grid of `shape`.

    Anatomy and tumour depend on (seed, patient); the acquisition (noise, bias,
    intensity scale, tumour growth) also on the time point.
    """
    shape = tuple(int(s) for s in shape)
    rng = np.random.default_rng([seed, patient, 0])       # anatomy and tumour
    acq = np.random.default_rng([seed, patient, 1, timepoint])  # acquisition

    # Geometry: thick slices for some cases (the same head, coarser along z).
    orientation = ("R", "A", "S")
    if geometry_variation:
        u = rng.random()
        if u < 0.15:
            shape = (shape[0], shape[1], max(8, shape[2] // 2))
        v = rng.random()
        orientation = _ORIENTATIONS[0] if v < 0.25 else _ORIENTATIONS[1] if v < 0.4 else orientation
    (ax, ay, az), affine = _grid(shape)
    fields = _Fields(shape)
    x, y, z = ax[:, None, None], ay[None, :, None], az[None, None, :]

    # Tumour centre and size (mm): log-uniform radius, from small to large.
    side = rng.choice([-1.0, 1.0])
    c = np.array([side * rng.uniform(18, 38), rng.uniform(-45, 40), rng.uniform(0, 35)], np.float32)
    radius = float(np.exp(rng.uniform(np.log(5.0), np.log(28.0))))
    radius *= acq.uniform(0.8, 1.25) if timepoint else 1.0
    grade = "low" if rng.random() < 0.25 else "high"

    # Mass effect: anatomy is sampled at points pulled towards the tumour centre,
    # so tissue appears pushed outwards; at the rim of a 20 mm tumour the shift is
    # about 0.55 * 20 * e^-0.44 ≈ 7 mm, fading to < 1 mm beyond 45 mm.
    dx, dy, dz = x - c[0], y - c[1], z - c[2]
    r = np.sqrt(dx * dx + dy * dy + dz * dz) + 1e-3
    sigma = 1.5 * radius + 8.0
    shrink = 1.0 - 0.55 * radius / sigma * np.exp(-((r / sigma) ** 2))
    wx, wy, wz = c[0] + dx * shrink, c[1] + dy * shrink, c[2] + dz * shrink

    # Cerebrum: an ellipsoid narrower at the front and flatter below, with a
    # lumpy outline.
    size = rng.uniform(0.93, 1.05)
    a_lr = 68 * size * (1 - 0.10 * np.clip(wy / 85, -1, 1))
    c_si = np.where(wz < 0, 48, 64) * size
    rho = np.sqrt((wx / a_lr) ** 2 + (wy / (86 * size)) ** 2 + ((wz - 8) / c_si) ** 2)
    rho = rho + 0.025 * fields(rng, 40)
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

    # Intensities: class means jittered per case, tissue texture, partial volume.
    contrast = _CONTRAST * acq.uniform(0.95, 1.05, _CONTRAST.shape).astype(np.float32)
    texture = 1 + 0.035 * fields(acq, 5)
    texture = np.where(classes == ET, texture + 0.12 * fields(acq, 4), texture)
    inside = classes > 0
    blur = 0.45  # voxels: partial-volume softening of tissue boundaries
    images = np.empty((4, *shape), np.float32)
    noise_sd = acq.uniform(0.012, 0.035)
    for m in range(4):
        img = contrast[classes, m] * texture
        img = ndi.gaussian_filter(img, blur)
        img *= np.exp(0.12 * fields(acq, 90))  # smooth bias field
        n1 = acq.standard_normal(shape, dtype=np.float32) * noise_sd
        n2 = acq.standard_normal(shape, dtype=np.float32) * noise_sd
        img = np.sqrt((img + n1) ** 2 + n2**2)  # Rician magnitude noise
        img *= acq.uniform(300, 3000)  # arbitrary scanner scale
        images[m] = np.where(inside, np.maximum(img, 1.0), 0.0)
    return SynthCase(images, classes, affine, orientation, grade)


def _case_plan(n_cases: int, layout: str, seed: int) -> list[tuple[str, str, int, int]]:
    """(case_id, patient_id, patient index, time point) for each case.

    In the 2023 layout about one patient in five has a second time point
    (`BraTS-GLI-00007-000` and `-001`), as in the real data.
    """
    rng = np.random.default_rng([seed, 999])
    plan, patient = [], 0
    while len(plan) < n_cases:
        points = 2 if layout == "brats2023" and rng.random() < 0.2 and len(plan) + 2 <= n_cases else 1
        for t in range(points):
            if layout == "brats2021":
                cid = pid = f"BraTS2021_{patient:05d}"
            elif layout == "brats2023":
                pid = f"BraTS-GLI-{patient:05d}"
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


def _msd_dataset_json(train: list[str], test: list[str]) -> dict:
    return {
        "name": "BRATS",
        "description": "medseg synthetic BraTS-like data in the MSD Task01_BrainTumour layout",
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
               preview: str | Path | None = None, progress=None) -> list[str]:
    """Write `n_cases` labelled (+ `test_cases` unlabelled) cases under `out` in `layout`.

    Returns the case ids. Refuses to write into a folder that already holds files,
    so an existing dataset is never overwritten.
    """
    if layout not in LAYOUTS:
        raise MedsegError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    if n_cases < 1:
        raise MedsegError(f"--cases must be at least 1, found {n_cases}")
    if len(shape) != 3 or min(shape) < 16:
        raise MedsegError(f"--shape must be three sizes of at least 16 voxels, found {tuple(shape)}")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise MedsegError(f"{out}: folder is not empty; medseg never overwrites data: "
                          "choose a new --out folder or remove this one")
    lay = LAYOUTS[layout]
    conv = get_convention(lay.convention)
    plan = _case_plan(n_cases + test_cases, layout, seed)
    shown = []
    for i, (cid, pid, patient, t) in enumerate(plan):
        labelled = i < n_cases
        case = render_case(seed, patient, t, shape, geometry_variation)
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
        write_json(_msd_dataset_json(ids[:n_cases], ids[n_cases:]), out / "dataset.json")
    if preview is not None:
        save_preview(shown, preview)
    return ids


def save_preview(cases: list[tuple[str, SynthCase]], path: str | Path) -> None:
    """PNG montage: per case, axial T1/T1ce/T2/FLAIR through the tumour, the labels
    over FLAIR, and coronal and sagittal T1ce."""
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
    # Labels 1 edema, 2 necrosis/NET, 3 enhancing: medseg's one colour table.
    classes = ("ED", "NCR", "ET")
    lab_cmap = ListedColormap([(0, 0, 0, 0)] + [(*(c / 255 for c in CLASS_COLOURS[k]), 0.7) for k in classes])
    for row, (cid, case) in enumerate(cases):
        tumour = np.argwhere(case.classes >= ED)
        cx, cy, cz = (tumour.mean(0).astype(int) if len(tumour) else np.array(case.classes.shape) // 2)
        zoom = np.diag(case.affine)[:3]
        lab = np.zeros(case.classes.shape, np.uint8)
        lab[case.classes == ED] = 1
        lab[np.isin(case.classes, (NCR, NET))] = 2
        lab[case.classes == ET] = 3
        views = [(case.images[m][:, :, cz], zoom[1] / zoom[0]) for m in range(4)]
        views += [(case.images[3][:, :, cz], zoom[1] / zoom[0]),
                  (case.images[1][:, cy, :], zoom[2] / zoom[0]),
                  (case.images[1][cx, :, :], zoom[2] / zoom[1])]
        for col, (sl, aspect) in enumerate(views):
            ax = axes[row, col]
            vmax = np.percentile(sl[sl > 0], 99.5) if np.any(sl > 0) else 1
            ax.imshow(sl.T, cmap="gray", origin="lower", vmin=0, vmax=vmax, aspect=aspect)
            if col == 4:
                ax.imshow(lab[:, :, cz].T, cmap=lab_cmap, origin="lower", vmin=0, vmax=3,
                          interpolation="nearest", aspect=aspect)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(cols[col], color="white", fontsize=9)
        axes[row, 0].set_ylabel(f"{cid}\n{case.grade} grade", color="white", fontsize=8)
    fig.tight_layout(rect=(0, 0.05 / max(1, len(cases)) * 2, 1, 1))
    from matplotlib.patches import Patch
    fig.legend(handles=[Patch(color=tuple(c / 255 for c in CLASS_COLOURS[k]), label=CLASS_NAMES[k])
                        for k in ("NCR", "ED", "ET")], loc="lower center", ncol=3, fontsize=8,
               frameon=False, labelcolor="white")
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, dpi=90, facecolor="black", format="png")
    plt.close(fig)
