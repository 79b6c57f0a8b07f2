"""Volumetry of a label map (torch-free): what `medseg predict` records per case
and writes to ``volumes.csv``, and what `medseg report` shows.

The numbers and what they mean:

- **Volumes** in mL = voxels × voxel volume. The voxel volume is |det| of the
  affine's 3×3 part (the grid as nibabel reads the NIfTI header): the product of
  the zooms for any orientation or rotation, and still right for a sheared grid.
  One per label of the convention, by its names (``NETC``, ``SNFH``, ``ET``, ``RC``
  for brats2024; ``NCR/NET``, ``ED``, ``ET`` for brats2021; MSD's names), and one
  per output region of the task (`medseg.labels.Task.outputs`: TC, WT, ET; plus RC
  for gli2024, CC for ped2024; default: the task the convention's labels detect).
- **Lesions**: connected components of each region, 26-connected (voxels that
  share a face, an edge or a corner are one lesion, as the BraTS 2023 lesion-wise
  code and panoptica count them), counted as found: no size threshold, and no
  merging of nearby components (BraTS 2023's dilation step is a scoring rule, see
  `medseg.scoring`).
- **Largest lesion** of each region: the component with the most voxels, its
  volume, and its bounding box along the scanner axes in mm: the smallest box
  aligned with the world (RAS+) axes that holds all its voxels, each voxel taken
  as its whole box, not its centre. So a one-voxel lesion on a 1×1×5 mm grid
  measures 1×1×5 mm, whatever the storage orientation (RAS, LPS, PIR …); on an
  oblique grid the box holds the rotated voxels. ``extent_mm`` is its size from
  right to left, anterior to posterior, inferior to superior; ``box_ras_mm`` its
  lower and upper corners in RAS+ scanner coordinates (negate x and y for LPS).
"""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from scipy import ndimage

from medseg.data.inputs import read_manifest
from medseg.data.io import atomic_path, load_array, load_header
from medseg.errors import MedsegError
from medseg.labels import Task, detect_task, get_convention, get_task, validate_labels

__all__ = ["CONNECTIVITY", "VOLUMES_CSV", "voxel_ml", "case_volumetry", "mask_volumetry",
           "csv_columns", "volume_row", "write_volumes_csv", "write_batch_volumes"]

#: Neighbourhood of a lesion's voxels: 26 (face, edge or corner).
CONNECTIVITY = 26

#: The batch table `medseg predict` writes into its output folder.
VOLUMES_CSV = "volumes.csv"

_AXES = ("rl", "ap", "si")


def voxel_ml(affine: np.ndarray, source: str = "label map") -> float:
    """Volume of one voxel in mL: |det| of the affine's 3×3 part / 1000."""
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4) or not np.all(np.isfinite(a)):
        raise MedsegError(f"{source}: expected a finite 4×4 voxel-to-world affine, found "
                          f"{a.shape if a.shape != (4, 4) else 'non-finite values'}; fix the "
                          "NIfTI header (sform/qform) of this file")
    det = abs(float(np.linalg.det(a[:3, :3])))
    if det == 0.0:
        raise MedsegError(f"{source}: the affine is singular (a voxel of volume 0); fix the "
                          "NIfTI header (sform/qform) of this file")
    return det / 1000.0


def _nonzero_box(lab: np.ndarray) -> tuple[slice, ...]:
    """The smallest box of `lab` holding every non-zero voxel (empty slices if none)."""
    box = []
    for ax in range(3):
        hit = np.flatnonzero(np.any(lab, axis=tuple(a for a in range(3) if a != ax)))
        box.append(slice(int(hit[0]), int(hit[-1]) + 1) if hit.size else slice(0, 0))
    return tuple(box)


def _label_counts(crop: np.ndarray, conv, source: str) -> dict[int, int]:
    """{label value: voxels} of the non-zero box, checked against the convention."""
    if crop.dtype.kind in "ui" and (crop.size == 0 or 0 <= crop.min() and crop.max() <= 255):
        counts = np.bincount(crop.ravel(), minlength=1)
        values = np.flatnonzero(counts)
        found = dict(zip(values.tolist(), counts[values].tolist()))
    else:
        values, counts = np.unique(crop, return_counts=True)
        found = dict(zip(values.tolist(), counts.tolist()))
    validate_labels(list(found), conv, source)
    return {int(v): int(n) for v, n in found.items()}


