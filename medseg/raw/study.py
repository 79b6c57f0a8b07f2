"""Sequence identification for raw scanner MRI studies: which series of a study is
the pre-contrast T1, the post-contrast T1 (T1ce), the T2 and the FLAIR.

A study folder (the case id is its name) holds the scanner's files as exported:

* DICOM files in any nesting: one folder per series, nested folders (PACS / CD
  exports, a DICOMDIR is ignored), or every file of every series mixed in one
  folder. Headers are read without pixel data and grouped by SeriesInstanceUID;
  hidden files are skipped quietly, files that are not DICOM with a warning.
* or loose NIfTI files with dcm2niix-style JSON sidecars (``x.nii.gz`` +
  ``x.json``: SeriesDescription, ProtocolName, SeriesNumber, EchoTime,
  RepetitionTime and InversionTime in seconds (converted to ms here), ImageType,
  ScanningSequence, ContrastBolusAgent, …). A NIfTI file without a sidecar is
  identified by its file name alone (e.g. ``flair.nii.gz``). When a folder holds
  DICOM MR series, its NIfTI files are ignored (with a warning).

`scan_study` lists the series (`SeriesInfo`): non-MR series (CT, SR, PR, secondary
captures) are skipped with a warning; MR series that cannot be read as one volume
(Enhanced / multi-frame MR, several orientations, several images per slice
position, 4D NIfTI) stay in the list, marked unusable with the reason. One folder
must hold one study of one patient.

`identify` scores every series for every role with one transparent rule table,
`RULES`: each `Rule` names the roles it scores, the evidence it reads, the points
it adds (positive or negative) and the reason, and every contribution is kept as a
reason of the score. Evidence: SeriesDescription / ProtocolName keywords in the
main vendors' vocabularies (`VOCABULARY`; note GE's "T1 FLAIR" is a T1-weighted
sequence, not a FLAIR), ImageType (LOCALIZER, DERIVED, SUBTRACTION, ADC, MPR, …),
ScanningSequence, MRAcquisitionType, TE / TR / TI, ContrastBolusAgent, slice count,
orientation and resolution; last of all, when no T1-weighted series of the study
shows any sign of contrast, acquisition order (the latest T1 is taken as the
post-contrast one, and the reasons say so). Each role gets its best series (a
series serves one role at most) when it scores at least `MIN_SCORE` and beats the
next candidate by at least `MARGIN`; otherwise the study is refused (`DataError`,
listing the candidates and how to choose: ``--series ROLE=<SeriesNumber or
SeriesInstanceUID>``), never guessed.

Which folders are studies (`find_studies`, `medseg study DIR`): DIR is one study
when it holds image files (DICOM or NIfTI) directly, or when every DICOM file below
it carries one StudyInstanceUID (a study may be organised as one subfolder per
series). Otherwise each immediate subfolder of DIR that holds image files is a
study (a root of studies).

Nothing here imports torch or MONAI.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Collection, Iterable, Mapping, Sequence

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from medseg.errors import DataError, MedsegError
from medseg.labels import CHANNELS

__all__ = ["SeriesInfo", "Study", "Rule", "RULES", "VOCABULARY", "MIN_SCORE", "MARGIN", "ROLE_NAMES",
           "Choice", "Identification", "scan_study", "scan_root", "find_studies", "score_series",
           "identify", "load_series", "parse_overrides", "overrides_for", "format_study",
           "study_report"]

#: A role's chosen series must score at least this much.
MIN_SCORE = 40
#: …and beat the next candidate for the role by at least this much.
MARGIN = 10

#: What each role is, for messages.
ROLE_NAMES: dict[str, str] = {"t1": "pre-contrast T1", "t1ce": "post-contrast T1", "t2": "T2",
                              "flair": "FLAIR"}
#: Role names accepted in overrides (the BraTS 2023 names too).
_ROLE_ALIASES = {"t1": "t1", "t1n": "t1", "t1ce": "t1ce", "t1c": "t1ce", "t2": "t2", "t2w": "t2",
                 "flair": "flair", "t2f": "flair"}

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
#: Enhanced MR and Legacy Converted Enhanced MR (multi-frame): listed, never read.
MULTI_FRAME_MR = ("1.2.840.10008.5.1.4.1.1.4.1", "1.2.840.10008.5.1.4.1.1.4.4")
_DICOMDIR = "1.2.840.10008.1.3.10"

_NIFTI = (".nii.gz", ".nii")
#: Extensions that are never DICOM: skipped (with a warning) without opening them.
_NOT_DICOM = {".txt", ".json", ".xml", ".pdf", ".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff",
              ".csv", ".tsv", ".md", ".html", ".htm", ".zip", ".gz", ".tar", ".bval", ".bvec", ".exe",
              ".inf", ".ini", ".log", ".doc", ".docx", ".nrrd", ".mha", ".mhd", ".py", ".sh", ".mat"}

_FIX_CHOOSE = "--series {role}=<SeriesNumber or SeriesInstanceUID>"


# ------------------------------------------------------------------ series
@dataclass
class SeriesInfo:
    """One series of a study, from its headers (DICOM) or its JSON sidecar (NIfTI).
    Times are in ms; `pixel_spacing` is (row, column) mm; `orientation` is axial,
    sagittal, coronal, oblique (> 30° from every plane) or mixed (several
    orientations: a multi-plane localizer); `unusable` says why the series cannot
    be read as one volume ("" when it can)."""

    source: str                                  # "dicom" | "nifti"
    study_folder: Path
    files: list[Path]                            # the DICOM files, or [the NIfTI file]
    series_uid: str
    series_number: int | None = None
    description: str = ""
    protocol: str = ""
    modality: str = "MR"
    sop_class_uid: str = ""
    image_type: tuple[str, ...] = ()
    scanning_sequence: tuple[str, ...] = ()
    sequence_variant: tuple[str, ...] = ()
    acquisition_type: str = ""                   # MRAcquisitionType: 2D | 3D | ""
    echo_time: float | None = None
    repetition_time: float | None = None
    inversion_time: float | None = None
    contrast_agent: str = ""
    manufacturer: str = ""
    n_images: int = 0
    n_slices: int = 0
    pixel_spacing: tuple[float, float] | None = None
    slice_spacing: float | None = None
    orientation: str = ""
    patient_id: str = ""
    study_uid: str = ""
    acquisition_time: str = ""                   # HHMMSS(.ffffff): AcquisitionTime, else SeriesTime
    sidecar: Path | None = None
    unusable: str = ""

    @property
    def usable(self) -> bool:
        return not self.unusable

    @property
    def nifti(self) -> Path | None:
        return self.files[0] if self.source == "nifti" else None

    @property
    def name(self) -> str:
        """The series' name as the scanner gave it (description, else protocol, else file)."""
        return self.description or self.protocol or (self.files[0].name if self.nifti else "")

    @property
    def text(self) -> str:
        """What the keyword rules read: description and protocol name, lower case."""
        parts = [self.description, self.protocol]
        if self.nifti and not (self.description or self.protocol):
            parts.append(_nifti_stem(self.files[0]))
        return " | ".join(p for p in parts if p).lower()

    @property
    def label(self) -> str:
        """``series 5 't2_tse_tra'`` (NIfTI: the file name too)."""
        num = f"series {self.series_number}" if self.series_number is not None else "series"
        out = f"{num} '{self.name}'" if self.name else num
        if self.nifti and self.files[0].name not in out:
            out += f" ({self.files[0].name})"
        return out

    @property
    def where(self) -> str:
        """The study folder and the series, for messages."""
        return f"{self.study_folder}: {self.label}"

    def to_dict(self) -> dict:
        """JSON-ready summary (the file list is summarised: count and folder)."""
        folder = (os.path.commonpath([str(f.parent) for f in self.files]) if self.files else "")
        return {"source": self.source, "series_number": self.series_number, "series_uid": self.series_uid,
                "description": self.description, "protocol": self.protocol, "modality": self.modality,
                "sop_class_uid": self.sop_class_uid, "image_type": list(self.image_type),
                "scanning_sequence": list(self.scanning_sequence),
                "sequence_variant": list(self.sequence_variant), "acquisition_type": self.acquisition_type,
                "echo_time_ms": self.echo_time, "repetition_time_ms": self.repetition_time,
                "inversion_time_ms": self.inversion_time, "contrast_agent": self.contrast_agent,
                "manufacturer": self.manufacturer, "n_images": self.n_images, "n_slices": self.n_slices,
                "pixel_spacing_mm": list(self.pixel_spacing) if self.pixel_spacing else None,
                "slice_spacing_mm": self.slice_spacing, "orientation": self.orientation,
                "acquisition_time": self.acquisition_time,
                "path": str(self.files[0]) if self.nifti else None,
                "folder": None if self.nifti else folder, "n_files": len(self.files),
                "sidecar": str(self.sidecar) if self.sidecar else None, "unusable": self.unusable or None}


