"""Viewer-ready label files beside a mask (torch-free): `medseg predict --viewer-files`.

Beside ``<case_id>.nii.gz`` it writes

- ``<case_id>.itksnap.txt``: an ITK-SNAP label description file (Segmentation →
  Import Label Descriptions), one line per label value of the convention:
  ``IDX -R- -G- -B- -A-- VIS MSH "LABEL"``;
- ``<case_id>.seg.nrrd``: a 3D Slicer segmentation (opens as a Segmentation node
  with named, coloured segments): the mask's voxels as they are (one shared
  labelmap layer), each label value a segment (``Segment{i}_ID/_Name/_Color/
  _LabelValue/_Layer/_Extent``), the grid in LPS, as Slicer stores it.

Names are the convention's (``NETC``, ``SNFH``, ``ET``, ``RC``; ``NCR/NET``, ``ED``,
``ET``; MSD's), colours `medseg.labels.CLASS_COLOURS`, the table of the report's
overlays and legends. Every label of the convention is listed, present or not,
so a reviewer who adds a missing ET finds it named and coloured.

Geometry: NIfTI's affine maps voxels to RAS+ mm, NRRD's ``space directions``
and ``space origin`` here to LPS mm: x and y change sign, z does not
(``LPS = diag(-1, -1, 1) · RAS``). The voxel array is not reordered, so voxel
(i, j, k) of the ``.seg.nrrd`` is voxel (i, j, k) of the mask.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from medseg.data.io import atomic_path
from medseg.errors import MedsegError
from medseg.labels import CLASS_COLOURS, get_convention, validate_labels

__all__ = ["SEG_NRRD_SUFFIX", "ITKSNAP_SUFFIX", "viewer_paths", "itksnap_text", "write_itksnap_labels",
           "seg_nrrd_header", "write_seg_nrrd", "write_viewer_files"]

SEG_NRRD_SUFFIX = ".seg.nrrd"
ITKSNAP_SUFFIX = ".itksnap.txt"

#: RAS+ → LPS+ (and back): x and y change sign.
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])

_ITKSNAP_HEAD = """\
################################################
# ITK-SnAP Label Description File
# File format:
# IDX   -R-  -G-  -B-  -A--  VIS MSH  LABEL
# Fields:
#    IDX:   Zero-based index
#    -R-:   Red color component (0..255)
#    -G-:   Green color component (0..255)
#    -B-:   Blue color component (0..255)
#    -A-:   Label transparency (0.00 .. 1.00)
#    VIS:   Label visibility (0 or 1)
#    MSH:   Label mesh visibility (0 or 1)
#  LABEL:   Label description
################################################
"""


def viewer_paths(out_dir: Path, case_id: str) -> list[Path]:
    """The viewer files of one case: ``[<case_id>.seg.nrrd, <case_id>.itksnap.txt]``."""
    return [Path(out_dir) / f"{case_id}{SEG_NRRD_SUFFIX}", Path(out_dir) / f"{case_id}{ITKSNAP_SUFFIX}"]


def _segments(convention: str) -> list[tuple[int, str, tuple[int, int, int]]]:
    """(label value, name, RGB 0-255) of every non-background label of `convention`."""
    conv = get_convention(convention)
    return [(v, conv.names[v], CLASS_COLOURS[cls]) for v, cls in conv.classes().items()]


def itksnap_text(convention: str) -> str:
    """The ITK-SNAP label description file of `convention` (label 0: "Clear Label")."""
    lines = [f"{0:5d} {0:5d} {0:4d} {0:4d} {0:8g} {0:2d} {0:2d}    \"Clear Label\""]
    for v, name, (r, g, b) in _segments(convention):
        lines.append(f"{v:5d} {r:5d} {g:4d} {b:4d} {1:8g} {1:2d} {1:2d}    \"{name}\"")
    return _ITKSNAP_HEAD + "\n".join(lines) + "\n"


def write_itksnap_labels(convention: str, target: Path) -> None:
    """Write `itksnap_text` to `target`, atomically."""
    with atomic_path(Path(target)) as tmp:
        tmp.write_text(itksnap_text(convention))


def _extents(labels: np.ndarray, convention: str, source: str) -> dict[int, str]:
    """Slicer's ``Segment{i}_Extent`` of each label value: first and last voxel index
    along each axis; ``0 -1 0 -1 0 -1`` when absent (Slicer's empty extent). Values
    outside `convention` are a `LabelError` naming `source`."""
    conv = get_convention(convention)
    box = [np.flatnonzero(np.any(labels, axis=tuple(a for a in range(3) if a != ax))) for ax in range(3)]
    lo = [int(b[0]) if b.size else 0 for b in box]
    crop = labels[tuple(slice(lo[ax], int(box[ax][-1]) + 1 if box[ax].size else 0) for ax in range(3))]
    validate_labels(np.flatnonzero(np.bincount(crop.ravel(), minlength=1)), conv, source)
    out = {}
    for v in conv.classes():
        where = crop == v
        parts = []
        for ax in range(3):
            hit = np.flatnonzero(np.any(where, axis=tuple(a for a in range(3) if a != ax)))
            parts += [lo[ax] + int(hit[0]), lo[ax] + int(hit[-1])] if hit.size else [0, -1]
        out[v] = " ".join(map(str, parts))
    return out


def seg_nrrd_header(labels: np.ndarray, affine: np.ndarray, convention: str,
                    source: str = "mask") -> dict:
    """The pynrrd header of a Slicer segmentation of uint8 `labels` `(X, Y, Z)` on
    the NIfTI grid `affine` (voxel → RAS+ mm)."""
    a = np.asarray(affine, dtype=np.float64)
    lps = _RAS_TO_LPS @ a[:3, :]
    head = {"space": "left-posterior-superior",
            # pynrrd: row i is the direction (LPS mm) of array axis i = column i of the matrix.
            "space directions": lps[:, :3].T, "space origin": lps[:, 3],
            "kinds": ["domain", "domain", "domain"], "encoding": "gzip",
            "Segmentation_MasterRepresentation": "Binary labelmap",
            "Segmentation_ContainedRepresentationNames": "Binary labelmap|",
            "Segmentation_ReferenceImageExtentOffset": "0 0 0"}
    extents = _extents(labels, convention, source)
    for i, (v, name, rgb) in enumerate(_segments(convention)):
        head.update({f"Segment{i}_ID": f"Segment_{v}", f"Segment{i}_Name": name,
                     f"Segment{i}_NameAutoGenerated": "0",
                     f"Segment{i}_Color": " ".join(f"{c / 255:.6g}" for c in rgb),
                     f"Segment{i}_ColorAutoGenerated": "0", f"Segment{i}_LabelValue": str(v),
                     f"Segment{i}_Layer": "0", f"Segment{i}_Extent": extents[v],
                     f"Segment{i}_Tags": "|"})
    return head


def write_seg_nrrd(labels: np.ndarray, affine: np.ndarray, convention: str, target: Path) -> None:
    """Write `labels` `(X, Y, Z)` as a Slicer ``.seg.nrrd`` on the grid `affine`, atomically
    (gzip level 1: a BraTS mask is mostly zeros, and level 9 only costs time)."""
    import nrrd
    lab = np.asarray(labels)
    if lab.ndim != 3 or (lab.dtype != np.uint8 and not np.array_equal(lab, lab.astype(np.uint8))):
        raise MedsegError(f"{target}: expected a 3D label map of integers 0-255, found shape "
                          f"{lab.shape}, {lab.dtype}")
    lab = lab.astype(np.uint8, copy=False)
    head = seg_nrrd_header(lab, affine, convention, str(target))
    with atomic_path(Path(target)) as tmp:
        nrrd.write(str(tmp), lab, head, compression_level=1, index_order="F")


def write_viewer_files(labels: np.ndarray, affine: np.ndarray, convention: str,
                       targets: Sequence[Path]) -> None:
    """Both viewer files of one mask, at `targets` (`viewer_paths`' order)."""
    seg, itk = targets
    write_seg_nrrd(labels, affine, convention, seg)
    write_itksnap_labels(convention, itk)