def _ml(voxels: int, vox_ml: float) -> float:
    """`voxels` in mL, to 1e-6 mL (a thousandth of a 1 mm voxel)."""
    return round(voxels * vox_ml, 6)


def _largest(mask: np.ndarray, offset: np.ndarray, affine: np.ndarray, vox_ml: float):
    """Lesion count of a boolean box, and its largest lesion's volume and world box."""
    comps, n = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    if n == 0:
        return 0, None
    sizes = np.bincount(comps.ravel())
    k = int(np.argmax(sizes[1:])) + 1
    where = ndimage.find_objects(comps, max_label=k)[k - 1]
    idx = np.argwhere(comps[where] == k) + offset + [s.start for s in where]
    centres = idx @ affine[:3, :3].T + affine[:3, 3]
    # Half the extent of one voxel's box along each world axis: ½ Σ_j |A_ij| (a voxel
    # 5 mm thick along S, stored PIR: columns (0,-1,0), (0,0,-5), (1,0,0) → ½·(1, 1, 5)).
    half = 0.5 * np.abs(affine[:3, :3]).sum(axis=1)
    lo, hi = centres.min(axis=0) - half, centres.max(axis=0) + half
    return n, {"ml": _ml(int(sizes[k]), vox_ml), "voxels": int(sizes[k]),
               "extent_mm": [round(float(v), 3) for v in hi - lo],
               "box_ras_mm": [[round(float(v), 3) for v in lo], [round(float(v), 3) for v in hi]]}


def _task(convention: str, task: "str | Task | None") -> Task:
    """`task`, or the one the convention's labels detect (brats2024 → gli2024: RC a region)."""
    return get_task(task) if task is not None else detect_task(convention)[0]


def case_volumetry(labels: np.ndarray, affine: np.ndarray, convention: str,
                   source: str = "label map", task: "str | Task | None" = None) -> dict:
    """Volumetry of one `(X, Y, Z)` label map in `convention` on the grid `affine`
    (voxel → RAS+ mm): ``{"label_convention", "voxel_ml", "connectivity",
    "task", "labels": {name: mL}, "regions": {region: mL} (the task's outputs), "lesions": {region: count},
    "largest": {region: {"ml", "voxels", "extent_mm": [RL, AP, SI], "box_ras_mm":
    [lower, upper]} or None}}`` (see the module docstring for the definitions).
    Label values outside the convention are a `LabelError` naming `source`."""
    conv = get_convention(convention)
    lab = np.asarray(labels)
    if lab.ndim != 3:
        raise MedsegError(f"{source}: expected a 3D label map, found shape {lab.shape}")
    aff = np.asarray(affine, dtype=np.float64)
    vox = voxel_ml(aff, source)
    # Everything below works on the tumour's box: a few % of a BraTS volume.
    box = _nonzero_box(lab)
    crop = lab[box]
    counts = _label_counts(crop, conv, source)
    offset = np.array([s.start for s in box])
    t = _task(conv.name, task)
    out = {"label_convention": conv.name, "task": t.name, "voxel_ml": vox, "connectivity": CONNECTIVITY,
           "labels": {conv.names[v]: _ml(counts.get(v, 0), vox) for v in sorted(conv.names) if v != 0},
           "regions": {}, "lesions": {}, "largest": {}}
    groups = t.region_values(conv)
    for r in t.outputs:
        mask = np.isin(crop, groups[r])
        out["regions"][r] = _ml(sum(counts.get(v, 0) for v in groups[r]), vox)
        out["lesions"][r], out["largest"][r] = _largest(mask, offset, aff, vox)
    return out