@dataclass
class Study:
    """The series of one study folder: MR series (usable or not) in series-number
    order, the non-MR series that were skipped, and what was noticed on the way."""

    case_id: str
    folder: Path
    series: list[SeriesInfo]
    warnings: list[str] = field(default_factory=list)
    skipped: list[SeriesInfo] = field(default_factory=list)

    @property
    def manufacturer(self) -> str:
        names = sorted({s.manufacturer for s in self.series if s.manufacturer})
        return ", ".join(names)


# ------------------------------------------------------------ value parsing
def _num(value) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _int(value) -> int | None:
    out = _num(value)
    return int(out) if out is not None and out == int(out) else None


def _codes(value, sep: str = r"[\\_/,\s]+") -> tuple[str, ...]:
    """A DICOM multi-value / JSON list / dcm2niix ``"GR_IR"`` string → upper-case codes."""
    if value is None:
        return ()
    items = [value] if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__") else list(value)
    out = []
    for item in items:
        out.extend(p for p in re.split(sep, str(item).strip().upper()) if p)
    return tuple(out)


def _agent(value) -> str:
    """ContrastBolusAgent, "" when absent or saying none."""
    text = str(value or "").strip()
    return "" if text.lower() in {"", "none", "no", "0", "n/a", "na", "-", "null", "nein"} else text


def _time(value) -> str:
    """DICOM TM or dcm2niix ``10:12:33.125`` → ``101233.125`` (sortable as a number)."""
    text = str(value or "").strip().replace(":", "")
    return text if _num(text) is not None else ""


def _nifti_stem(path: Path) -> str:
    for suf in _NIFTI:
        if path.name.lower().endswith(suf):
            return path.name[: -len(suf)]
    return path.stem


def _orientation(normal: np.ndarray) -> str:
    """Slice normal (any patient frame) → the plane within 30°, else oblique."""
    n = np.abs(np.asarray(normal, np.float64))
    n = n / (np.linalg.norm(n) or 1.0)
    ax = int(np.argmax(n))
    if n[ax] < math.cos(math.radians(30)):
        return "oblique"
    return ("sagittal", "coronal", "axial")[ax]


# ------------------------------------------------------------ DICOM headers
#: The attributes read from each file (pixel data never is).
_TAGS = ["SOPClassUID", "Modality", "SeriesInstanceUID", "SeriesNumber", "SeriesDescription", "ProtocolName",
         "StudyInstanceUID", "PatientID", "ImageType", "ScanningSequence", "SequenceVariant",
         "MRAcquisitionType", "EchoTime", "RepetitionTime", "InversionTime", "ContrastBolusAgent",
         "Manufacturer", "ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing", "SliceThickness",
         "SpacingBetweenSlices", "Rows", "Columns", "NumberOfFrames", "AcquisitionTime", "SeriesTime",
         "SharedFunctionalGroupsSequence"]


