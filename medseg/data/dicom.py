"""DICOM in and out for `medseg predict`: four MR series → one case; the predicted
mask → a DICOM Segmentation (SEG) that references the source images.

Input layout. A case is a folder with one subfolder per series, named after the
modality (case-insensitive; the BraTS 2021 or 2023 names)::

    CASE/t1/  CASE/t1ce/  CASE/t2/  CASE/flair/        (or t1n/ t1c/ t2w/ t2f/)

and ``--input ROOT`` takes one such case folder or a folder of them (other
subfolders of a case, e.g. ``dwi/``, are ignored); the loose options
``--t1 DIR --t1ce DIR --t2 DIR --flair DIR`` take four series folders.
Each series folder holds the single-frame MR images of exactly one series and
nothing else (hidden files such as ``.DS_Store`` are ignored). Every series is
read and checked before anything is written (`read_series`): DICOM files only,
MR images only, one SeriesInstanceUID, one orientation and pixel grid, slices
equally spaced along their normal (a missing slice shows as a gap), pixel data
decodable; and the series of a case belong to one patient and share one grid
(co-registered, as BraTS data are), like the NIfTI files of a case.

Geometry. DICOM patient coordinates are LPS, NIfTI's are RAS. A series becomes
a `(columns, rows, slices)` volume with the affine of PS3.3 C.7.6.2.1.1
(column step = first ImageOrientationPatient cosine × column spacing, row step =
second cosine × row spacing, slice step = (last − first position) / (n − 1),
origin = first position), rows 0 and 1 negated for RAS. Prediction runs on a
temporary NIfTI copy of the case (`DicomCase.to_nifti`), so both engines read it
as any NIfTI input, and the mask lands on the series' own grid.

Output. `write_seg` writes one BINARY Segmentation per case with highdicom,
referencing the images of the T1ce series (the sequence on which enhancing
tumour and necrosis are defined; then FLAIR, T1, T2 when T1ce is missing): one
frame per source image, one segment per class of the label convention in the
order NCR, ED, ET, then RC (brats2024) or CC (brats2024-ped), whatever the label
values (segment numbers must run 1, 2, 3, …), the tumour classes coded as the DICOM
standard's CID 7168 "Brain Lesion Segmentation Type With Necrosis" codes them:
necrosis SCT 6574001, edema SCT 79654002, and enhancing tumour NCIt C113842
"Enhancing Lesion" (SNOMED CT has no concept for it). Label 1 is BraTS's
necrotic and non-enhancing tumour core, one label since 2017, which a model
cannot split: it is coded as necrosis, and its segment label gives the
convention's own name (NCR/NET, NETC, non-enhancing tumour). The resection
cavity is coded as post-surgical anatomy (SCT 245849007, category anatomical
structure) and the paediatric cystic component as cyst (SCT 367643001): CID 7168
has neither. Its slice
thickness and spacing between slices are the slice step measured from the
positions, never the source's SliceThickness / SpacingBetweenSlices, which other
writers (GDCM: SimpleITK, ITK) fill with 1 or the acquired thickness.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import nibabel as nib
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from medseg import __version__
from medseg.data.cases import InputCase
from medseg.data.io import atomic_path, same_grid
from medseg.errors import DataError, MedsegError
from medseg.labels import CHANNELS, CLASS_COLOURS, get_convention

__all__ = ["SERIES_NAMES", "REFERENCE_ORDER", "MR_IMAGE_STORAGE", "DicomSeries", "DicomCase",
           "read_series", "read_series_files", "dicom_case", "dicom_cases", "is_dicom_input", "write_seg", "seg_segments",
           "write_series"]

#: Series folder names (lower case) → medseg channel: the BraTS 2021 and 2023 modality names.
SERIES_NAMES: dict[str, str] = {"t1": "t1", "t1n": "t1", "t1ce": "t1ce", "t1c": "t1ce",
                                "t2": "t2", "t2w": "t2", "flair": "flair", "t2f": "flair"}

#: The series the Segmentation references, first present wins.
REFERENCE_ORDER: tuple[str, ...] = ("t1ce", "flair", "t1", "t2")

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"

#: Multi-frame MR storage (Enhanced, Legacy Converted Enhanced): refused with a way out.
_MULTI_FRAME_MR = ("1.2.840.10008.5.1.4.1.1.4.1", "1.2.840.10008.5.1.4.1.1.4.4")

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

_FIX_FOLDER = "a series folder must hold the images of one MR series and nothing else"


@dataclass
class DicomSeries:
    """One checked series: its files sorted along the slice normal, their headers
    (pixel data dropped) and the RAS affine of its `(columns, rows, slices)` grid."""

    folder: Path
    files: list[Path]
    headers: list[Dataset]
    affine: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        return int(self.headers[0].Columns), int(self.headers[0].Rows), len(self.files)

    @property
    def uid(self) -> str:
        return str(self.headers[0].SeriesInstanceUID)

    def volume(self) -> np.ndarray:
        """`(columns, rows, slices)` float32 values (modality LUT or rescale applied)."""
        out = np.empty(self.shape, np.float32)
        for k, path in enumerate(self.files):
            out[:, :, k] = _pixels(_read(path), path).T
        return out


@dataclass
class DicomCase:
    """The series of one case, keyed by channel in `CHANNELS` order."""

    series: dict[str, DicomSeries] = field(default_factory=dict)

    @property
    def reference(self) -> DicomSeries:
        """The series the Segmentation references (`REFERENCE_ORDER`)."""
        return self.series[next(c for c in REFERENCE_ORDER if c in self.series)]

    def to_nifti(self, folder: Path) -> list[Path]:
        """Write each series as ``folder/<channel>.nii`` (float32, qform and sform
        "scanner") → the files, in `CHANNELS` order."""
        out = []
        for ch, s in self.series.items():
            img = nib.Nifti1Image(s.volume(), s.affine)
            img.set_qform(s.affine, 1)
            img.set_sform(s.affine, 1)
            nib.save(img, str(Path(folder) / f"{ch}.nii"))
            out.append(Path(folder) / f"{ch}.nii")
        return out


# ------------------------------------------------------------------ reading
def _read(path: Path) -> Dataset:
    """A DICOM file, or a `DataError` naming it (a file without the DICM preamble
    is accepted when it still parses as a dataset with a SOP class)."""
    try:
        return pydicom.dcmread(path)
    except InvalidDicomError:
        pass
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on broken files
        raise DataError(f"{path}: not a readable DICOM file ({type(exc).__name__}: {exc}); "
                        f"{_FIX_FOLDER}: re-export the series or move this file out") from None
    try:
        ds = pydicom.dcmread(path, force=True)
        if "SOPClassUID" in ds:
            return ds
    except Exception:  # noqa: BLE001 - not DICOM at all: said below
        pass
    raise DataError(f"{path}: not a DICOM file; {_FIX_FOLDER}: move this file out of {path.parent}")


def _pixels(ds: Dataset, path: Path) -> np.ndarray:
    """`(rows, columns)` float values of one image, or a `DataError` naming the file."""
    from pydicom.pixels import apply_modality_lut
    try:
        arr = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - decoders raise many types
        raise DataError(f"{path}: pixel data could not be decoded ({type(exc).__name__}: {exc}); the "
                        "file is truncated, corrupt, or compressed with a codec no installed decoder "
                        "reads (pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg): re-export "
                        "the series uncompressed") from None
    if arr.ndim != 2:
        raise DataError(f"{path}: pixel data of shape {arr.shape}; expected one greyscale slice")
    return np.asarray(apply_modality_lut(arr, ds), np.float32)


def _image(path: Path) -> Dataset:
    """One checked single-frame MR image, pixel data decoded once (then dropped)."""
    ds = _read(path)
    sop = str(ds.get("SOPClassUID", ""))
    if sop != MR_IMAGE_STORAGE:
        name = pydicom.uid.UID(sop).name if sop else "none"
        what = ("a multi-frame (enhanced) MR image, which medseg does not read: export the series as "
                "classic single-frame MR images, or convert it to NIfTI (e.g. dcm2niix) and pass the "
                "NIfTI files" if sop in _MULTI_FRAME_MR else f"not an MR image; {_FIX_FOLDER}: move it out")
        raise DataError(f"{path}: SOP class {name} ({sop}); expected MR Image Storage "
                        f"({MR_IMAGE_STORAGE}): {what}")
    missing = [a for a in ("SeriesInstanceUID", "ImagePositionPatient", "ImageOrientationPatient",
                           "PixelSpacing", "Rows", "Columns", "PixelData") if a not in ds]
    if missing:
        raise DataError(f"{path}: no {', '.join(missing)}; expected an MR image with its position, "
                        "orientation and pixel spacing: re-export the series from the scanner or PACS")
    if int(ds.get("SamplesPerPixel", 1)) != 1 or int(ds.get("NumberOfFrames", 1) or 1) != 1:
        raise DataError(f"{path}: {ds.get('SamplesPerPixel', 1)} samples per pixel, "
                        f"{ds.get('NumberOfFrames', 1)} frames; expected one greyscale frame per file")
    _pixels(ds, path)
    del ds.PixelData
    return ds


def _one_series(folder: str | Path, images: Sequence[Dataset]) -> None:
    uids: dict[str, list[Dataset]] = {}
    for ds in images:
        uids.setdefault(str(ds.SeriesInstanceUID), []).append(ds)
    if len(uids) > 1:
        found = "; ".join(f"{uid} ({str(v[0].get('SeriesDescription', '')) or 'no description'}, "
                          f"{len(v)} images)" for uid, v in uids.items())
        raise DataError(f"{folder}: {len(uids)} series in one folder (SeriesInstanceUID {found}); "
                        "expected one series per folder: move each series into a folder of its own")


def _check_same(folder: str | Path, files: Sequence[Path], images: Sequence[Dataset], attr: str,
                tol: float) -> None:
    ref = np.asarray(images[0].get(attr), np.float64)
    for path, ds in zip(files[1:], images[1:]):
        val = np.asarray(ds.get(attr), np.float64)
        if val.shape != ref.shape or not np.allclose(val, ref, atol=tol):
            raise DataError(f"{folder}: {path.name} has {attr} {val.tolist()}, {files[0].name} "
                            f"{ref.tolist()}; expected one 3D volume (one orientation and pixel "
                            "grid): a series of several stacks (e.g. a localizer) is not one volume")


def _geometry(folder: str | Path, files: Sequence[Path],
              images: Sequence[Dataset]) -> tuple[np.ndarray, np.ndarray]:
    """→ (the slice order along the normal, the RAS affine of the sorted volume);
    a `DataError` for duplicate, missing, unevenly spaced or sheared slices."""
    for attr, tol in (("ImageOrientationPatient", 1e-4), ("PixelSpacing", 1e-4), ("Rows", 0), ("Columns", 0)):
        _check_same(folder, files, images, attr, tol)
    if len(images) < 2:
        raise DataError(f"{folder}: one image; expected a 3D series (at least 2 slices)")
    iop = np.asarray(images[0].ImageOrientationPatient, np.float64)
    normal = np.cross(iop[:3], iop[3:])
    pos = np.asarray([ds.ImagePositionPatient for ds in images], np.float64)
    order = np.argsort(pos @ normal, kind="stable")
    pos, names = pos[order], [files[i].name for i in order]
    depth = pos @ normal
    steps = np.diff(depth)
    step = float(np.median(steps))
    # Positions are decimal strings: allow 1 % of the spacing (0.01 mm at 1 mm).
    tol = max(0.01 * step, 1e-3)
    dup = np.flatnonzero(steps < tol)
    if dup.size:
        i = int(dup[0])
        raise DataError(f"{folder}: {names[i]} and {names[i + 1]} lie at the same position "
                        f"({depth[i]:.2f} mm along the slice normal); expected one 3D volume, found "
                        "several images per position (echoes, time points or repeated acquisitions): "
                        "put each volume in a folder of its own")
    bad = np.flatnonzero(np.abs(steps - step) > tol)
    if bad.size:
        i = int(bad[0])
        gap = float(steps[i])
        lost = round(gap / step) - 1
        what = (f"{lost} slice(s) missing" if lost >= 1 and abs(gap - (lost + 1) * step) <= tol
                else "uneven slice spacing")
        raise DataError(f"{folder}: {names[i]} and {names[i + 1]} are {gap:.3f} mm apart, the other "
                        f"slices {step:.3f} mm ({what}); expected equally spaced slices: re-export the "
                        "complete series")
    drift = pos - pos[0] - np.outer(depth - depth[0], normal)
    if np.abs(drift).max() > max(tol, 1e-2):
        raise DataError(f"{folder}: slices are not stacked along their normal (shifted in-plane by up "
                        f"to {np.abs(drift).max():.2f} mm, e.g. a gantry tilt); expected a rectilinear "
                        "volume: resample the series first")
    row_sp, col_sp = (float(v) for v in images[0].PixelSpacing)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1] = iop[:3] * col_sp, iop[3:] * row_sp
    lps[:3, 2] = (pos[-1] - pos[0]) / (len(pos) - 1)
    lps[:3, 3] = pos[0]
    return order, _LPS_TO_RAS @ lps


def read_series(folder: str | Path) -> DicomSeries:
    """Read and check the DICOM series in `folder` (every file, pixel data decoded);
    the first problem is a `DataError` naming the folder or file and the fix."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: DICOM series folder not found")
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    sub = [p.name for p in entries if p.is_dir()]
    if sub:
        raise DataError(f"{folder}: holds the folder {sub[0]}; expected the DICOM files of one "
                        "series directly in this folder (one folder per series)")
    if not entries:
        raise DataError(f"{folder}: no DICOM files; expected the images of one MR series")
    return read_series_files(entries, folder, folder)


