"""The QC picture of a raw study (``OUT/qc/<case>.png``, linked from `medseg report`).

Row 1: the T1ce in atlas space with the edges (Canny) of T1, T2 and FLAIR drawn
over it — a misregistered series shows as edges off the anatomy. Row 2: the
T1ce with the brain mask's outline, axial, coronal and sagittal. Row 3: the
reference series on its native grid with the predicted tumour (medseg's colour
table) through the tumour's centre. Needs matplotlib (the ``viz`` extra); without
it the caller says so and goes on.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from medseg.data.io import atomic_path
from medseg.labels import CLASS_COLOURS, get_convention

__all__ = ["qc_picture"]


def _load(path: Path) -> np.ndarray:
    img = nib.as_closest_canonical(nib.load(str(path)))
    return np.asarray(img.dataobj, np.float32)


def _edges(vol: np.ndarray) -> np.ndarray:
    img = sitk.GetImageFromArray(vol / max(float(np.percentile(vol, 99)), 1e-6))
    return sitk.GetArrayFromImage(sitk.CannyEdgeDetection(img, 0.08, 0.2, [1.5] * 3)) > 0


def _norm(s: np.ndarray) -> np.ndarray:
    return np.clip(s / max(float(np.percentile(s, 99.5)), 1e-6), 0, 1)


def qc_picture(prepared, mask: Path, reference_image: tuple[np.ndarray, np.ndarray], convention: str,
               target: Path) -> Path:
    """Write the QC picture of `prepared` (a `PreparedCase`) and its native `mask`
    (on the grid of `reference_image` = (volume, affine)) to `target`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t1ce = _load(prepared.images["t1ce"])
    brain = _load(prepared.brain) > 0.5
    idx = np.argwhere(brain)
    c = tuple(int(v) for v in (idx.mean(0) if len(idx) else np.array(t1ce.shape) // 2))
    others = [r for r in ("t1", "t2", "flair") if r in prepared.images]
    fig, axes = plt.subplots(3, 3, figsize=(9, 9.5))
    for ax in axes.ravel():
        ax.axis("off")
    for ax, role in zip(axes[0], others):
        sl = np.s_[:, :, c[2]]
        ax.imshow(_norm(t1ce[sl]).T, cmap="gray", origin="lower")
        e = _edges(_load(prepared.images[role]))[sl]
        ax.imshow(np.ma.masked_where(~e.T, e.T), cmap="autumn", origin="lower", alpha=0.9)
        ax.set_title(f"{role} edges over T1ce", fontsize=8)
    for ax, (sl, name) in zip(axes[1], ((np.s_[:, :, c[2]], "axial"), (np.s_[:, c[1], :], "coronal"),
                                        (np.s_[c[0], :, :], "sagittal"))):
        ax.imshow(_norm(t1ce[sl]).T, cmap="gray", origin="lower")
        ax.contour(brain[sl].T.astype(float), levels=[0.5], colors="cyan", linewidths=0.7)
        ax.set_title(f"brain mask, {name}", fontsize=8)
    vol, affine = reference_image
    ornt = nib.orientations.ornt_transform(nib.io_orientation(affine),
                                           nib.orientations.axcodes2ornt(("R", "A", "S")))
    ref = nib.orientations.apply_orientation(np.asarray(vol, np.float32), ornt)
    lab = nib.orientations.apply_orientation(np.asarray(nib.load(str(mask)).dataobj), ornt)
    t = np.argwhere(lab > 0)
    tc = tuple(int(v) for v in (t.mean(0) if len(t) else np.array(ref.shape) // 2))
    conv = get_convention(convention)
    for ax, (sl, name) in zip(axes[2], ((np.s_[:, :, tc[2]], "axial"), (np.s_[:, tc[1], :], "coronal"),
                                        (np.s_[tc[0], :, :], "sagittal"))):
        ax.imshow(_norm(ref[sl]).T, cmap="gray", origin="lower", aspect="auto")
        rgba = np.zeros((*lab[sl].T.shape, 4), np.float32)
        for value, cls in conv.classes().items():
            rgba[lab[sl].T == value] = (*(v / 255 for v in CLASS_COLOURS[cls]), 0.5)
        ax.imshow(rgba, origin="lower", aspect="auto")
        ax.set_title(f"mask on the native series, {name}", fontsize=8)
    fig.suptitle(f"{prepared.case_id}: registration and brain extraction QC", fontsize=10)
    fig.tight_layout()
    target = Path(target)
    with atomic_path(target) as tmp:
        fig.savefig(tmp, dpi=72, format="png")
    plt.close(fig)
    return target