def _read_header(path: Path) -> Dataset | None:
    """The header of a DICOM file (no pixel data), or None when it is not DICOM.
    A file without the DICM preamble counts when it still parses with a SOP class."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_TAGS)
    except InvalidDicomError:
        pass
    except Exception:  # noqa: BLE001 - pydicom raises many types on broken files
        return None
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True, specific_tags=_TAGS)
    except Exception:  # noqa: BLE001 - not DICOM at all
        return None
    return ds if "SOPClassUID" in ds and "SeriesInstanceUID" in ds else None


def _sop(ds: Dataset) -> str:
    sop = str(ds.get("SOPClassUID", "") or "")
    meta = getattr(ds, "file_meta", None)
    return sop or (str(meta.get("MediaStorageSOPClassUID", "")) if meta is not None else "")


@dataclass
class _Tree:
    """What lies below a folder: DICOM headers, NIfTI files, other files."""

    dicom: list[tuple[Path, Dataset]] = field(default_factory=list)
    nifti: list[Path] = field(default_factory=list)
    other: list[Path] = field(default_factory=list)

    def part(self, keep: Callable[[Path], bool]) -> "_Tree":
        return _Tree([(p, d) for p, d in self.dicom if keep(p)], [p for p in self.nifti if keep(p)],
                     [p for p in self.other if keep(p)])


def _walk(folder: Path) -> _Tree:
    """Every non-hidden file below `folder`, sorted; DICOM headers read once."""
    tree = _Tree()
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = Path(dirpath) / name
            low = name.lower()
            if low.endswith(_NIFTI):
                tree.nifti.append(path)
            elif low.endswith(".json") and any((path.parent / (name[:-5] + s)).exists() for s in _NIFTI):
                continue                                                # a sidecar: read with its NIfTI
            elif low == "dicomdir":
                continue                                                # the index of a CD export
            elif Path(low).suffix in _NOT_DICOM:
                tree.other.append(path)
            else:
                ds = _read_header(path)
                if ds is None:
                    tree.other.append(path)
                elif _sop(ds) != _DICOMDIR:
                    tree.dicom.append((path, ds))
    return tree


def _shared(ds: Dataset, seq: str, attr: str):
    """An attribute from the shared functional groups of a multi-frame header."""
    try:
        return getattr(ds.SharedFunctionalGroupsSequence[0], seq)[0].get(attr)
    except (AttributeError, IndexError, KeyError, TypeError):
        return None


def _dicom_info(folder: Path, uid: str, items: Sequence[tuple[Path, Dataset]]) -> SeriesInfo:
    files = [p for p, _ in items]
    heads = [d for _, d in items]
    h = heads[0]
    sop = _sop(h)
    frames = max(_int(d.get("NumberOfFrames")) or 1 for d in heads)
    tes = sorted({t for t in (_num(d.get("EchoTime")) for d in heads) if t is not None})
    te = tes[0] if tes else _num(_shared(h, "MREchoSequence", "EffectiveEchoTime"))
    tr = _num(h.get("RepetitionTime"))
    if tr is None:
        tr = _num(_shared(h, "MRTimingAndRelatedParametersSequence", "RepetitionTime"))
    ti = _num(h.get("InversionTime"))
    if ti is None:
        inv = _codes(_shared(h, "MRModifierSequence", "InversionTimes"), r"\\")
        ti = _num(inv[0]) if inv else None
    times = sorted(t for t in (_time(d.get("AcquisitionTime")) for d in heads) if t)
    info = SeriesInfo(
        "dicom", folder, files, uid, _int(h.get("SeriesNumber")), str(h.get("SeriesDescription", "") or "").strip(),
        str(h.get("ProtocolName", "") or "").strip(), str(h.get("Modality", "") or "").upper(), sop,
        _codes(h.get("ImageType"), r"\\"), _codes(h.get("ScanningSequence")), _codes(h.get("SequenceVariant")),
        str(h.get("MRAcquisitionType", "") or "").upper(), te, tr, ti, _agent(h.get("ContrastBolusAgent")),
        str(h.get("Manufacturer", "") or "").strip(), n_images=len(files) * frames,
        patient_id=str(h.get("PatientID", "") or ""), study_uid=str(h.get("StudyInstanceUID", "") or ""),
        acquisition_time=times[0] if times else _time(h.get("SeriesTime")))
    spacing = h.get("PixelSpacing") or _shared(h, "PixelMeasuresSequence", "PixelSpacing")
    if spacing is not None and len(spacing) == 2:
        info.pixel_spacing = (float(spacing[0]), float(spacing[1]))
    thick = _num(h.get("SpacingBetweenSlices")) or _num(h.get("SliceThickness")) \
        or _num(_shared(h, "PixelMeasuresSequence", "SpacingBetweenSlices")) \
        or _num(_shared(h, "PixelMeasuresSequence", "SliceThickness"))
    if sop in MULTI_FRAME_MR or frames > 1:
        iop = h.get("ImageOrientationPatient") or _shared(h, "PlaneOrientationSequence", "ImageOrientationPatient")
        if iop is not None and len(iop) == 6:
            info.orientation = _orientation(np.cross(np.asarray(iop[:3], float), np.asarray(iop[3:], float)))
        info.n_slices, info.slice_spacing = info.n_images, thick
        kind = pydicom.uid.UID(sop).name if sop in MULTI_FRAME_MR else f"a multi-frame series ({frames} frames)"
        info.unusable = (f"{kind} (multi-frame), which medseg does not read: convert the study with dcm2niix "
                         "and pass the NIfTI + JSON files, or export the series from the scanner or PACS as "
                         "classic single-frame MR images")
        return info
    _geometry(info, heads, thick)
    return info


def _geometry(info: SeriesInfo, heads: Sequence[Dataset], thick: float | None) -> None:
    """Orientation, slice count and spacing of a single-frame series from its
    positions; marks several-orientation / several-images-per-position series unusable."""
    iops = [np.asarray(d.ImageOrientationPatient, np.float64) for d in heads
            if len(d.get("ImageOrientationPatient") or ()) == 6]
    ipps = [np.asarray(d.ImagePositionPatient, np.float64) for d in heads
            if len(d.get("ImagePositionPatient") or ()) == 3]
    info.n_slices, info.slice_spacing = len(heads), thick
    if len(iops) != len(heads) or len(ipps) != len(heads):
        info.unusable = ("no ImagePositionPatient / ImageOrientationPatient in some images: the slices "
                         "cannot be placed; re-export the series from the scanner or PACS")
        return
    groups: list[np.ndarray] = []
    for iop in iops:
        if not any(np.allclose(iop, g, atol=1e-3) for g in groups):
            groups.append(iop)
    normals = [np.cross(g[:3], g[3:]) for g in groups]
    if len(groups) > 1:
        info.orientation = "mixed"
        info.n_slices = len({tuple(np.round(p, 1)) for p in ipps})
        info.unusable = (f"images in {len(groups)} orientations "
                         f"({', '.join(sorted({_orientation(n) for n in normals}))}): a multi-plane "
                         "localizer, not one volume")
        return
    info.orientation = _orientation(normals[0])
    depth = np.unique(np.round(np.asarray(ipps) @ normals[0], 2))
    info.n_slices = int(depth.size)
    if depth.size >= 2:
        info.slice_spacing = float(np.median(np.diff(depth)))
    if info.n_images > info.n_slices:
        info.unusable = (f"{info.n_images} images at {info.n_slices} slice positions (several echoes, time "
                         "points or b-values in one series), not one volume: split the series, e.g. convert "
                         "it with dcm2niix, and pass the volume you want")


# ------------------------------------------------------------ NIfTI + JSON
def _nifti_info(folder: Path, path: Path, warnings: list[str]) -> SeriesInfo:
    from medseg.data.io import load_header
    info = SeriesInfo("nifti", folder, [path], f"nifti:{path.relative_to(folder)}")
    sidecar = path.parent / (_nifti_stem(path) + ".json")
    meta: dict = {}
    if sidecar.is_file():
        try:
            meta = json.loads(sidecar.read_text())
            info.sidecar = sidecar
        except (OSError, ValueError) as exc:
            warnings.append(f"{sidecar}: not readable JSON ({exc}); {path.name} is identified by its file "
                            "name only: fix or remove the sidecar")
        if not isinstance(meta, dict):
            meta = {}
    else:
        warnings.append(f"{path.name}: no JSON sidecar ({sidecar.name}): identified by its file name only "
                        "(convert with dcm2niix, which writes one, for the scanner's description and timing)")
    info.series_uid = str(meta.get("SeriesInstanceUID") or info.series_uid)
    info.series_number = _int(meta.get("SeriesNumber"))
    info.description = str(meta.get("SeriesDescription", "") or "").strip()
    info.protocol = str(meta.get("ProtocolName", "") or "").strip()
    info.modality = str(meta.get("Modality", "MR") or "MR").upper()
    info.image_type = _codes(meta.get("ImageType"), r"\\")
    info.scanning_sequence = _codes(meta.get("ScanningSequence"))
    info.sequence_variant = _codes(meta.get("SequenceVariant"))
    info.acquisition_type = str(meta.get("MRAcquisitionType", "") or "").upper()
    te, tr, ti = (_num(meta.get(k)) for k in ("EchoTime", "RepetitionTime", "InversionTime"))
    scale = 1000.0                                   # dcm2niix / BIDS: seconds
    if te is not None and te > 1.0:                  # no echo is a second long: already ms
        scale = 1.0
        warnings.append(f"{sidecar.name}: EchoTime {te} is not in seconds as dcm2niix writes it; read as ms")
    info.echo_time, info.repetition_time, info.inversion_time = (
        None if v is None else round(v * scale, 6) for v in (te, tr, ti))
    info.contrast_agent = _agent(meta.get("ContrastBolusAgent") or meta.get("ContrastBolusIngredient"))
    info.manufacturer = str(meta.get("Manufacturer", "") or "")
    info.patient_id = str(meta.get("PatientID", "") or "")
    info.study_uid = str(meta.get("StudyInstanceUID", "") or "")
    info.acquisition_time = _time(meta.get("AcquisitionTime") or meta.get("SeriesTime"))
    try:
        img = load_header(path)
    except DataError as exc:
        info.unusable = str(exc)
        return info
    shape, zooms, affine = img.shape, img.header.get_zooms(), img.affine
    info.n_slices = int(shape[2]) if len(shape) >= 3 else 1
    info.n_images = info.n_slices
    info.pixel_spacing = (float(zooms[1]), float(zooms[0]))
    info.slice_spacing = float(zooms[2]) if len(zooms) >= 3 else None
    info.orientation = _orientation(affine[:3, 2])
    if len(shape) > 3 and int(np.prod(shape[3:])) > 1:
        info.unusable = (f"a 4D image ({int(np.prod(shape[3:]))} volumes, e.g. diffusion directions or time "
                         "points), not one volume")
    elif len(shape) < 3:
        info.unusable = f"a {len(shape)}D image, not a volume"
    return info


# ------------------------------------------------------------------ studies
def _say_series(items: Iterable[SeriesInfo], limit: int = 6) -> str:
    items = list(items)
    text = ", ".join(s.label for s in items[:limit])
    return text + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _one_of(folder: Path, series: Sequence[SeriesInfo], attr: str, what: str, fix: str) -> None:
    """Every series of the folder has one value of `attr` (empty values ignored)."""
    groups: dict[str, list[SeriesInfo]] = {}
    for s in series:
        value = getattr(s, attr)
        if value:
            groups.setdefault(value, []).append(s)
    if len(groups) > 1:
        key = {"patient_id": "PatientID", "study_uid": "StudyInstanceUID"}[attr]
        found = "; ".join(f"{key} {v!r}: {_say_series(g)}" for v, g in groups.items())
        raise DataError(f"{folder}: this study folder holds the series of {len(groups)} {what} ({found}); "
                        f"expected one study of one patient per folder: {fix}")


def _build(folder: Path, tree: _Tree) -> Study:
    folder = Path(folder)
    warnings: list[str] = []
    groups: dict[str, list[tuple[Path, Dataset]]] = {}
    for path, ds in tree.dicom:
        groups.setdefault(str(ds.SeriesInstanceUID), []).append((path, ds))
    infos = [_dicom_info(folder, uid, items) for uid, items in groups.items()]
    mr_classes = (MR_IMAGE_STORAGE, *MULTI_FRAME_MR)
    series = [s for s in infos if s.sop_class_uid in mr_classes]
    skipped = sorted((s for s in infos if s.sop_class_uid not in mr_classes), key=_order)
    for s in skipped:
        sop = pydicom.uid.UID(s.sop_class_uid).name if s.sop_class_uid else "no SOP class"
        s.unusable = f"not an MR image series ({s.modality or 'no modality'}, {sop})"
        warnings.append(f"{s.label}: {s.modality or 'no modality'}, {sop} ({len(s.files)} file(s)): "
                        "not an MR image series, skipped")
    if tree.nifti:
        if series:
            warnings.append(f"{len(tree.nifti)} NIfTI file(s) ignored (e.g. {tree.nifti[0].relative_to(folder)}): "
                            "this study has DICOM MR series, which are read instead")
        else:
            series = [_nifti_info(folder, p, warnings) for p in tree.nifti]
    if tree.other:
        names = ", ".join(str(p.relative_to(folder)) for p in tree.other[:3])
        warnings.append(f"skipped {len(tree.other)} file(s) that are not DICOM images "
                        f"(e.g. {names}{', …' if len(tree.other) > 3 else ''})")
    everything = series + skipped
    _one_of(folder, everything, "patient_id", "patients",
            "move each patient's series into a folder of their own (a folder of study folders is read as "
            "several studies)")
    _one_of(folder, everything, "study_uid", "studies",
            "move each study (examination) into a folder of its own (a folder of study folders is read as "
            "several studies)")
    if not series:
        found = ("nothing" if not (skipped or tree.other) else
                 ", ".join([*(f"{s.label} ({s.modality or 'no modality'})" for s in skipped[:4]),
                            *([f"{len(tree.other)} non-DICOM file(s)"] if tree.other else [])]))
        raise DataError(f"{folder}: no MR image series; found {found}. Expected the MR series of one study "
                        "(DICOM files in any folders, or NIfTI files with dcm2niix JSON sidecars): point to the "
                        "study folder the scanner or PACS exported")
    series.sort(key=_order)
    return Study(folder.name or folder.absolute().name, folder, series, warnings, skipped)


def _order(s: SeriesInfo) -> tuple:
    return (s.series_number if s.series_number is not None else 1 << 30, s.name, s.series_uid)


def scan_study(folder: str | Path) -> Study:
    """Every series of the study in `folder` (any nesting), from headers only; a
    `DataError` when the folder holds no MR series, or several patients or studies."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: study folder not found; expected a folder with the DICOM files (or "
                        "NIfTI + JSON files) of one MR study")
    return _build(folder, _walk(folder))