def read_series_files(files: Sequence[str | Path], label: str | Path,
                      folder: str | Path | None = None) -> DicomSeries:
    """Read and check one DICOM series from an explicit list of files (any folders,
    e.g. one series picked out of a folder of mixed files), with the checks of
    `read_series`. `label` names the series in every message about the series as a
    whole (e.g. ``"/data/study1: series 5 't2_tse_tra'"``; messages about one file
    name the file); `folder` becomes `DicomSeries.folder` (default: the files'
    common folder)."""
    files = [Path(f) for f in files]
    if not files:
        raise DataError(f"{label}: no DICOM files; expected the images of one MR series")
    if folder is None:
        folder = Path(os.path.commonpath([str(f.absolute().parent) for f in files]))
    images = [_image(p) for p in files]
    _one_series(label, images)
    order, affine = _geometry(label, files, images)
    return DicomSeries(Path(folder), [files[i] for i in order], [images[i] for i in order], affine)


# ------------------------------------------------------------------- cases
def _series_folders(case_dir: Path) -> dict[str, Path]:
    """The modality-named subfolders of `case_dir`, keyed by channel."""
    found: dict[str, Path] = {}
    for p in sorted(case_dir.iterdir()):
        ch = SERIES_NAMES.get(p.name.lower())
        if ch and p.is_dir():
            if ch in found:
                raise DataError(f"{case_dir}: {found[ch].name}/ and {p.name}/ are both the {ch} series; "
                                "keep one")
            found[ch] = p
    return found


