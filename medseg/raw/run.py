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
from medseg.data.io import write_json, write_nifti
from medseg.errors import DataError, MedsegError
from medseg.labels import CHANNELS
from medseg.raw.prepare import LAYOUT_KEYS, PreparedCase, prepare

__all__ = ["ATLAS_DIR", "FAILED", "RawStudy", "raw_studies", "manual_study", "prepare_studies",
           "load_prepared", "write_qc_pictures"]

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
    """``--raw --input DIR``: DIR holds one folder per study, the case id is the
    folder's name (`medseg.raw.study.find_studies` splits DIR into them)."""
    from medseg.raw.study import find_studies
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"--input {root}: folder not found; expected a folder with one folder per study")
    loose = [p.name for p in sorted(root.iterdir()) if p.is_file() and not p.name.startswith(".")]
    subs = [p for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".")]
    if loose:
        raise DataError(f"--input {root}: holds files directly ({', '.join(loose[:3])}…); --raw --input "
                        "takes a folder with one folder per study (the case id is its name): move this "
                        f"study's files into {root}/<case_id>/ and pass --input {root}")
    folders = find_studies(root)
    if folders == [root]:        # every file below is one study
        if len(subs) == 1:
            return [RawStudy(subs[0].name, subs[0])]
        raise DataError(f"--input {root}: its {len(subs)} folders ({', '.join(p.name for p in subs[:4])}…) "
                        "hold one study (one StudyInstanceUID); --raw --input takes a folder with one "
                        f"folder per study: pass --input {root.parent} if {root.name} is the study folder")
    return [RawStudy(f.name, f) for f in folders]


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
    """`InputCase.space` of a prepared study: maps on its atlas grid → `role`'s native grid."""
    def to_native(maps: np.ndarray) -> tuple[np.ndarray, nib.Nifti1Image]:
        out, affine = prepared.to_native(maps, role)
        ref = nib.Nifti1Image(np.zeros(out.shape[1:], np.uint8), affine)
        ref.set_sform(affine, 1)
        ref.set_qform(affine, 1)
        return out, ref
    to_native.prepared, to_native.role = prepared, role
    return to_native


def write_qc_pictures(cases: Sequence[InputCase], out_dir: str | Path,
                      print_fn: Callable[[str], None] = print) -> None:
    """``OUT/qc/<case>.png`` for each predicted raw study (`medseg.raw.qc`), when
    matplotlib is installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print_fn("note: no QC pictures (they need matplotlib: pip install 'medseg[viz]')")
        return
    from medseg.raw.qc import qc_picture
    out_dir = Path(out_dir)
    for case in cases:
        mask = out_dir / f"{case.case_id}.nii.gz"
        if case.space is None or not mask.exists():
            continue
        prepared, role = case.space.prepared, case.space.role
        img = nib.load(str(prepared.folder / "native" / f"series_{role}_grid.nii.gz"))
        conv = json.loads((out_dir / "predictions.json").read_text())["run"]["label_convention"]
        qc_picture(prepared, mask, (np.asarray(img.dataobj, np.float32), img.affine), conv,
                   out_dir / "qc" / f"{case.case_id}.png")
    print_fn(f"QC pictures: {out_dir / 'qc'}/<case>.png (registration edges, brain outline, mask)")


def prepare_studies(studies: Sequence[RawStudy], out_dir: str | Path, *, reference: str = "t1ce",
                    overrides: Mapping[str, Mapping[str, str]] | None = None, missing_ok: Sequence[str] = (),
                    atlas: str = "mni152", extractor: str = "builtin", atlas_mm: float | None = None,
                    accept_review: bool = False,
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
                from medseg.raw.study import overrides_for
                series, dicom, ident = _identified_series(study, overrides_for(overrides or {}, study.case_id),
                                                          missing_ok, print_fn)
            if reference not in series:
                raise DataError(f"{study.case_id}: no {reference} series to put the mask on (--reference "
                                f"{reference}); choose another --reference or name the series with --series")
            if prepared is None:
                prepared = prepare(study.case_id, series, out_dir / ATLAS_DIR, atlas, extractor, atlas_mm=atlas_mm)
                steps = ", ".join(f"{k} {v:.1f} s" for k, v in prepared.seconds.items())
                print_fn(f"{study.case_id}: atlas space {prepared.folder} ({steps}; brain "
                         f"{prepared.qc['brain_ml']:.0f} mL, extractor {extractor})")
            else:
                print_fn(f"{study.case_id}: atlas space {prepared.folder} (prepared by an earlier run)")
            native_ref = prepared.folder / "native" / f"series_{reference}_grid.nii.gz"
            if not native_ref.exists():     # the reference series as NIfTI: the mask's grid, for viewers
                write_nifti(series[reference][0], series[reference][1], native_ref)
            reasons = prepared.review_reasons
            if reasons and not accept_review:
                raise DataError(f"{study.case_id}: quality control failed, no mask written: "
                                f"{'; '.join(reasons)}. Check {prepared.folder} (and its QC picture); "
                                "if the registration is right after all, run again with --accept-review")
            record = {"raw": {"identification": ident, "reference": reference, **prepared.record(),
                              "review": bool(reasons), "review_reasons": reasons}}
            ref_dicom = dicom.get(reference)
            channels = [c for c in CHANNELS if c in prepared.images]
            space = _space(prepared, reference)
            cases.append(InputCase(study.case_id, [prepared.images[c] for c in channels], channels,
                                   dicom=DicomCase({reference: ref_dicom}) if ref_dicom is not None else None,
                                   space=space, record=record))
        except MedsegError as exc:
            failed[study.case_id] = str(exc)
            print_fn(f"{study.case_id}: FAILED: {exc}")
    if failed:
        write_json({"failed": failed}, out_dir / FAILED)
    return cases, failed