def _split(root: Path, tree: _Tree) -> list[tuple[Path, _Tree]] | None:
    """The studies below `root` by the rule of `find_studies`; None: `root` is one."""
    direct = any(p.parent == root for p, _ in tree.dicom) or any(p.parent == root for p in tree.nifti)
    uids = {str(d.get("StudyInstanceUID", "") or "") for _, d in tree.dicom}
    if direct or (tree.dicom and len(uids) == 1 and not tree.nifti) or not (tree.dicom or tree.nifti):
        return None
    tops = sorted({p.relative_to(root).parts[0] for p in [*(p for p, _ in tree.dicom), *tree.nifti]})
    return [(root / top, tree.part(lambda p, t=top: p.relative_to(root).parts[0] == t)) for top in tops]


def find_studies(root: str | Path) -> list[Path]:
    """The study folders of `root`: `root` itself when it holds image files directly or
    all DICOM files below it carry one StudyInstanceUID; else each immediate
    subfolder that holds image files."""
    return [folder for folder, _ in scan_root(root)]


def scan_root(root: str | Path) -> list[tuple[Path, Study | DataError]]:
    """Each study below `root` (`find_studies`'s rule; files read once) → its
    `Study`, or the `DataError` that refused it."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: folder not found; expected a study folder or a folder of study folders")
    tree = _walk(root)
    parts = _split(root, tree)
    out: list[tuple[Path, Study | DataError]] = []
    for folder, part in ([(root, tree)] if parts is None else parts):
        try:
            out.append((folder, _build(folder, part)))
        except DataError as exc:
            out.append((folder, exc))
    return out


# -------------------------------------------------------------- rule table
_B, _E = r"(?<![a-z0-9])", r"(?![a-z0-9])"


def _words(*alternatives: str) -> str:
    return _B + "(?:" + "|".join(alternatives) + ")" + _E


#: Keyword vocabularies (regular expressions over the lower-case SeriesDescription
#: and ProtocolName; a keyword is a whole token: ``_``, space, ``-`` and ``+`` separate).
VOCABULARY: dict[str, str] = {
    # Siemens t1_se_tra, t1_mprage_sag_p2; GE Ax T1, Ax T1 FLAIR; Philips T1W_SE, T1W_3D_TFE,
    # sT1W_3D_TFE; BraTS t1, t1n, t1c, t1ce.
    "t1": _words(r"(?:s|3d)?t1(?:w|wi|n|c|ce|gd|post|pre|km)?", "cet1"),
    # 3D T1-weighted sequence names: MPRAGE (Siemens), BRAVO / FSPGR (GE), 3D TFE (Philips).
    "t1_sequence": _words(r"mp[-_ ]?rage\w*", r"memprage\w*", "bravo", r"ir[-_ ]?fspgr", "fspgr", "spgr",
                          "efgre3d", "tfe", r"tfl3d\w*", "vibe"),
    # Siemens t2_tse_tra; GE Ax T2 FSE / PROPELLER; Philips T2W_TSE; BraTS t2, t2w (not T2*).
    "t2": _B + r"s?t2(?:w|wi)?(?![a-z0-9]|\s*\*)",
    # Siemens t2_tirm_tra_dark-fluid, t2_space_dark-fluid; GE Ax T2 FLAIR, Sag CUBE FLAIR;
    # Philips T2W_FLAIR, FLAIR_longTR; BraTS flair, t2f.
    "flair": _words(r"s?flair\w*", "t2f", r"dark[-_ ]?fluid", "tirm", r"fluid[-_ ]?att\w*"),
    # Turbo / fast spin echo families (T2 mostly; T1 TSE exists, so weak evidence).
    "tse": _words("tse", "fse", "frfse", "ssfse", "haste", "propeller", "blade", "space", "cube", "vista"),
    "pd": _words("pd", "pdw", "pdwi", r"proton[-_ ]?density"),
    "stir": _words("stir"),
    "dir": _words("dir", r"double[-_ ]?ir", r"double[-_ ]?inversion"),
    # Post-contrast: GE +C; Siemens _KM (Kontrastmittel) / _Gd; post, CE, GAD, agents' names.
    "contrast": r"(?:\+\s*(?:c|gd|gad|km|k|ce|mdc|contrast)" + _E + "|" + _B +
                r"(?:c\+|w/\s*(?:c|contrast|gad|gd)|gd|gad|gado\w*|gadolinium|km|ce|post|postcontrast|"
                r"post[-_ ]?(?:contrast|gd|gad|km|c)|contrast|kontrast\w*|mdc|enh|enhanced|t1c|t1ce|t1gd|"
                r"t1post|t1km|cet1|dotarem|gadovist|gadavist|magnevist|multihance|prohance|clariscan|"
                r"omniscan)" + _E + ")",
    # Pre-contrast: pre, native (German nativ), BraTS t1n, without contrast.
    "pre": _words("pre", "precontrast", r"pre[-_ ]?(?:contrast|gd|gad|km|c)", "nativ", "native", "t1n",
                  "t1pre", "w/o", "without", r"non[-_ ]?contrast", r"no[-_ ]?contrast", r"wo[-_ ]?contrast"),
    # Siemens AAHead_Scout, localizer; GE 3-Plane Loc; Philips Survey / SmartSurvey.
    "localizer": _words("loc", r"locali[sz]\w*", r"scout\w*", r"s?survey\w*", r"smart[-_ ]?survey\w*", "pilot",
                        r"tri[-_ ]?pilot", r"3[-_ ]?pl\w*", r"three[-_ ]?plane", r"aahead\w*"),
    # Siemens ep2d_diff, ADC, TRACEW; GE DWI, ADC; Philips DWI, dADC.
    "diffusion": _words(r"dwi\w*", r"dti\w*", r"diff\w*", r"ep2d[-_]?diff\w*", "d?adc", "eadc", r"trace\w*", "fa",
                        "colfa", r"b\d{3,4}", r"\d{3,4}b", r"b[-_ ]?value\w*", "resolve", "exp"),
    "perfusion": _words(r"perf\w*", "dsc", "dce", "pwi", "asl", "pcasl", "pasl", "rcbv", "cbv", "cbf", "mtt",
                        "ttp", "tmax", "bold", r"fmri\w*", r"resting\w*", "twist", "tricks"),
    "susceptibility": "(?:" + _words(r"swi\w*", "swan", "swip", r"t2[-_ ]?star\w*", r"hemo\w*", r"susc\w*", "mag",
                                     "pha", "phase", "minip", r"tof\w*", "mra", "mrv", r"angio\w*", r"veno\w*",
                                     "medic", "merge") + r"|t2\s*\*)",
    "spectroscopy": _words(r"svs\w*", r"csi\w*", "mrs", "mrsi", r"spectro\w*", "press", "steam"),
    "calibration": _words("cal", r"calibration\w*", r"asset[-_ ]?cal\w*", r"sense[-_ ]?ref\w*",
                          r"coil[-_ ]?survey\w*", r"ref[-_ ]?scan\w*", r"prescan\w*", r"field[-_ ]?map\w*",
                          r"fieldmap\w*", r"gre[-_]?field[-_]?map\w*", r"b[01][-_ ]?map\w*", r"shim\w*"),
    "subtraction": _words("sub", "subs", r"subtr\w*"),
    "reformat": _words(r"mpr\d*", "mprs", "mip", "mips", "minip", r"reformat\w*", "reform", "rfmt", "mpvr"),
}
_VOCAB = {k: re.compile(v) for k, v in VOCABULARY.items()}

#: ImageType words (every value split at spaces) that mark a series.
_IMAGE_TYPES: dict[str, frozenset[str]] = {
    "localizer": frozenset({"LOCALIZER", "SCOUT"}),
    "diffusion": frozenset({"ADC", "TRACEW", "TRACE", "DIFFUSION", "FA", "EADC", "EXP", "DWI", "ISODWI"}),
    "perfusion": frozenset({"PERFUSION", "PERF", "RCBV", "CBV", "CBF", "MTT", "TTP"}),
    "subtraction": frozenset({"SUB", "SUBTRACTION", "SUBTRACT"}),
    "reformat": frozenset({"MPR", "MIP", "MINIP", "MNIP", "PROJECTION", "REFORMATTED", "RESAMPLED",
                           "CSAPARALLEL", "MPVR"}),
    "phase": frozenset({"P", "PHASE", "R", "REAL", "I", "IMAGINARY"}),
    "mosaic": frozenset({"MOSAIC"}),
}


@dataclass(frozen=True)
class Rule:
    """One line of the rule table: when `test` holds for a series, `score` points
    are added to its score for each role in `roles`, and `reason` (formatted with
    the series' facts) is recorded. `evidence` names what the test reads."""

    roles: tuple[str, ...]
    name: str
    evidence: str
    score: int
    reason: str
    test: Callable[[SeriesInfo, "_Context"], bool] = field(repr=False, compare=False)
    group: str = "rules"          # name / timing / contrast / order / exclude / quality


# Predicates: small, named, combinable.
def _has(kind: str) -> Callable[[SeriesInfo, "_Context"], bool]:
    pattern = _VOCAB[kind]
    return lambda s, ctx: bool(pattern.search(s.text))


def _image_type(kind: str) -> Callable[[SeriesInfo, "_Context"], bool]:
    words = _IMAGE_TYPES[kind]
    return lambda s, ctx: any(w in words or (kind == "phase" and w[:2] in ("P_", "R_", "I_"))
                              for item in s.image_type for w in item.split())


def _any(*tests):
    return lambda s, ctx: any(t(s, ctx) for t in tests)


def _all(*tests):
    return lambda s, ctx: all(t(s, ctx) for t in tests)


def _not(test):
    return lambda s, ctx: not test(s, ctx)


def _between(attr: str, lo: float | None = None, hi: float | None = None):
    """`attr` known and lo <= value <= hi."""
    def test(s, ctx):
        v = getattr(s, attr)
        return v is not None and (lo is None or v >= lo) and (hi is None or v <= hi)
    return test


def _seq(code: str):
    return lambda s, ctx: code in s.scanning_sequence


def _no_ti(s, ctx) -> bool:
    return not s.inversion_time


def _is_3d(s, ctx) -> bool:
    return s.acquisition_type == "3D"


def _derived(s, ctx) -> bool:
    return bool(s.image_type) and s.image_type[0] == "DERIVED"


def _post_named(s: SeriesInfo, ctx=None) -> bool:
    """A post-contrast keyword, and no pre-contrast one ("pre Gd", "w/o contrast")."""
    return bool(_VOCAB["contrast"].search(s.text)) and not _VOCAB["pre"].search(s.text)


def _contrast_shown(s: SeriesInfo, ctx=None) -> bool:
    return bool(s.contrast_agent) or _post_named(s)


def _order_is(which: str):
    return lambda s, ctx: ctx.order.get(s.series_uid) == which


_T1, _T2, _FLAIR = _has("t1"), _has("t2"), _has("flair")
_ALL = tuple(CHANNELS)
_T1S = ("t1", "t1ce")
_FLAIR_TI = _all(_between("inversion_time", 1500, 3000), _between("repetition_time", 4000))

#: The rule table. Scores add up per (series, role); see the module docstring.
RULES: tuple[Rule, ...] = (
    # ---- not a structural series: excluded (or heavily penalised)
    Rule(_ALL, "localizer", "ImageType, SeriesDescription/ProtocolName", -300,
         "a localizer / scout / survey (ImageType {image_type}, name '{name}'): a planning image",
         _any(_image_type("localizer"), _has("localizer")), "exclude"),
    Rule(_ALL, "few slices", "number of slices", -300,
         "only {n_slices} slice position(s): a localizer or partial acquisition (a volume has at least 10)",
         lambda s, ctx: s.n_slices < 10, "exclude"),
    Rule(_ALL, "several orientations", "ImageOrientationPatient", -300,
         "images in several orientations: a multi-plane localizer", lambda s, ctx: s.orientation == "mixed",
         "exclude"),
    Rule(_ALL, "diffusion", "ImageType, SeriesDescription/ProtocolName", -300,
         "a diffusion image (DWI, ADC, trace, FA; ImageType {image_type}): not a structural series",
         _any(_image_type("diffusion"), _has("diffusion")), "exclude"),
    Rule(_ALL, "subtraction", "ImageType, SeriesDescription/ProtocolName", -300,
         "a subtraction image (post − pre, derived): the ORIGINAL acquisition is needed",
         _any(_image_type("subtraction"), _has("subtraction")), "exclude"),
    Rule(_ALL, "perfusion / functional", "ImageType, SeriesDescription/ProtocolName", -300,
         "a perfusion, ASL or BOLD series: not a structural series",
         _any(_image_type("perfusion"), _has("perfusion")), "exclude"),
    Rule(_ALL, "susceptibility / angiography", "SeriesDescription/ProtocolName", -300,
         "a T2*/SWI, phase or angiography series by name ('{name}')", _has("susceptibility"), "exclude"),
    Rule(_ALL, "spectroscopy / calibration", "SeriesDescription/ProtocolName", -300,
         "a spectroscopy, calibration or field-map series by name ('{name}')",
         _any(_has("spectroscopy"), _has("calibration")), "exclude"),
    Rule(_ALL, "not magnitude", "ImageType", -300,
         "ImageType {image_type}: a phase / real / imaginary image, not a magnitude image",
         _image_type("phase"), "exclude"),
    Rule(_ALL, "mosaic", "ImageType", -300,
         "ImageType MOSAIC: slices tiled into one image (Siemens diffusion / BOLD)", _image_type("mosaic"),
         "exclude"),
    Rule(_ALL, "reformatted", "ImageType, SeriesDescription/ProtocolName", -80,
         "reformatted or projected from another series (MPR/MIP): its source acquisition is preferred",
         _any(_image_type("reformat"), _has("reformat")), "exclude"),
    Rule(_ALL, "derived", "ImageType", -30,
         "ImageType DERIVED (computed from other images): an ORIGINAL acquisition is preferred", _derived,
         "exclude"),
    Rule(_ALL, "echo-planar", "ScanningSequence", -60,
         "echo-planar readout (ScanningSequence EP): a diffusion / perfusion-type, distorted series",
         _seq("EP"), "exclude"),
    # ---- names
    Rule(_T1S, "T1 by name", "SeriesDescription/ProtocolName", 40, "the name says T1 ('{name}')", _T1, "name"),
    Rule(_T1S, "3D T1 sequence by name", "SeriesDescription/ProtocolName", 30,
         "a T1-weighted 3D sequence by name (MPRAGE, BRAVO, FSPGR, TFE, VIBE: '{name}')", _has("t1_sequence"),
         "name"),
    Rule(("flair",), "T1 FLAIR is T1", "SeriesDescription/ProtocolName", -100,
         "'T1 FLAIR' (GE, Philips) is a T1-weighted inversion recovery, not a FLAIR ('{name}')",
         _all(_T1, _FLAIR), "name"),
    Rule(("t2",), "T2 by name", "SeriesDescription/ProtocolName", 40, "the name says T2 ('{name}')",
         _all(_T2, _not(_FLAIR)), "name"),
    Rule(("t2",), "spin-echo family by name", "SeriesDescription/ProtocolName", 10,
         "a turbo / fast spin echo by name (TSE, FSE, PROPELLER, SPACE, CUBE: '{name}'), the usual T2 sequence",
         _all(_has("tse"), _not(_T1), _not(_FLAIR)), "name"),
    Rule(("flair",), "FLAIR by name", "SeriesDescription/ProtocolName", 60,
         "the name says FLAIR / dark-fluid ('{name}')", _all(_FLAIR, _not(_T1)), "name"),
    Rule(("t2",), "FLAIR is not T2", "SeriesDescription/ProtocolName", -60,
         "the name says FLAIR (fluid-suppressed), not a plain T2 ('{name}')", _FLAIR, "name"),
    Rule(_T1S, "T2 / FLAIR is not T1", "SeriesDescription/ProtocolName", -40,
         "the name says T2 or FLAIR, not T1 ('{name}')", _all(_any(_T2, _FLAIR), _not(_T1)), "name"),
    Rule(("t2", "flair"), "T1 is not T2 / FLAIR", "SeriesDescription/ProtocolName", -40,
         "the name says T1 ('{name}')", _all(_T1, _not(_T2), _not(_FLAIR)), "name"),
    Rule(("t1", "t1ce", "t2"), "proton density", "SeriesDescription/ProtocolName", -40,
         "proton-density weighted by name ('{name}')", _has("pd"), "name"),
    Rule(("flair",), "STIR / DIR is not FLAIR", "SeriesDescription/ProtocolName", -60,
         "STIR or double inversion recovery by name ('{name}'), not FLAIR", _any(_has("stir"), _has("dir")),
         "name"),
    # ---- timing (ms)
    Rule(("flair",), "FLAIR inversion", "InversionTime, RepetitionTime", 40,
         "TI {ti} ms with TR {tr} ms nulls fluid: FLAIR timing", _FLAIR_TI, "timing"),
    Rule(("t2",), "fluid nulled, not T2", "InversionTime, RepetitionTime", -60,
         "TI {ti} ms nulls fluid: a FLAIR, not a plain T2", _FLAIR_TI, "timing"),
    Rule(_T1S, "fluid nulled, not T1", "InversionTime, RepetitionTime", -40,
         "TI {ti} ms with TR {tr} ms is FLAIR timing, not a T1 preparation", _FLAIR_TI, "timing"),
    Rule(_T1S, "T1 inversion", "InversionTime, EchoTime", 20,
         "TI {ti} ms with short TE {te} ms: T1-weighted inversion recovery (MPRAGE, BRAVO, T1 FLAIR)",
         _all(_between("inversion_time", 300, 1300), _between("echo_time", None, 30)), "timing"),
    Rule(("flair",), "TI too short for FLAIR", "InversionTime", -60,
         "TI {ti} ms is too short to null fluid (FLAIR uses about 1500-3000 ms)",
         _between("inversion_time", 1, 1300), "timing"),
    Rule(_T1S, "T1 spin-echo timing", "ScanningSequence, EchoTime, RepetitionTime", 30,
         "spin echo with TE {te} ms and TR {tr} ms: T1-weighted timing",
         _all(_seq("SE"), _not(_seq("IR")), _between("echo_time", None, 20),
              _between("repetition_time", None, 999)), "timing"),
    Rule(_T1S, "T1 3D gradient echo", "ScanningSequence, MRAcquisitionType, EchoTime", 30,
         "3D gradient echo with TE {te} ms: T1-weighted (MPRAGE / FSPGR / TFE type)",
         _all(_seq("GR"), _is_3d, _between("echo_time", None, 10)), "timing"),
    Rule(("t2",), "long TE", "EchoTime", 30, "TE {te} ms: T2-weighted timing", _between("echo_time", 70), "timing"),
    Rule(("flair",), "long TE (FLAIR)", "EchoTime", 10, "TE {te} ms: long, as a FLAIR's",
         _between("echo_time", 70), "timing"),
    Rule(_T1S, "TE too long for T1", "EchoTime", -50, "TE {te} ms is far too long for T1 weighting",
         _between("echo_time", 60), "timing"),
    Rule(("t2", "flair"), "TE too short for T2", "EchoTime", -40,
         "TE {te} ms is too short for T2 weighting", _between("echo_time", None, 30), "timing"),
    Rule(_T1S, "long TR without inversion", "RepetitionTime, InversionTime, ScanningSequence", -40,
         "TR {tr} ms without an inversion pulse: T2 / PD weighting, not T1",
         _all(_between("repetition_time", 2000), _no_ti, _not(_seq("GR"))), "timing"),
    Rule(("t2",), "T2* gradient echo", "ScanningSequence, EchoTime", -50,
         "gradient echo with TE {te} ms: T2*-weighted, not T2",
         _all(_seq("GR"), _not(_seq("SE")), _between("echo_time", 12)), "timing"),
    Rule(_T1S, "T2* gradient echo (T1)", "ScanningSequence, EchoTime", -30,
         "gradient echo with TE {te} ms: T2*-weighted, not T1",
         _all(_seq("GR"), _not(_seq("SE")), _between("echo_time", 12)), "timing"),
    # ---- contrast
    Rule(("t1ce",), "contrast agent", "ContrastBolusAgent", 50,
         "ContrastBolusAgent '{agent}': acquired after contrast injection", lambda s, ctx: bool(s.contrast_agent),
         "contrast"),
    Rule(("t1",), "contrast agent (not pre)", "ContrastBolusAgent", -150,
         "ContrastBolusAgent '{agent}': acquired after contrast, not a pre-contrast T1",
         lambda s, ctx: bool(s.contrast_agent), "contrast"),
    Rule(("t1ce",), "post-contrast by name", "SeriesDescription/ProtocolName", 50,
         "the name says post-contrast ('{name}': +C, Gd, KM, post, CE …)", _post_named, "contrast"),
    Rule(("t1",), "post-contrast by name (not pre)", "SeriesDescription/ProtocolName", -150,
         "the name says post-contrast ('{name}'), not a pre-contrast T1", _post_named, "contrast"),
    Rule(("t1",), "pre-contrast by name", "SeriesDescription/ProtocolName", 20,
         "the name says pre-contrast / native ('{name}')", _has("pre"), "contrast"),
    Rule(("t1ce",), "pre-contrast by name (not post)", "SeriesDescription/ProtocolName", -80,
         "the name says pre-contrast / native ('{name}'), not post-contrast", _has("pre"), "contrast"),
    Rule(("t1ce",), "no sign of contrast", "ContrastBolusAgent, SeriesDescription/ProtocolName", -150,
         "no sign of contrast: ContrastBolusAgent is empty and the name has no +C, Gd, KM, post, CE",
         _all(_not(_contrast_shown), _not(_order_is("post"))), "contrast"),
    # ---- last resort: acquisition order among T1-weighted series without any sign of contrast
    Rule(("t1ce",), "latest T1 (last resort)", "AcquisitionTime or SeriesNumber", 10,
         "last resort: no T1-weighted series of this study shows contrast, and this one was {order_note}: "
         "taken as post-contrast (check it; choose with --series t1ce=… otherwise)", _order_is("post"), "order"),
    Rule(("t1",), "latest T1 is post (last resort)", "AcquisitionTime or SeriesNumber", -20,
         "last resort: {order_note}, so taken as the post-contrast T1", _order_is("post"), "order"),
    Rule(("t1",), "earlier T1 (last resort)", "AcquisitionTime or SeriesNumber", 10,
         "last resort: no T1-weighted series shows contrast, and this one was {order_note}: taken as "
         "pre-contrast", _order_is("pre"), "order"),
    Rule(("t1ce",), "earlier T1 is pre (last resort)", "AcquisitionTime or SeriesNumber", -20,
         "last resort: {order_note}, so taken as pre-contrast", _order_is("pre"), "order"),
    # ---- quality
    Rule(_ALL, "3D acquisition", "MRAcquisitionType", 25,
         "3D acquisition: thin slices that resample well", _is_3d, "quality"),
    Rule(_ALL, "2D axial", "MRAcquisitionType, orientation", 10,
         "2D axial slices (preferred over other 2D planes)",
         lambda s, ctx: s.acquisition_type != "3D" and s.orientation == "axial", "quality"),
    Rule(_ALL, "coarse in-plane", "PixelSpacing", -10, "coarse in-plane resolution {px} mm (> 1.5 mm)",
         lambda s, ctx: bool(s.pixel_spacing) and max(s.pixel_spacing) > 1.5, "quality"),
    Rule(_ALL, "very coarse in-plane", "PixelSpacing", -30, "very coarse in-plane resolution {px} mm (> 3 mm)",
         lambda s, ctx: bool(s.pixel_spacing) and max(s.pixel_spacing) > 3.0, "quality"),
    Rule(_ALL, "thick slices", "slice positions / SliceThickness", -15, "slices {dz} mm apart (> 6 mm)",
         lambda s, ctx: s.slice_spacing is not None and s.slice_spacing > 6.0, "quality"),
)


@dataclass
class _Context:
    """What the order rules know about the whole study."""

    order: dict[str, str] = field(default_factory=dict)       # series uid → "post" | "pre"
    note: dict[str, str] = field(default_factory=dict)        # series uid → how it was ordered


def _fmt(v: float | None) -> str:
    return "?" if v is None else f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}"