def is_dicom_input(path: str | Path) -> bool:
    """Whether `path` is a DICOM case folder (modality-named series subfolders) or a
    folder of such case folders."""
    path = Path(path)
    if not path.is_dir():
        return False
    if _series_folders(path):
        return True
    return any(p.is_dir() and not p.name.startswith(".") and _series_folders(p) for p in path.iterdir())


def dicom_case(folders: Mapping[str, str | Path | None], case_id: str | None = None) -> InputCase:
    """Series folders keyed by channel (BraTS 2023 names accepted) → one checked case
    (`InputCase.dicom` set; its `images` are the series folders). The case id is
    `case_id`, else the folder that holds the series folders."""
    got = {SERIES_NAMES.get(k.lower(), k): Path(v) for k, v in folders.items() if v}
    bad = [k for k in got if k not in CHANNELS]
    if bad:
        raise MedsegError(f"unknown modality {bad[0]!r}; expected {', '.join(CHANNELS)}")
    if not got:
        raise MedsegError("a DICOM case needs at least one series folder")
    present = [c for c in CHANNELS if c in got]
    series = {c: read_series(got[c]) for c in present}
    _check_case(series)
    parents = {p.absolute().parent for p in got.values()}
    name = case_id or (parents.pop().name if len(parents) == 1 else got[present[0]].name)
    return InputCase(name, [got[c] for c in present], present, None, "", dicom=DicomCase(series))


