"""`medseg predict --raw`: raw scanner studies → masks on a native series' grid.

For each study (one folder per study under ``--input``; or the series named by
hand with ``--t1 --t1ce --t2 --flair``):

1. its series are listed and the four sequences chosen (`medseg.raw.study`:
   the scored rule table; every choice, its reasons and the runner-up are
   printed and recorded);
2. the chosen series are brought into the atlas space (`medseg.raw.prepare`:
   N4, rigid co-registration to the T1ce, brain extraction, atlas registration,
   resampling) and the atlas-space case is written to ``OUT/atlas_space/<case>/``
   (BraTS 2023 layout, with its brain mask and ``transforms.json``), which every
   other medseg command reads like any case;
3. the model predicts the atlas-space case with the one batch driver
   (`medseg.predict.predict_all`); its probabilities (and uncertainty) are mapped
   through the inverse transforms onto the reference series' native grid and
   thresholded there (`InputCase.space`), so ``OUT/<case>.nii.gz`` lies on the
   reference series' exact grid; on DICOM input the DICOM Segmentation
   references that series' instances.

A study that fails (identification, a bad series, a registration or brain mask
QC flags as implausible) gets no mask: the batch goes on, and the failures are
listed at the end and in ``OUT/raw_failed.json``. A study prepared before (its
``atlas_space/<case>/transforms.json`` is there) is not registered again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Mapping, Sequence

import nibabel as nib
import numpy as np

from medseg.data.cases import InputCase
from medseg.data.io import write_json
from medseg.errors import DataError, MedsegError
from medseg.labels import CHANNELS
from medseg.raw.prepare import LAYOUT_KEYS, PreparedCase, prepare

__all__ = ["ATLAS_DIR", "FAILED", "RawStudy", "raw_studies", "manual_study", "prepare_studies",
           "load_prepared"]

#: Where the atlas-space cases go, inside OUT.
ATLAS_DIR = "atlas_space"
#: The studies that got no mask, and why.
FAILED = "raw_failed.json"

REFERENCES = ("t1ce", "flair", "t1", "t2")


class RawStudy:
    """A study to predict: its id, and how to get its series (role → (volume, affine))."""

    def __init__(self, case_id: str, folder: Path | None, files: Mapping[str, Path] | None = None):
        self.case_id, self.folder, self.files = case_id, folder, dict(files or {})


def raw_studies(root: str | Path) -> list[RawStudy]:
    """``--raw --input DIR``: DIR is one study or a folder of studies (the rule of
    `medseg.raw.study.find_studies`)."""
    from medseg.raw.study import find_studies
    return [RawStudy(f.name, f) for f in find_studies(Path(root))]


def manual_study(files: Mapping[str, str | Path | None], case_id: str | None) -> RawStudy:
    """``--raw --t1 --t1ce --t2 --flair``: series folders or NIfTI files named by hand."""
    named = {r: Path(p) for r, p in files.items() if p}
    if "t1ce" not in named:
        raise MedsegError("--raw with named series needs at least --t1ce (every series is registered to it)")
    for r, p in named.items():
        if not p.exists():
            raise DataError(f"--{r} {p}: not found; expected a DICOM series folder or a NIfTI file")
    cid = case_id or named["t1ce"].name.split(".")[0]
    return RawStudy(cid, None, named)


def _manual_series(study: RawStudy) -> tuple[dict, dict, dict]:
    """→ (role → (volume, affine), role → DICOM series or None, identification record)."""
    from medseg.data.dicom import read_series
    from medseg.data.io import load_array
    series, dicom = {}, {}
    for role, p in study.files.items():
        if p.is_dir():
            s = read_series(p)
            series[role], dicom[role] = (s.volume(), s.affine), s
        else:
            img = nib.load(str(p))
            series[role], dicom[role] = (load_array(p, img).astype(np.float32), img.affine), None
    return series, dicom, {"method": "named by hand", "choice": {r: str(p) for r, p in study.files.items()}}


def _identified_series(study: RawStudy, overrides: Mapping[str, str], missing_ok: Sequence[str],
                       print_fn: Callable[[str], None]) -> tuple[dict, dict, dict]:
    from medseg.data.dicom import read_series_files
    from medseg.raw.study import identify, load_series, scan_study
    found = scan_study(study.folder)
    for w in found.warnings:
        print_fn(f"{study.case_id}: warning: {w}")
    ident = identify(found, overrides, missing_ok=missing_ok)
    print_fn(ident.describe())
    series, dicom = {}, {}
    for role, choice in ident.choices.items():
        info = choice.series
        series[role] = load_series(info)
        dicom[role] = read_series_files(info.files, info.where) if info.source == "dicom" else None
    return series, dicom, ident.to_dict()


def load_prepared(folder: Path) -> PreparedCase | None:
    """A study prepared by an earlier run (its ``transforms.json``), or None."""
    path = folder / "transforms.json"
    if not path.is_file():
        return None
    r = json.loads(path.read_text())
    cid = r["case_id"]
    images = {role: folder / f"{cid}-{key}.nii.gz" for role, key in LAYOUT_KEYS.items()
              if (folder / f"{cid}-{key}.nii.gz").is_file()}
    atlas = nib.load(str(images["t1ce"]))
    return PreparedCase(cid, folder, images, folder / f"{cid}-brain.nii.gz", r["atlas"], r["brain_extractor"],
                        {k: {"affine": np.asarray(g["affine"]), "shape": tuple(g["shape"])}
                         for k, g in r["native_grids"].items()},
                        {k: np.asarray(m) for k, m in r["t1ce_to_role"].items()}, np.asarray(r["atlas_to_t1ce"]),
                        atlas.affine, tuple(atlas.shape[:3]), r["qc"], r["seconds"])


def _space(prepared: PreparedCase, role: str) -> Callable:
    def to_native(maps: np.ndarray) -> tuple[np.ndarray, nib.Nifti1Image]:
        out, affine = prepared.to_native(maps, role)
        ref = nib.Nifti1Image(np.zeros(out.shape[1:], np.uint8), affine)
        ref.set_sform(affine, 1)
        ref.set_qform(affine, 1)
        return out, ref
    return to_native


def prepare_studies(studies: Sequence[RawStudy], out_dir: str | Path, *, reference: str = "t1ce",
                    overrides: Mapping[str, str] | None = None, missing_ok: Sequence[str] = (),
                    atlas: str = "mni152", extractor: str = "builtin", accept_review: bool = False,
                    overwrite: bool = False,
                    print_fn: Callable[[str], None] = print) -> tuple[list[InputCase], dict[str, str]]:
    """Identify and prepare every study → (the atlas-space InputCases to predict, each
    mapping its maps back onto the `reference` series; {case id: why it failed})."""
    from medseg.data.dicom import DicomCase
    if reference not in REFERENCES:
        raise MedsegError(f"--reference {reference!r}: expected one of {', '.join(REFERENCES)}")
    out_dir = Path(out_dir)
    cases, failed = [], {}
    for study in studies:
        try:
            folder = out_dir / ATLAS_DIR / study.case_id
            prepared = None if overwrite else load_prepared(folder)
            if study.files:
                series, dicom, ident = _manual_series(study)
            else:
                series, dicom, ident = _identified_series(study, overrides or {}, missing_ok, print_fn)
            if reference not in series:
                raise DataError(f"{study.case_id}: no {reference} series to put the mask on (--reference "
                                f"{reference}); choose another --reference or name the series with --series")
            if prepared is None:
                prepared = prepare(study.case_id, series, out_dir / ATLAS_DIR, atlas, extractor)
                steps = ", ".join(f"{k} {v:.1f} s" for k, v in prepared.seconds.items())
                print_fn(f"{study.case_id}: atlas space {prepared.folder} ({steps}; brain "
                         f"{prepared.qc['brain_ml']:.0f} mL, extractor {extractor})")
            else:
                print_fn(f"{study.case_id}: atlas space {prepared.folder} (prepared by an earlier run)")
            reasons = prepared.review_reasons
            if reasons and not accept_review:
                raise DataError(f"{study.case_id}: quality control failed, no mask written: "
                                f"{'; '.join(reasons)}. Check {prepared.folder} (and its QC picture); "
                                "if the registration is right after all, run again with --accept-review")
            record = {"raw": {"identification": ident, "reference": reference, **prepared.record(),
                              "review": bool(reasons), "review_reasons": reasons}}
            ref_dicom = dicom.get(reference)
            channels = [c for c in CHANNELS if c in prepared.images]
            cases.append(InputCase(study.case_id, [prepared.images[c] for c in channels], channels,
                                   dicom=DicomCase({reference: ref_dicom}) if ref_dicom is not None else None,
                                   space=_space(prepared, reference), record=record))
        except MedsegError as exc:
            failed[study.case_id] = str(exc)
            print_fn(f"{study.case_id}: FAILED: {exc}")
    if failed:
        write_json({"failed": failed}, out_dir / FAILED)
    return cases, failed