def _facts(s: SeriesInfo, ctx: _Context) -> dict[str, str]:
    return {"name": s.name, "te": _fmt(s.echo_time), "tr": _fmt(s.repetition_time), "ti": _fmt(s.inversion_time),
            "agent": s.contrast_agent, "image_type": "\\".join(s.image_type) or "none",
            "n_slices": str(s.n_slices), "dz": _fmt(s.slice_spacing),
            "px": "×".join(_fmt(v) for v in s.pixel_spacing) if s.pixel_spacing else "?",
            "order_note": ctx.note.get(s.series_uid, "")}


def score_series(series: SeriesInfo, role: str, context: _Context | None = None,
                 skip_groups: Collection[str] = ()) -> tuple[int, list[str]]:
    """The score of `series` for `role` by `RULES` and one reason per contribution
    (``"+40 T1 by name: the name says T1 ('t1_se_tra')"``)."""
    ctx = context or _Context()
    facts = None
    total, reasons = 0, []
    for rule in RULES:
        if role not in rule.roles or rule.group in skip_groups or not rule.test(series, ctx):
            continue
        facts = facts or _facts(series, ctx)
        total += rule.score
        reasons.append(f"{rule.score:+d} {rule.name}: {rule.reason.format(**facts)}")
    return total, reasons