def _check_case(series: Mapping[str, DicomSeries]) -> None:
    """The series of one case: one patient, one grid."""
    (ch0, s0), *rest = series.items()
    for _, s in rest:
        pid, pid0 = str(s.headers[0].get("PatientID", "")), str(s0.headers[0].get("PatientID", ""))
        if pid != pid0:
            raise DataError(f"{s.folder}: PatientID {pid!r}, but {s0.folder} ({ch0}) has {pid0!r}; "
                            "the series of a case must come from one patient")
        if not same_grid(s.shape, s.affine, s0.shape, s0.affine):
            raise DataError(
                f"{s.folder}: grid {s.shape} of {_spacing(s)} mm voxels, first at LPS {_origin(s)} mm, "
                f"does not match {s0.folder} ({ch0}: {s0.shape}, {_spacing(s0)} mm, {_origin(s0)}); "
                "the series of a case must be co-registered on one grid, as BraTS data are: resample "
                "them onto one series' grid (e.g. with the BraTS preprocessing) before predicting")


def _spacing(s: DicomSeries) -> list[float]:
    return [round(float(v), 3) for v in np.linalg.norm(s.affine[:3, :3], axis=0)]


def _origin(s: DicomSeries) -> list[float]:
    return [round(float(v), 2) for v in _LPS_TO_RAS[:3, :3] @ s.affine[:3, 3]]   # back to LPS