def mask_volumetry(path: Path, convention: str, task: "str | Task | None" = None) -> dict:
    """`case_volumetry` of a mask file (its own header's grid)."""
    img = load_header(Path(path))
    if len(img.shape) != 3:
        raise MedsegError(f"{path}: expected a 3D label map, found shape {img.shape}")
    # float32 holds every label value exactly, and a non-integer one (a mask resampled
    # with linear interpolation) is then an error instead of being truncated.
    return case_volumetry(load_array(Path(path), img), img.affine, convention, str(path), task)


def _slug(name: str) -> str:
    """A label name as a column name: ``NCR/NET`` → ``NCR_NET``."""
    return re.sub(r"[^0-9A-Za-z]+", "_", name).strip("_")


def csv_columns(convention: str, task: "str | Task | None" = None) -> list[str]:
    """``volumes.csv`` columns: ``case_id, label_convention, voxel_ml``, one
    ``label_<name>_ml`` per label, then per region ``<R>_ml``, ``<R>_lesions``,
    ``<R>_largest_ml`` and ``<R>_largest_{rl,ap,si}_mm``."""
    conv = get_convention(convention)
    cols = ["case_id", "label_convention", "voxel_ml"]
    cols += [f"label_{_slug(conv.names[v])}_ml" for v in sorted(conv.names) if v != 0]
    for r in _task(conv.name, task).outputs:
        cols += [f"{r}_ml", f"{r}_lesions", f"{r}_largest_ml", *(f"{r}_largest_{a}_mm" for a in _AXES)]
    return cols


def volume_row(case_id: str, vol: Mapping) -> dict:
    """One ``volumes.csv`` row from a `case_volumetry` dict (empty cells: no lesion)."""
    row = {"case_id": case_id, "label_convention": vol["label_convention"],
           "voxel_ml": f"{vol['voxel_ml']:.6g}"}
    row.update({f"label_{_slug(k)}_ml": f"{v:.4f}" for k, v in vol["labels"].items()})
    for r in vol["regions"]:
        big = vol["largest"][r] or {}
        row.update({f"{r}_ml": f"{vol['regions'][r]:.4f}", f"{r}_lesions": vol["lesions"][r],
                    f"{r}_largest_ml": f"{big['ml']:.4f}" if big else ""})
        row.update({f"{r}_largest_{a}_mm": f"{big['extent_mm'][i]:.2f}" if big else ""
                    for i, a in enumerate(_AXES)})
    return row


def write_volumes_csv(target: Path, rows: Sequence[tuple[str, Mapping]], convention: str,
                      task: "str | Task | None" = None) -> Path:
    """``volumes.csv`` from (case id, `case_volumetry` dict) pairs, written atomically."""
    conv = get_convention(convention).name
    for cid, vol in rows:
        if vol.get("label_convention") != conv:
            raise MedsegError(f"case {cid}: its volumes were measured under the "
                              f"{vol.get('label_convention')} labels, the batch is {conv}; "
                              "predict one dataset at a time")
    with atomic_path(Path(target)) as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=csv_columns(conv, task), extrasaction="ignore")
            w.writeheader()
            w.writerows(volume_row(cid, vol) for cid, vol in rows)
    return Path(target)


def write_batch_volumes(out_dir: Path, cases: Sequence[tuple[str, Path]], convention: str,
                        task: "str | Task | None" = None) -> Path:
    """``out_dir/volumes.csv`` at the end of a batch, one row per (case id, mask):
    the volumetry each case's prediction recorded in ``predictions.json`` (kept
    for the cases a resumed batch skipped), measured from the mask file for a case
    whose record has none (a batch begun by an older medseg)."""
    records = read_manifest(Path(out_dir)).get("cases", {})
    rows = []
    for cid, mask in cases:
        vol = (records.get(cid) or {}).get("volumes")
        t = _task(convention, task).name
        if not (isinstance(vol, dict) and vol.get("label_convention") == get_convention(convention).name
                and vol.get("task", t) == t and set(vol.get("regions", {})) == set(get_task(t).outputs)):
            vol = mask_volumetry(mask, convention, t)
        rows.append((cid, vol))
    return write_volumes_csv(Path(out_dir) / VOLUMES_CSV, rows, convention, task)