def _context(series: Sequence[SeriesInfo]) -> _Context:
    """The last resort: when no T1-weighted series of the study shows contrast, the
    latest (AcquisitionTime, else SeriesNumber) is taken as post-contrast."""
    ctx = _Context()
    t1_like = [s for s in series
               if score_series(s, "t1", ctx, skip_groups=("contrast", "order"))[0] >= MIN_SCORE]
    if len(t1_like) < 2 or any(_contrast_shown(s) for s in t1_like):
        return ctx
    if all(s.acquisition_time for s in t1_like):
        key, by = (lambda s: float(s.acquisition_time)), "acquisition time"
    elif all(s.series_number is not None for s in t1_like):
        key, by = (lambda s: s.series_number), "series number"
    else:
        return ctx
    ranked = sorted(t1_like, key=key)
    last = ranked[-1]
    if key(last) == key(ranked[-2]):
        return ctx
    earlier = ranked[:-1]
    ctx.order[last.series_uid] = "post"
    ctx.note[last.series_uid] = f"acquired after {_say_series(earlier)} (by {by})"
    for s in earlier:
        ctx.order[s.series_uid] = "pre"
        ctx.note[s.series_uid] = f"acquired before {last.label} (by {by})"
    return ctx


# ------------------------------------------------------------ identification
@dataclass
class Choice:
    """The series chosen for one role, its score and reasons, and the runner-up."""

    role: str
    series: SeriesInfo
    score: int
    reasons: list[str]
    runner_up: SeriesInfo | None = None
    runner_up_score: int | None = None
    overridden: bool = False

    def to_dict(self) -> dict:
        s = self.series
        return {"series_number": s.series_number, "series_uid": s.series_uid, "description": s.description,
                "protocol": s.protocol, "source": s.source,
                "path": str(s.nifti) if s.nifti else None, "n_files": len(s.files),
                "score": self.score, "reasons": list(self.reasons), "overridden": self.overridden,
                "runner_up": None if self.runner_up is None else {
                    "series_number": self.runner_up.series_number, "series_uid": self.runner_up.series_uid,
                    "description": self.runner_up.description, "score": self.runner_up_score}}