def dicom_cases(root: str | Path) -> tuple[list[InputCase], Path]:
    """A DICOM case folder, or a folder of them → checked cases and `root`."""
    root = Path(root)
    if _series_folders(root):
        return [dicom_case(_series_folders(root), root.name)], root
    cases = []
    for p in sorted(q for q in root.iterdir() if q.is_dir() and not q.name.startswith(".")):
        folders = _series_folders(p)
        if not folders:
            names = ", ".join(q.name for q in sorted(p.iterdir())[:5]) or "nothing"
            raise DataError(f"{p}: no series folder named {', '.join(SERIES_NAMES)}; found {names}. "
                            f"Each case folder of {root} holds one folder per series, named after its "
                            "modality: rename them, or move this folder out")
        cases.append(dicom_case(folders, p.name))
    if not cases:
        raise DataError(f"{root}: no DICOM case folders (expected CASE/t1/, CASE/t1ce/, CASE/t2/, "
                        "CASE/flair/)")
    return cases, root


# ------------------------------------------------------------------ writing
#: Segment order of the classes (NCR 1, ED 2, ET 3, then RC or CC when the labels hold them).
_SEGMENT_ORDER = ("NCR", "ED", "ET", "RC", "CC")


def seg_segments(convention: str) -> list[tuple[int, str, str]]:
    """The Segmentation's segments for masks in `convention`: (label value, class,
    segment label), one per class the convention holds, in segment-number order (NCR
    1, ED 2, ET 3; brats2024's resection cavity 4; brats2024-ped's cystic component 4)."""
    conv = get_convention(convention)
    return [(conv.value(cls), cls, conv.names[conv.value(cls)]) for cls in _SEGMENT_ORDER
            if conv.value(cls) is not None]


