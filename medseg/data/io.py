"""Reading NIfTI files with errors for people, and atomic writes.

Every failure names the file, what was expected and how to fix it, instead of a
nibabel or gzip traceback. Every write goes to a temporary file in the target
folder first and is renamed into place, so an interrupted run never leaves a
half-written mask, datalist or checkpoint.
"""

from __future__ import annotations

import gzip
import json
import os
import tempfile
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import nibabel as nib
import numpy as np

from medseg.errors import DataError, MedsegError
from medseg.labels import get_convention

__all__ = [
    "NIFTI_SUFFIXES",
    "AFFINE_TOL",
    "same_grid",
    "is_nifti",
    "nifti_stem",
    "load_header",
    "load_array",
    "atomic_path",
    "write_json",
    "write_nifti",
    "write_label_map",
    "write_region_maps",
]

NIFTI_SUFFIXES = (".nii.gz", ".nii")

# Errors nibabel raises for truncated, corrupt or foreign files.
_READ_ERRORS = (OSError, EOFError, ValueError, zlib.error, gzip.BadGzipFile,
                nib.filebasedimages.ImageFileError, nib.spatialimages.HeaderDataError)


#: Largest difference between two affines' entries for "the same grid" (mm for the
#: translation, unitless for the rotation and scale part): 1e-3 mm is far below any
#: voxel size, yet above the float32 rounding of headers written by other tools.
AFFINE_TOL = 1e-3


def same_grid(shape_a, affine_a, shape_b, affine_b, tol: float = AFFINE_TOL) -> bool:
    """The one rule for "two images lie on the same grid": equal 3D shapes, and
    affines equal within `tol` (absolute, entry by entry)."""
    return (tuple(shape_a)[:3] == tuple(shape_b)[:3]
            and bool(np.allclose(np.asarray(affine_a), np.asarray(affine_b), rtol=0, atol=tol)))


def is_nifti(path: Path) -> bool:
    name = path.name
    return not name.startswith("._") and name.endswith(NIFTI_SUFFIXES)


def nifti_stem(path: Path) -> str:
    """`BraTS2021_00000_t1.nii.gz` → `BraTS2021_00000_t1`."""
    name = path.name
    for suf in NIFTI_SUFFIXES:
        if name.endswith(suf):
            return name[: -len(suf)]
    return path.stem


def load_header(path: Path) -> nib.Nifti1Image:
    """Open a NIfTI image lazily (header only; data is read on demand)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        img = nib.load(str(path))
    except _READ_ERRORS as exc:
        raise DataError(
            f"{path}: not a readable NIfTI file ({type(exc).__name__}: {exc}); expected a "
            ".nii or .nii.gz image: re-export or re-download this file") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise DataError(f"{path}: expected a NIfTI image, found {type(img).__name__}; "
                        "convert it to .nii.gz")
    return img


def load_array(path: Path, img: nib.Nifti1Image | None = None,
               dtype: type = np.float32) -> np.ndarray:
    """Read the voxel data of `path`; a truncated file is a `DataError`, not a traceback."""
    img = img if img is not None else load_header(path)
    try:
        return np.asarray(img.dataobj, dtype=dtype)
    except _READ_ERRORS as exc:
        raise DataError(
            f"{path}: image data could not be read ({type(exc).__name__}: {exc}); the file is "
            "probably truncated or corrupt: re-export or re-download it") from None


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path next to `target`; rename it onto `target` on success.

    The temporary name keeps `target`'s suffixes (nibabel picks compression from
    `.nii.gz`). On any exception the temporary file is removed and `target` is
    untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(target.suffixes) or ".tmp"
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name.split('.')[0]}.", suffix=suffix,
                               dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp creates 0600; give the result the permissions a plain open() would
    # (0666 minus the umask), so colleagues can read the masks.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_json(obj: object, target: Path) -> None:
    """Write `obj` as indented JSON to `target`, atomically."""
    with atomic_path(target) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


def write_nifti(array: np.ndarray, affine: np.ndarray, target: Path,
                header: nib.Nifti1Header | None = None, intent: str = "none",
                cal: tuple[float, float] | None = None, descrip: str = "") -> None:
    """Write `array` on the grid `affine` to `target` (.nii or .nii.gz), atomically.

    With `header` (the input image's), only its *geometry* is copied: qform/sform
    codes, spatial zooms and units, so a mask has the same header geometry as the
    scan. Its display fields are not: an MSD 4D image's ``intent=vector`` or a
    scan's ``cal_max`` of 3000 would make viewers show labels 1-4 as black. `intent`
    (a NIfTI intent name, e.g. "label") and `cal` (display range) describe `array`.
    """
    img = nib.Nifti1Image(array, affine)
    hdr = img.header
    if header is not None:
        # The input's codes exactly (0 included): a viewer then picks the same
        # geometry source (qform or sform) for the mask as for the scan.
        img.set_qform(affine, int(header["qform_code"]))
        img.set_sform(affine, int(header["sform_code"]))
        zooms = tuple(header.get_zooms()[:3]) + (1.0,) * (array.ndim - 3)
        hdr.set_zooms(zooms[:array.ndim])
        hdr.set_xyzt_units(header.get_xyzt_units()[0])
    hdr.set_intent(intent)
    if cal is not None:
        hdr["cal_min"], hdr["cal_max"] = cal
    if descrip:
        hdr["descrip"] = descrip.encode("ascii", "replace")[:79]
    img.set_data_dtype(array.dtype)
    with atomic_path(target) as tmp:
        nib.save(img, str(tmp))


def write_label_map(labels: np.ndarray, ref: nib.Nifti1Image, target: Path, convention: str,
                    source: str = "medseg") -> None:
    """A uint8 mask on `ref`'s grid: NIfTI intent "label", display range 0..the
    convention's largest value, and ``descrip`` naming the label convention (e.g.
    "medseg 0.1.0 labels=brats2023"), written atomically."""
    conv = get_convention(convention)
    write_nifti(np.asarray(labels, np.uint8), ref.affine, Path(target), header=ref.header,
                intent="label", cal=(0.0, float(max(conv.names))), descrip=f"{source} labels={conv.name}")


def write_region_maps(maps: np.ndarray, ref: nib.Nifti1Image, target: Path, descrip: str,
                      cal: tuple[float, float] = (0.0, 1.0),
                      regions: tuple[str, ...] = ("TC", "WT", "ET")) -> None:
    """`(R, X, Y, Z)` float maps of the model's `regions` (probabilities, uncertainty) →
    one 4D float32 image (X, Y, Z, R) on `ref`'s grid (its geometry only), display
    range `cal`, ``descrip`` followed by the region names ("TC,WT,ET"), written atomically."""
    if len(maps) != len(regions):
        raise MedsegError(f"internal error: {len(maps)} maps for the regions {list(regions)}")
    write_nifti(np.ascontiguousarray(np.moveaxis(maps, 0, -1), dtype=np.float32), ref.affine,
                Path(target), header=ref.header, cal=cal, descrip=f"{descrip} {','.join(regions)}")