@dataclass
class Identification:
    """The series of a study chosen for each role (`choices`, in `CHANNELS` order),
    the roles allowed to be missing that are, and notes."""

    case_id: str
    folder: Path
    choices: dict[str, Choice]
    missing: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)            # about the choices
    scan_warnings: list[str] = field(default_factory=list)       # the study's (skipped files, non-MR series)

    def series(self, role: str) -> SeriesInfo:
        return self.choices[role].series

    def to_dict(self) -> dict:
        """JSON-ready record (for predictions.json)."""
        return {"case_id": self.case_id, "study_folder": str(self.folder),
                "rules": {"min_score": MIN_SCORE, "margin": MARGIN},
                "roles": {r: c.to_dict() for r, c in self.choices.items()},
                "missing": list(self.missing), "warnings": list(self.warnings),
                "scan_warnings": list(self.scan_warnings)}

    def describe(self) -> str:
        """Each choice, its reasons and its runner-up, for a person."""
        lines = [f"study {self.case_id} ({self.folder})"]
        for role, c in self.choices.items():
            how = "chosen by --series" if c.overridden else "score"
            lines.append(f"  {role:<6}{c.series.label}: {how} {c.score}")
            lines.extend(f"          {r}" for r in c.reasons)
            if c.runner_up is not None:
                lines.append(f"          runner-up: {c.runner_up.label}, score {c.runner_up_score}")
            else:
                lines.append("          runner-up: none")
        for role in self.missing:
            lines.append(f"  {role:<6}missing (allowed): no {ROLE_NAMES[role]} series")
        lines.extend(f"  note: {w}" for w in self.warnings)
        return "\n".join(lines)


def _candidates(ranked: Sequence[tuple[SeriesInfo, int, list[str]]], taken: Mapping[str, str],
                limit: int = 5) -> str:
    out = []
    for s, sc, _ in ranked[:limit]:
        extra = [f"score {sc}"]
        if s.series_uid in taken:
            extra.append(f"chosen as {taken[s.series_uid]}")
        if s.unusable:
            extra.append("unusable")
        out.append(f"{s.label} ({', '.join(extra)})")
    more = len(ranked) - limit
    return "; ".join(out) + (f"; {more} more" if more > 0 else "") if out else "none"


def _id_hint(s: SeriesInfo, study: Study) -> str:
    """What to write after ``--series role=`` for `s`."""
    if s.series_number is not None and sum(x.series_number == s.series_number for x in study.series) == 1:
        return str(s.series_number)
    return s.files[0].name if s.nifti and s.series_uid.startswith("nifti:") else s.series_uid


def _match(study: Study, role: str, ident: str) -> SeriesInfo:
    ident = str(ident).strip()
    found = [s for s in study.series if s.series_uid == ident]
    if not found and _int(ident) is not None:
        found = [s for s in study.series if s.series_number == _int(ident)]
    if not found:
        found = [s for s in study.series if s.nifti and ident in (s.nifti.name, _nifti_stem(s.nifti))]
    listing = "; ".join(f"{_id_hint(s, study)} '{s.name}'" for s in study.series)
    if not found:
        skipped = [s for s in study.skipped if ident in (s.series_uid, str(s.series_number))]
        why = (f"{skipped[0].label} is a {skipped[0].modality or 'non-MR'} series (skipped), not MR images"
               if skipped else "no series of the study has that SeriesNumber or SeriesInstanceUID")
        raise DataError(f"--series {role}={ident}: {why}. The MR series of {study.folder} are: {listing}; "
                        f"choose one of them: {_FIX_CHOOSE.format(role=role)}")
    if len(found) > 1:
        raise DataError(f"--series {role}={ident}: {len(found)} series have SeriesNumber {ident} "
                        f"({'; '.join(f'{s.label} {s.series_uid}' for s in found)}); give the "
                        f"SeriesInstanceUID instead: --series {role}=<SeriesInstanceUID>")
    s = found[0]
    if s.unusable:
        raise DataError(f"--series {role}={ident}: {s.label} cannot be used: {s.unusable}")
    return s


def _missing_message(role: str, ranked, taken, study: Study) -> str:
    fix = _FIX_CHOOSE.format(role=role)
    if role == "t1ce":
        t1s = [t for t in ranked if score_series(t[0], "t1", None, skip_groups=("contrast", "order"))[0]
               >= MIN_SCORE]
        return (f"t1ce: no post-contrast T1 series: no T1-weighted series shows contrast (ContrastBolusAgent "
                f"empty, and no +C, Gd, KM, post or CE in its description) or scores at least {MIN_SCORE}. "
                f"T1-weighted series found (with their t1ce scores): {_candidates(t1s, taken) if t1s else 'none'}. If one of them was "
                f"acquired after contrast injection, choose it with {fix}; without a post-contrast T1 the "
                "study does not give the T1ce input")
    return (f"{role}: no {ROLE_NAMES[role]} series: no series scores at least {MIN_SCORE} for {role}. Best "
            f"candidates: {_candidates(ranked, taken)}. If one of them is the {ROLE_NAMES[role]}, choose it "
            f"with {fix}")


def identify(study: Study, overrides: Mapping[str, str] | None = None,
             required: Sequence[str] = CHANNELS, missing_ok: Collection[str] = ()) -> Identification:
    """Choose the series of each role in `required` (and of each overridden role).
    `overrides` maps a role to a SeriesNumber or SeriesInstanceUID (NIfTI: the file
    name) and forces that choice. A role with no candidate scoring `MIN_SCORE` is an
    error unless in `missing_ok` (then it is listed in `missing`); a role whose two
    best candidates are within `MARGIN`, or whose best series cannot be read, is an
    error. Every problem of the study is reported in one `DataError`."""
    forced_ids: dict[str, str] = {}
    for key, value in (overrides or {}).items():
        role = _ROLE_ALIASES.get(str(key).lower())
        if role is None:
            raise MedsegError(f"--series {key}={value}: unknown role {key!r}; expected one of "
                              f"{', '.join(CHANNELS)}")
        forced_ids[role] = str(value)
    names = {}
    for r in [*required, *missing_ok]:
        if str(r).lower() not in _ROLE_ALIASES:
            raise MedsegError(f"unknown role {r!r}; expected one of {', '.join(CHANNELS)}")
        names[r] = _ROLE_ALIASES[str(r).lower()]
    required = [names[r] for r in required]
    missing_ok = {names[r] for r in missing_ok}
    roles = [r for r in CHANNELS if r in required or r in forced_ids]
    ctx = _context(study.series)
    ranked_all: dict[str, list[tuple[SeriesInfo, int, list[str]]]] = {}
    for role in roles:
        rows = [(s, *score_series(s, role, ctx)) for s in study.series]
        ranked_all[role] = sorted(rows, key=lambda t: (-t[1], _order(t[0])))
    problems: list[str] = []
    chosen: dict[str, SeriesInfo] = {}
    for role, ident in forced_ids.items():
        try:
            s = _match(study, role, ident)
        except DataError as exc:
            problems.append(str(exc))
            continue
        other = next((r for r, x in chosen.items() if x is s), None)
        if other:
            problems.append(f"--series {role}={ident}: {s.label} is already chosen as {other} "
                            f"(--series {other}=…); a series can serve one role only")
            continue
        chosen[role] = s
    used = {s.series_uid for s in chosen.values()}
    pairs = [(sc, role, s) for role in roles if role not in forced_ids
             for s, sc, _ in ranked_all[role] if sc >= MIN_SCORE]
    pairs.sort(key=lambda t: (-t[0], CHANNELS.index(t[1]), _order(t[2])))
    for sc, role, s in pairs:
        if role not in chosen and s.series_uid not in used:
            chosen[role] = s
            used.add(s.series_uid)
    choices: dict[str, Choice] = {}
    missing: list[str] = []
    for role in roles:
        if role in forced_ids and role not in chosen:
            continue                                   # its problem is recorded
        taken = {x.series_uid: r for r, x in chosen.items() if r != role}
        ranked = [t for t in ranked_all[role] if t[0].series_uid not in taken]
        if role not in chosen:
            if role in missing_ok:
                missing.append(role)
            else:
                problems.append(_missing_message(role, ranked_all[role], taken, study))
            continue
        s = chosen[role]
        _, sc, reasons = next(t for t in ranked if t[0] is s)
        rest = [t for t in ranked if t[0] is not s]
        runner = rest[0] if rest else None
        if role in forced_ids:
            reasons = [f"chosen by --series {role}={forced_ids[role]} (the rules score it {sc})", *reasons]
        elif s.unusable:
            alt = next((t for t in rest if not t[0].unusable), None)
            problems.append(
                f"{role}: the best {ROLE_NAMES[role]} candidate, {s.label} (score {sc}), cannot be used: "
                f"{s.unusable}. " + (f"The next usable candidate is {alt[0].label} (score {alt[1]}): "
                                     f"to use it, pass --series {role}={_id_hint(alt[0], study)}"
                                     if alt else "No other series is a candidate."))
            continue
        elif runner is not None and runner[1] >= MIN_SCORE and sc - runner[1] < MARGIN:
            problems.append(
                f"{role}: ambiguous: {s.label} (score {sc}) and {runner[0].label} (score {runner[1]}) are within "
                f"{MARGIN} points, so the rules cannot tell which is the {ROLE_NAMES[role]} (e.g. a repeated "
                f"acquisition). Candidates: {_candidates(ranked, taken)}. Choose one with "
                f"{_FIX_CHOOSE.format(role=role)}, e.g. --series {role}={_id_hint(s, study)}")
            continue
        choices[role] = Choice(role, s, sc, reasons, runner[0] if runner else None,
                               runner[1] if runner else None, role in forced_ids)
    if problems:
        raise DataError(f"{study.folder}: the series of study {study.case_id} cannot be identified:\n  - "
                        + "\n  - ".join(problems))
    warnings = []
    if ctx.order and "t1ce" in choices and ctx.order.get(choices["t1ce"].series.series_uid) == "post" \
            and not choices["t1ce"].overridden:
        warnings.append(f"t1ce {choices['t1ce'].series.label} was chosen by acquisition order only (no series "
                        "shows contrast): check it")
    for role, c in choices.items():
        kinds = {"DERIVED", "SECONDARY", "MPR", "REFORMATTED", "PROJECTION"} & set(c.series.image_type)
        if kinds and not c.overridden:
            warnings.append(f"{role} {c.series.label} is a {'/'.join(sorted(kinds))} image (a reformat or "
                            "derived series), chosen because no original acquisition scored higher: check "
                            f"that the original is not missing from the export, or name it with --series {role}=…")
    return Identification(study.case_id, study.folder, choices, missing, warnings, list(study.warnings))