def _descriptions(convention: str, algorithm):
    """Coded concepts per class (DICOM PS3.3 segment description): category
    morphologically abnormal structure (SCT 49755003) for the tumour classes and the
    cyst, with types necrosis (SCT 6574001), edema (SCT 79654002), enhancing lesion
    (NCIt C113842), cyst (SCT 367643001); the resection cavity: category anatomical
    structure (SCT 91723000), type post-surgical anatomy (SCT 245849007)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.sr.coding import Code
    abnormal = codes.SCT.MorphologicallyAbnormalStructure
    concepts = {"NCR": (abnormal, codes.SCT.Necrosis), "ED": (abnormal, codes.SCT.Edema),
                "ET": (abnormal, Code("C113842", "NCIt", "Enhancing Lesion")),
                "CC": (abnormal, Code("367643001", "SCT", "Cyst")),
                "RC": (Code("91723000", "SCT", "Anatomical Structure"),
                       Code("245849007", "SCT", "Post-surgical anatomy"))}
    return [hd.seg.SegmentDescription(
        i, f"{label} (label {value})", concepts[cls][0], concepts[cls][1],
        hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm, anatomic_regions=[codes.SCT.Brain],
        display_color=hd.color.CIELabColor.from_rgb(*CLASS_COLOURS[cls]))
        for i, (value, cls, label) in enumerate(seg_segments(convention), 1)]


def _slice_spacing(series: DicomSeries) -> float:
    """The distance (mm) between consecutive slices of `series`, measured from their
    ImagePositionPatient along the slice normal (the headers are sorted along it)."""
    iop = np.asarray(series.headers[0].ImageOrientationPatient, np.float64)
    normal = np.cross(iop[:3], iop[3:])
    depth = np.asarray([h.ImagePositionPatient for h in series.headers], np.float64) @ normal
    return float((depth[-1] - depth[0]) / (len(depth) - 1))


def _pixel_measures(series: DicomSeries):
    """The Segmentation's pixel measures: the series' PixelSpacing, and a slice
    thickness and spacing between slices both equal to the measured slice step.
    The source's own SliceThickness / SpacingBetweenSlices are not trusted: writers
    such as GDCM (SimpleITK, ITK) put 1 or the acquired thickness there, and a
    reader that stacks the frames by that spacing (highdicom's `get_volume`) then
    refuses the Segmentation or places it on a wrong grid. Thickness = step because
    each mask voxel stands for the whole slab up to the next slice."""
    import highdicom as hd
    step = _slice_spacing(series)
    return hd.PixelMeasuresSequence(pixel_spacing=[float(v) for v in series.headers[0].PixelSpacing],
                                    slice_thickness=step, spacing_between_slices=step)


def _seg_sources(series: DicomSeries, measures) -> list[Dataset]:
    """Copies of the series' headers carrying `measures`: highdicom (0.28) replaces
    the `pixel_measures` it is given by the first source image's whenever the pixel
    spacing is the same, so the measured values must be in the sources as well.
    The series' own headers are left as read."""
    item = measures[0]
    out = []
    for h in series.headers:
        h = copy.deepcopy(h)
        h.SliceThickness, h.SpacingBetweenSlices = item.SliceThickness, item.SpacingBetweenSlices
        out.append(h)
    return out


def _check_measures(seg: Dataset, measures, series: DicomSeries) -> None:
    """The written pixel measures are the measured ones (a later highdicom could
    again substitute the source's: then say so rather than write a wrong grid)."""
    got = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    want = measures[0]
    for attr in ("SpacingBetweenSlices", "SliceThickness"):
        if not np.isclose(float(got.get(attr, np.nan)), float(want.get(attr)), rtol=1e-6):
            raise MedsegError(f"internal error: the Segmentation of {series.folder} has {attr} "
                              f"{got.get(attr)}, expected {want.get(attr)} mm (the slice step measured "
                              "from ImagePositionPatient); the installed highdicom ignores the pixel "
                              "measures medseg gives: report this with `pip show highdicom`")


def write_seg(labels: np.ndarray, case: DicomCase, convention: str, target: str | Path,
              model: str, engine: str) -> Path:
    """`labels` (the mask in `convention` on the reference series' `(columns, rows,
    slices)` grid) → a BINARY DICOM Segmentation at `target`, written atomically:
    one frame per source image (empty frames omitted), segments as `seg_segments`,
    algorithm "medseg" with its version and, as parameters, `model`, `engine` and
    the label convention."""
    import highdicom as hd
    from pydicom.sr.codedict import codes
    ref = case.reference
    labels = np.asarray(labels)
    if labels.shape != ref.shape:
        raise MedsegError(f"internal error: mask {labels.shape} is not on the grid of {ref.folder} "
                          f"{ref.shape}")
    lut = np.zeros(int(labels.max(initial=0)) + 1, np.uint8)
    for number, (value, _, _) in enumerate(seg_segments(convention), 1):
        if value < lut.size:
            lut[value] = number
    if (lut[labels] == 0).sum() != (labels == 0).sum():
        raise MedsegError(f"internal error: mask values {np.unique(labels).tolist()} outside the "
                          f"tumour labels of {convention}")
    frames = np.ascontiguousarray(lut[labels].transpose(2, 1, 0))     # (slices, rows, columns)
    algorithm = hd.AlgorithmIdentificationSequence(
        "medseg", codes.cid7162.ArtificialIntelligence, __version__,
        parameters={"model": model, "engine": engine, "label_convention": convention})
    number = ref.headers[0].get("SeriesNumber")
    measures = _pixel_measures(ref)
    try:
        seg = hd.seg.Segmentation(
            _seg_sources(ref, measures), frames, hd.seg.SegmentationTypeValues.BINARY,
            _descriptions(convention, algorithm),
            hd.UID(), 1000 + int(number or 0), hd.UID(), 1, "medseg", "medseg", __version__, "0",
            content_label="TUMOUR", content_description=f"brain tumour sub-regions, {convention} labels",
            series_description=f"medseg tumour segmentation ({model})"[:64], pixel_measures=measures,
            omit_empty_frames=bool(frames.any()))     # all empty: every frame, as highdicom would
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        raise DataError(f"{ref.folder}: no DICOM Segmentation could reference this series "
                        f"({type(exc).__name__}: {exc}); the NIfTI mask is written: use it, or fix the "
                        "series' DICOM attributes and run again") from None
    _check_measures(seg, measures, ref)
    target = Path(target)
    with atomic_path(target) as tmp:
        seg.save_as(tmp)
    return target


def write_series(image: nib.Nifti1Image, folder: str | Path, description: str = "",
                 uids: Mapping[str, str] | None = None, rescale: tuple[float, float] = (1.0, 0.0),
                 patient_id: str = "MEDSEG-SYNTH", tags: Mapping[str, object] | None = None) -> list[Path]:
    """A NIfTI image → a DICOM MR series in `folder`, one file per slice along its
    third stored axis (synthetic test and benchmark data). `uids` may fix
    StudyInstanceUID and FrameOfReferenceUID (so several series form one study);
    `rescale` is (slope, intercept): stored values are (value − intercept) / slope,
    which must be int16 integers. `tags` sets or overrides DICOM attributes of every
    file by keyword, after the defaults (e.g. SeriesDescription, ProtocolName,
    SeriesNumber, EchoTime, RepetitionTime, InversionTime, ScanningSequence,
    SequenceVariant, MRAcquisitionType, ContrastBolusAgent, ImageType, Manufacturer,
    PatientID, SeriesInstanceUID, AcquisitionTime); a value of None removes the
    attribute; SOPClassUID also sets the file meta's MediaStorageSOPClassUID. The
    defaults are ImageType DERIVED\\SECONDARY, SeriesNumber 1, Manufacturer
    "medseg synthetic" and no acquisition parameters."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    from pydicom.valuerep import format_number_as_ds
    arr = np.asarray(image.dataobj, np.float64)
    slope, intercept = rescale
    stored = (arr - intercept) / slope
    if not np.array_equal(stored, np.round(stored)) or np.abs(stored).max(initial=0) > 32767:
        raise ValueError("values are not int16 integers after rescaling")
    lps = _LPS_TO_RAS @ image.affine
    steps = np.linalg.norm(lps[:3, :3], axis=0)
    iop = [format_number_as_ds(float(v)) for v in (*(lps[:3, 0] / steps[0]), *(lps[:3, 1] / steps[1]))]
    ids = {"StudyInstanceUID": generate_uid(), "FrameOfReferenceUID": generate_uid(), **(uids or {})}
    series = generate_uid()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for k in range(arr.shape[2]):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MR_IMAGE_STORAGE
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.FrameOfReferenceUID = ids["StudyInstanceUID"], ids["FrameOfReferenceUID"]
        ds.SeriesInstanceUID = series
        ds.PatientID, ds.PatientName = patient_id, "Synthetic^Case"
        ds.PatientBirthDate, ds.PatientSex = "", "O"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20240101", "120000", "1", ""
        ds.ReferringPhysicianName, ds.Manufacturer = "", "medseg synthetic"
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "MR", 1, k + 1
        ds.SeriesDescription, ds.ImageType = description, ["DERIVED", "SECONDARY"]
        ds.ImageOrientationPatient = iop
        ds.ImagePositionPatient = [format_number_as_ds(float(v)) for v in (lps @ [0, 0, k, 1])[:3]]
        ds.PixelSpacing = [format_number_as_ds(float(steps[1])), format_number_as_ds(float(steps[0]))]
        ds.SliceThickness = format_number_as_ds(float(steps[2]))
        ds.Rows, ds.Columns = arr.shape[1], arr.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        if rescale != (1.0, 0.0):
            ds.RescaleSlope, ds.RescaleIntercept = format_number_as_ds(slope), format_number_as_ds(intercept)
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T.astype("<i2")).tobytes()
        for key, value in (tags or {}).items():
            if value is None:
                if key in ds:
                    delattr(ds, key)
            else:
                setattr(ds, key, value)
                if key == "SOPClassUID":
                    ds.file_meta.MediaStorageSOPClassUID = value
        path = folder / f"IM{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out.append(path)
    return out
