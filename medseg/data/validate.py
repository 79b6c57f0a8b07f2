"""Check a dataset before anything trains on it: every problem of every case.

`check_dataset` reads each file once (in threads) and returns `Finding`s:
errors (missing modality, unreadable or truncated file, wrong dimensionality,
shape or affine mismatch, non-finite values, a blank modality (all zero or any
other constant, `constant_value`), label values outside the convention,
duplicate case ids) and warnings (non-1 mm spacing, non-RAS orientation, which
medseg handles by resampling and reorienting). It never writes under the data
root.
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from medseg.data.discover import Case, Dataset, LabelScan, detect_convention, discover, \
    likely_convention
from medseg.data.io import AFFINE_TOL, load_array, load_header, same_grid
from medseg.errors import DataError, LabelError
from medseg.labels import LabelConvention, get_convention, validate_labels

__all__ = ["Finding", "CheckReport", "check_case", "check_dataset", "constant_value", "describe_blank"]



@dataclass(frozen=True)
class Finding:
    """One problem: `level` is "error" or "warning"; `path` the file (or case folder)."""

    level: str
    case_id: str
    path: Path
    message: str
    kind: str = ""

    def __str__(self) -> str:
        return f"{self.level.upper()} {self.case_id}: {self.path}: {self.message}"


@dataclass
class CheckReport:
    dataset: Dataset
    convention: LabelConvention | None
    findings: list[Finding]
    scans: list[LabelScan]

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors


def constant_value(data: np.ndarray) -> float | None:
    """The one value every finite voxel of `data` has, or None when they vary.

    This is the single rule of a *blank* modality (all zero, or any other constant:
    what a failed export or a placeholder file leaves): `medseg data check` reports
    it as an error and prediction treats it as a missing modality
    (`medseg.data.inputs.check_inputs`). NaN/inf voxels are ignored (reported on
    their own); a volume without any finite voxel is blank too (nan).
    """
    flat = np.asarray(data).ravel()
    if flat.size == 0:
        return float("nan")
    lo, hi = flat.min(), flat.max()
    if np.isfinite(lo) and np.isfinite(hi):       # the usual case: two reductions, no copy
        return float(lo) if lo == hi else None
    finite = flat[np.isfinite(flat)]
    if finite.size == 0:
        return float("nan")
    return float(finite[0]) if finite.min() == finite.max() else None


def describe_blank(value: float) -> str:
    """How a blank volume of `value` (`constant_value`) is described in messages."""
    if np.isnan(value):
        return "without a single finite voxel (all NaN or infinite)"
    return "all zero" if value == 0 else f"constant (every voxel is {value:g})"


def _reason(exc: Exception, path: Path) -> str:
    """The message of `exc` without its leading file name (the finding names the file)."""
    msg, prefix = str(exc), f"{path}: "
    return msg[len(prefix):] if msg.startswith(prefix) else msg


def _expected_ndim(dataset: Dataset) -> tuple[int, int | None]:
    """(ndim, channels) of an image file: MSD stores all 4 channels in one 4D file."""
    return (4, 4) if dataset.layout.name == "msd" else (3, None)


def check_case(case: Case, dataset: Dataset, convention: LabelConvention | None,
               affine_tol: float = AFFINE_TOL) -> tuple[list[Finding], LabelScan | None]:
    """All findings for one case, and its label scan when the label was readable."""
    out: list[Finding] = []

    def err(path, msg):
        out.append(Finding("error", case.case_id, Path(path), msg))

    def warn(path, msg, kind):
        out.append(Finding("warning", case.case_id, Path(path), msg, kind))

    for name in case.missing:
        if name in ("label", "image"):
            err(case.folder, f"{name} file of case {case.case_id} listed in dataset.json is "
                             "missing; restore it or remove the entry")
        else:
            key = dataset.layout.keys.get(name, name)
            err(case.folder, f"missing modality {name} (expected a file named "
                             f"{case.case_id}{dataset.layout.sep}{key}.nii.gz); all four modalities "
                             "are needed: restore the file or remove the case")
    ndim, channels = _expected_ndim(dataset)
    ref = None  # (path, spatial shape, affine) of the first readable file
    scan = None
    for path in case.files:
        is_label = path == case.label
        try:
            img = load_header(path)
        except DataError as exc:
            err(path, _reason(exc, path))
            continue
        shape = img.shape
        want = 3 if is_label else ndim
        if len(shape) != want or (not is_label and channels and shape[3] != channels):
            what = "a 3D label map" if is_label else (
                f"a 4D image with {channels} channels (FLAIR, T1w, T1gd, T2w)" if channels else "a 3D volume")
            err(path, f"expected {what}, found shape {shape}" +
                ("; squeeze the singleton axis" if len(shape) == want + 1 and shape[-1] == 1 else ""))
            continue
        spatial, affine = shape[:3], img.affine
        if ref is None:
            ref = (path, spatial, affine)
        else:
            if spatial != ref[1]:
                err(path, f"shape {spatial} differs from {ref[0].name} {ref[1]}; all modalities and "
                          "the label must share one grid: resample (labels nearest-neighbour) onto it")
            elif not same_grid(spatial, affine, ref[1], ref[2], affine_tol):
                diff = float(np.abs(affine - ref[2]).max())
                err(path, f"affine differs from {ref[0].name} by up to {diff:.4g} (tolerance "
                          f"{affine_tol}); the files are not on the same grid: register/resample "
                          "them onto one grid or fix the header")
        try:
            data = load_array(path, img)
        except DataError as exc:
            err(path, _reason(exc, path))
            continue
        if is_label:
            scan = LabelScan.from_array(case.case_id, data, img.header.get_zooms())
            if convention is not None:
                try:
                    validate_labels(scan.values, convention, source=str(path))
                except LabelError as exc:
                    err(path, _reason(exc, path))
            continue
        finite = np.isfinite(data)
        if not finite.all():
            err(path, f"{int((~finite).sum())} voxels are NaN or infinite; expected finite "
                      "intensities: fix the export (e.g. replace NaN by 0 outside the brain)")
        chans = [data] if data.ndim == 3 else [data[..., i] for i in range(data.shape[3])]
        names = [None] if data.ndim == 3 else list(dataset.layout.channels)
        for ch, name in zip(chans, names):
            value = constant_value(ch)
            if value is not None:       # all zero or any other constant: no image content
                err(path, f"{'channel ' + name + ' is' if name else 'image is'} {describe_blank(value)}; "
                          "expected an MRI volume with varying intensities (a blank modality usually "
                          "means a failed export): re-export it")
        zooms = np.array(img.header.get_zooms()[:3], float)
        if not np.allclose(zooms, 1.0, atol=0.01):
            warn(path, f"voxel spacing {tuple(round(float(z), 3) for z in zooms)} mm, not 1 mm; "
                       "medseg resamples to the training spacing and writes masks back on this grid",
                 "spacing is not 1 mm")
        codes = nib.aff2axcodes(affine)
        if codes != ("R", "A", "S"):
            warn(path, f"orientation {''.join(codes)}, not RAS; medseg reorients to RAS for the "
                       "network and writes masks back in this orientation", "orientation is not RAS")
    return _merge_warnings(out), scan


def _merge_warnings(findings: list[Finding]) -> list[Finding]:
    """One spacing/orientation warning per case, not one per modality."""
    seen, out = set(), []
    for f in findings:
        key = (f.level, f.message) if f.level == "warning" else None
        if key is None or key not in seen:
            out.append(f)
            if key:
                seen.add(key)
    return out


def check_dataset(root: str | Path, convention: str | None = None, jobs: int | None = None,
                  affine_tol: float = AFFINE_TOL, progress=None) -> CheckReport:
    """Discover and check every case under `root`; never modifies anything there.

    With `convention` None, it is detected from the layout and the label values
    found (see `detect_convention`); a label value that fits no convention is
    reported per file.
    """
    dataset = discover(root)
    conv = get_convention(convention) if convention else None
    findings: list[Finding] = []
    counts = Counter(c.case_id for c in dataset.cases)
    folders = defaultdict(list)
    for c in dataset.cases:
        folders[c.case_id].append(c.folder)
    for cid, n in counts.items():
        if n > 1:
            findings.append(Finding("error", cid, folders[cid][0],
                                    f"case id appears {n} times ({', '.join(map(str, folders[cid]))}); "
                                    "case ids must be unique: remove or rename the duplicates"))
    results: list[tuple[list[Finding], LabelScan | None]] = []
    with ThreadPoolExecutor(max_workers=jobs or os.cpu_count() or 1) as pool:
        futures = [pool.submit(check_case, c, dataset, conv, affine_tol) for c in dataset.cases]
        for i, fut in enumerate(futures):
            results.append(fut.result())
            if progress is not None:
                progress(i + 1, len(futures), dataset.cases[i].case_id)
    scans = [s for _, s in results if s is not None]
    for case_findings, _ in results:
        findings.extend(case_findings)
    if conv is None and scans:
        try:
            conv = detect_convention(dataset, scans)
        except LabelError:
            # Name each offending file against the most likely convention.
            found = {v for s in scans for v in s.values}
            conv = get_convention(likely_convention(dataset.layout, found, scans))
            for case, (_, scan) in zip(dataset.cases, results):
                if scan is None:
                    continue
                try:
                    validate_labels(scan.values, conv, source=str(case.label))
                except LabelError as exc:
                    findings.append(Finding("error", case.case_id, case.label,
                                            _reason(exc, case.label)))
    return CheckReport(dataset, conv, findings, scans)