# ------------------------------------------------------------------- loading
def load_series(info: SeriesInfo) -> tuple[np.ndarray, np.ndarray]:
    """The series as a float32 volume and its 4×4 RAS affine. DICOM: every file read
    and checked by `medseg.data.dicom.read_series_files` (missing or duplicate
    slices, undecodable pixels … are `DataError`s naming the study and series);
    NIfTI: as stored."""
    if info.unusable:
        raise DataError(f"{info.where}: cannot be read as one volume: {info.unusable}")
    if info.source == "dicom":
        from medseg.data.dicom import read_series_files
        series = read_series_files(info.files, info.where)
        return series.volume(), np.asarray(series.affine, np.float64)
    from medseg.data.io import load_array, load_header
    path = info.files[0]
    img = load_header(path)
    arr = load_array(path, img)
    while arr.ndim > 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 3:
        raise DataError(f"{info.where}: image of shape {arr.shape}; expected one 3D volume")
    return arr, np.asarray(img.affine, np.float64)


# ----------------------------------------------------------------- overrides
def parse_overrides(items: Iterable[str]) -> dict[str, dict[str, str]]:
    """``["t1ce=7", "case2:t2=1.2.3"]`` → ``{"": {"t1ce": "7"}, "case2": {"t2": "1.2.3"}}``
    (key "": every study)."""
    out: dict[str, dict[str, str]] = {}
    for item in items or ():
        left, sep, ident = str(item).partition("=")
        case, _, role = left.rpartition(":")
        role_name = _ROLE_ALIASES.get(role.strip().lower())
        if not sep or not ident.strip() or role_name is None:
            raise MedsegError(f"--series {item}: expected ROLE=ID or CASE:ROLE=ID, with ROLE one of "
                              f"{', '.join(CHANNELS)} and ID a SeriesNumber or SeriesInstanceUID, e.g. "
                              "--series t1ce=7")
        out.setdefault(case.strip(), {})[role_name] = ident.strip()
    return out


def overrides_for(parsed: Mapping[str, Mapping[str, str]], case_id: str) -> dict[str, str]:
    """The overrides that apply to `case_id` (its own over the general ones)."""
    return {**parsed.get("", {}), **parsed.get(case_id, {})}


# -------------------------------------------------------------------- report
def _flags(s: SeriesInfo) -> str:
    out = []
    if s.acquisition_type == "3D":
        out.append("3D")
    if s.contrast_agent:
        out.append(f"agent:{s.contrast_agent}")
    extra = [t for t in s.image_type if t not in ("ORIGINAL", "PRIMARY", "M", "ND", "NORM", "OTHER", "SECONDARY")]
    out.extend(extra[:3])
    if s.unusable:
        out.append("UNUSABLE")
    return " ".join(out)


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.3g}" if v < 100 else f"{v:.0f}"


def format_study(study: Study, ident: Identification | None = None, error: str | None = None) -> str:
    """The series table of a study (number, description, orientation, slices,
    spacing, TE/TR/TI, flags, role), then the choices with reasons and runner-ups,
    or the error."""
    roles = {c.series.series_uid: f"{r}{'*' if c.overridden else ''} ({c.score})"
             for r, c in (ident.choices.items() if ident else ())}
    head = f"study {study.case_id}  {study.folder}"
    if study.manufacturer:
        head += f"  ({study.manufacturer})"
    lines = [head, f"  {'#':>5}  {'description':<30} {'orient':<9} {'slices':>6}  {'spacing mm':<13} "
                   f"{'TE/TR/TI ms':<18} {'flags':<30} role"]
    for s in [*study.series, *study.skipped]:
        px = "x".join(f"{v:.2g}" for v in s.pixel_spacing) if s.pixel_spacing else "?"
        dz = f"{s.slice_spacing:.2g}" if s.slice_spacing else "?"
        timing = "/".join(_ms(v) for v in (s.echo_time, s.repetition_time, s.inversion_time))
        num = "-" if s.series_number is None else str(s.series_number)
        role = roles.get(s.series_uid, "skipped" if s in study.skipped else "")
        lines.append(f"  {num:>5}  {s.name[:30]:<30} {s.orientation[:9]:<9} {s.n_slices:>6}  "
                     f"{px + ' / ' + dz:<13} {timing:<18} {_flags(s)[:30]:<30} {role}")
    for s in study.series:
        if s.unusable:
            lines.append(f"  unusable: {s.label}: {s.unusable}")
    for w in study.warnings:
        lines.append(f"  warning: {w}")
    if ident is not None:
        lines.extend(ident.describe().splitlines()[1:])
    if error:
        lines.append("  ERROR: " + error.replace("\n", "\n  "))
    return "\n".join(lines)


def study_report(root: str | Path, overrides: Mapping[str, Mapping[str, str]] | None = None,
                 as_json: bool = False, missing_ok: Collection[str] = ()) -> tuple[str, bool]:
    """`medseg study`: every study below `root` scanned and identified → (the text or
    JSON report, whether every study was identified)."""
    overrides = overrides or {}
    results = scan_root(root)
    names = {folder.name for folder, _ in results}
    unknown = [c for c in overrides if c and c not in names]
    if unknown:
        raise MedsegError(f"--series {unknown[0]}:…: no study named {unknown[0]!r} under {root}; the studies "
                          f"are: {', '.join(sorted(names))}")
    texts, records, bad = [], [], 0
    for folder, got in results:
        study = got if isinstance(got, Study) else None
        ident, error = None, None
        if study is None:
            error = str(got)
        else:
            try:
                ident = identify(study, overrides_for(overrides, study.case_id), missing_ok=missing_ok)
            except MedsegError as exc:
                error = str(exc)
        bad += error is not None
        if as_json:
            records.append({"case_id": study.case_id if study else folder.name, "folder": str(folder),
                            "ok": error is None, "error": error,
                            "series": [s.to_dict() for s in study.series] if study else [],
                            "skipped": [s.to_dict() for s in study.skipped] if study else [],
                            "warnings": list(study.warnings) if study else [],
                            "identification": ident.to_dict() if ident else None})
        elif study is not None:
            texts.append(format_study(study, ident, error))
        else:
            texts.append(f"study {folder.name}  {folder}\n  ERROR: " + error.replace("\n", "\n  "))
    if as_json:
        return json.dumps({"root": str(root), "ok": not bad, "studies": records}, indent=2), not bad
    n = len(results)
    texts.append(f"{n} stud{'y' if n == 1 else 'ies'}: {n - bad} identified, {bad} failed")
    return "\n\n".join(texts), not bad
