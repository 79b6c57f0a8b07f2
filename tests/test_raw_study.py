"""Sequence identification of raw scanner studies (`medseg.raw.study`, `medseg study`):
Siemens, GE and Philips studies with their usual distractors (localizers, DWI/ADC,
subtractions, reformats, a pre-contrast 3D T1 beside the post-contrast one, GE's
"T1 FLAIR"), in every folder layout (one folder per series, nested, all files in
one folder, NIfTI + dcm2niix sidecars), and every refusal with its message."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import BasicTextSRStorage, CTImageStorage, ExplicitVRLittleEndian, generate_uid

from medseg.cli import main
from medseg.data.dicom import write_series
from medseg.errors import DataError
from medseg.raw.study import (MARGIN, MIN_SCORE, RULES, Rule, SeriesInfo, find_studies, identify, load_series,
                              parse_overrides, scan_root, scan_study, score_series)

ORIGINAL = ["ORIGINAL", "PRIMARY", "M", "ND"]


def _affine(plane: str, spacing=(1.0, 1.0, 3.0)) -> np.ndarray:
    """RAS affine of an (columns, rows, slices) grid in `plane`."""
    sx, sy, sz = spacing
    cols = {"axial": [[sx, 0, 0], [0, sy, 0], [0, 0, sz]],
            "sagittal": [[0, 0, sz], [sx, 0, 0], [0, sy, 0]],
            "coronal": [[sx, 0, 0], [0, 0, sz], [0, sy, 0]]}[plane]
    out = np.eye(4)
    out[:3, :3] = np.asarray(cols, float)
    out[:3, 3] = [-4.0, -4.0, -10.0]
    return out


def _tm(seconds: int) -> str:
    return f"{seconds // 3600:02d}{seconds // 60 % 60:02d}{seconds % 60:02d}"


class Writer:
    """Writes the DICOM series of one study (one patient, one StudyInstanceUID)."""

    def __init__(self, root: Path, vendor: str, patient: str = "P1", study_uid: str | None = None):
        self.root, self.vendor, self.patient = root, vendor, patient
        self.uids = {"StudyInstanceUID": study_uid or generate_uid(), "FrameOfReferenceUID": generate_uid()}

    def series(self, number: int, description: str, tags: dict | None = None, *, plane: str = "axial",
               slices: int = 12, spacing=(1.0, 1.0, 3.0), folder: Path | None = None) -> list[Path]:
        data = ((np.arange(8 * 8 * slices).reshape(8, 8, slices) % 400) + number).astype(np.int16)
        t = {"SeriesNumber": number, "ProtocolName": description, "ImageType": ORIGINAL,
             "Manufacturer": self.vendor, "AcquisitionTime": _tm(8 * 3600 + 20 * number), **(tags or {})}
        return write_series(nib.Nifti1Image(data, _affine(plane, spacing)),
                            folder or self.root / f"{number:03d}_{description.replace(' ', '_')}",
                            description, self.uids, patient_id=self.patient, tags=t)

    def localizer(self, number: int, description: str, tags: dict | None = None) -> list[Path]:
        """A 3-plane localizer: 3 × 3 images in three orientations, one series."""
        t = {"SeriesInstanceUID": generate_uid(), **(tags or {})}
        return [f for plane in ("axial", "sagittal", "coronal")
                for f in self.series(number, description, t, plane=plane, slices=3,
                                     folder=self.root / f"{number:03d}_loc_{plane}")]


def _tags(seq, te, tr, ti=None, acq="2D", **extra) -> dict:
    out = {"ScanningSequence": seq, "SequenceVariant": ["SK", "SP"], "MRAcquisitionType": acq,
           "EchoTime": te, "RepetitionTime": tr, **extra}
    if ti is not None:
        out["InversionTime"] = ti
    return out


ISO = {"plane": "sagittal", "slices": 16, "spacing": (1.0, 1.0, 1.0)}
MPRAGE = _tags(["GR", "IR"], 2.98, 2300, 900, "3D", SequenceVariant=["SK", "SP", "MP"])


def siemens(root: Path) -> Path:
    w = Writer(root, "SIEMENS")
    w.localizer(1, "AAHead_Scout")
    w.series(2, "t1_mprage_sag_p2", MPRAGE, **ISO)
    w.series(3, "t2_tse_tra", _tags(["SE"], 101, 6000), spacing=(0.9, 0.9, 5.0))
    w.series(4, "t2_tirm_tra_dark-fluid", _tags(["SE", "IR"], 81, 9000, 2500), spacing=(0.9, 0.9, 5.0))
    w.series(5, "ep2d_diff_tra_TRACEW", _tags(["EP"], 89, 4800, ImageType=[
        "ORIGINAL", "PRIMARY", "DIFFUSION", "TRACEW", "ND"]), spacing=(1.8, 1.8, 5.0))
    w.series(6, "ep2d_diff_tra_ADC", _tags(["EP"], 89, 4800, ImageType=[
        "DERIVED", "PRIMARY", "DIFFUSION", "ADC", "ND"]), spacing=(1.8, 1.8, 5.0))
    w.series(7, "t1_mprage_sag_p2_KM", {**MPRAGE, "ContrastBolusAgent": "Gadovist"}, **ISO)
    w.series(8, "t1_mprage_sag_p2_KM_SUB", {**MPRAGE, "ContrastBolusAgent": "Gadovist",
                                            "ImageType": ["DERIVED", "PRIMARY", "M", "ND", "SUB"]}, **ISO)
    w.series(9, "t1_mprage_sag_p2_KM_MPR_tra", {**MPRAGE, "ContrastBolusAgent": "Gadovist",
                                                "ImageType": ["DERIVED", "PRIMARY", "MPR", "ND"]})
    return root


def ge(root: Path) -> Path:
    """Nested as a PACS export: DICOM/PA000/ST000/SEnnn/IMnnnn."""
    w = Writer(root, "GE MEDICAL SYSTEMS")
    base = root / "DICOM" / "PA000" / "ST000"
    w.root = base
    w.localizer(1, "3-Plane Loc", _tags(["GR"], 1.5, 5, ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"]))
    w.series(2, "Ax T1 FLAIR", _tags(["SE", "IR"], 24, 2400, 860), folder=base / "SE2")
    w.series(3, "Ax T2 FSE", _tags(["SE"], 102, 4600), folder=base / "SE3")
    w.series(4, "Ax T2 FLAIR", _tags(["SE", "IR"], 140, 9000, 2250), folder=base / "SE4")
    w.series(5, "Ax DWI 1000b", _tags(["EP"], 80, 6000, ImageType=["ORIGINAL", "PRIMARY", "OTHER"]),
             folder=base / "SE5")
    w.series(6, "Apparent Diffusion Coefficient (mm2/s)", {"ImageType": ["DERIVED", "SECONDARY"]},
             folder=base / "SE6")
    w.series(7, "Sag 3D BRAVO +C", _tags(["GR", "IR"], 3.2, 8.2, 450, "3D"), folder=base / "SE7", **ISO)
    w.series(8, "Ax T1 +C", _tags(["SE"], 10, 550), folder=base / "SE8")
    return root


def philips(root: Path) -> Path:
    """Every file of every series mixed in one folder, without extensions."""
    tmp = root.parent / (root.name + "_parts")
    w = Writer(tmp, "Philips Medical Systems")
    tfe = _tags(["GR"], 3.7, 8.1, acq="3D")
    w.localizer(101, "Survey", {"ImageType": ["ORIGINAL", "PRIMARY", "M_FFE", "M", "FFE"]})
    w.series(201, "T1W_3D_TFE", tfe, **ISO)
    w.series(301, "T2W_TSE", _tags(["SE"], 80, 3000))
    w.series(401, "T2W_FLAIR", _tags(["IR"], 125, 11000, 2800))
    w.series(501, "DWI", _tags(["EP"], 90, 5000, ImageType=["ORIGINAL", "PRIMARY", "M_SE", "M", "SE"]))
    w.series(502, "dADC", _tags(["EP"], 90, 5000, ImageType=["DERIVED", "PRIMARY", "ADC", "ADC"]))
    w.series(601, "sT1W_3D_TFE +C", {**tfe, "ContrastBolusAgent": "Dotarem"}, **ISO)
    w.series(602, "T1W_3D_TFE SUB", {**tfe, "ImageType": ["DERIVED", "PRIMARY", "SUBTRACTION"]}, **ISO)
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for k, f in enumerate(sorted(tmp.rglob("*.dcm"))):
        f.rename(root / f"{rng.integers(1 << 40):x}{k:04d}")
    shutil.rmtree(tmp)
    (root / ".DS_Store").write_bytes(b"\0\1junk")
    (root / "notes.txt").write_text("exported by the PACS\n")
    return root


def basic(root: Path, with_t1ce=True, with_flair=True, extra=()) -> Path:
    """A small Siemens-like study (one folder per series)."""
    w = Writer(root, "SIEMENS")
    w.series(2, "t1_se_tra", _tags(["SE"], 12, 600))
    if with_t1ce:
        w.series(7, "t1_se_tra_KM", _tags(["SE"], 12, 600, ContrastBolusAgent="Dotarem"))
    w.series(3, "t2_tse_tra", _tags(["SE"], 101, 6000))
    if with_flair:
        w.series(4, "t2_tirm_tra_dark-fluid", _tags(["SE", "IR"], 81, 9000, 2500))
    for number, desc, tags in extra:
        w.series(number, desc, tags)
    return root


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    root = tmp_path_factory.mktemp("studies")
    return {"siemens": siemens(root / "siemens"), "ge": ge(root / "ge"), "philips": philips(root / "philips")}


def _numbers(ident) -> dict[str, int]:
    return {role: c.series.series_number for role, c in ident.choices.items()}


# ---------------------------------------------------------------- vendors
@pytest.mark.parametrize("vendor, expected", [
    ("siemens", {"t1": 2, "t1ce": 7, "t2": 3, "flair": 4}),
    ("ge", {"t1": 2, "t1ce": 7, "t2": 3, "flair": 4}),
    ("philips", {"t1": 201, "t1ce": 601, "t2": 301, "flair": 401}),
])
def test_vendor_studies_are_identified(studies, vendor, expected):
    study = scan_study(studies[vendor])
    assert study.case_id == vendor
    ident = identify(study)
    assert _numbers(ident) == expected, ident.describe()
    for c in ident.choices.values():
        assert c.score >= MIN_SCORE and c.reasons and all(r[0] in "+-" for r in c.reasons)
        assert c.runner_up is None or c.score - c.runner_up_score >= MARGIN
    # The distractors are never chosen, whatever the layout.
    chosen = {c.series.series_uid for c in ident.choices.values()}
    for s in study.series:
        if set(re.split(r"[^a-z0-9]+", s.name.lower())) & {"scout", "loc", "survey", "diff", "dwi", "adc",
                                                             "dadc", "sub", "mpr", "tracew"}:
            assert s.series_uid not in chosen
    d = json.loads(json.dumps(ident.to_dict()))
    assert d["roles"]["t1ce"]["series_number"] == expected["t1ce"] and d["case_id"] == vendor
    text = ident.describe()
    assert "runner-up" in text and all(role in text for role in expected)


def test_siemens_details(studies):
    study = scan_study(studies["siemens"])
    by = {s.series_number: s for s in study.series}
    assert by[1].orientation == "mixed" and by[1].unusable and "localizer" in by[1].unusable
    assert by[2].orientation == "sagittal" and by[2].acquisition_type == "3D" and by[2].n_slices == 16
    assert by[3].orientation == "axial" and by[3].slice_spacing == pytest.approx(5.0)
    assert by[3].pixel_spacing == pytest.approx((0.9, 0.9)) and by[3].echo_time == 101
    assert by[8].image_type[-1] == "SUB" and by[7].contrast_agent == "Gadovist"
    assert by[2].patient_id == "P1" and by[2].manufacturer == "SIEMENS"
    ident = identify(study)
    t1ce = ident.choices["t1ce"]
    # The pre-contrast 3D T1 looks like the T1ce but for the contrast agent; it is the runner-up.
    assert t1ce.runner_up.series_number in (2, 9)
    assert any("ContrastBolusAgent 'Gadovist'" in r for r in t1ce.reasons)
    assert any("KM" in r and "post-contrast" in r for r in t1ce.reasons)
    # Subtraction and reformat lose to the ORIGINAL acquisition, for every role.
    for role in ("t1", "t1ce"):
        sub = score_series(by[8], role)[0]
        mpr = score_series(by[9], role)[0]
        assert sub < MIN_SCORE and mpr < score_series(by[7], "t1ce")[0] - MARGIN
    assert any("subtraction" in r for r in score_series(by[8], "t1ce")[1])


def test_ge_t1_flair_is_t1_not_flair(studies):
    study = scan_study(studies["ge"])
    t1_flair = next(s for s in study.series if s.name == "Ax T1 FLAIR")
    score, reasons = score_series(t1_flair, "flair")
    assert score < 0 and any("T1-weighted inversion recovery, not a FLAIR" in r for r in reasons)
    assert score_series(t1_flair, "t1")[0] >= MIN_SCORE
    ident = identify(study)
    assert ident.choices["t1"].series is t1_flair
    assert ident.choices["flair"].series.name == "Ax T2 FLAIR"
    assert ident.choices["t1ce"].runner_up.name == "Ax T1 +C"     # 2D post-contrast loses to the 3D one
    assert all(len(s.files) in (9, 12, 16) for s in study.series)  # nested folders, grouped by series


def test_mixed_folder_warnings_and_loading(studies, tmp_path):
    root = tmp_path / "philips"
    shutil.copytree(studies["philips"], root)
    study = scan_study(root)
    assert [s.series_number for s in study.series] == [101, 201, 301, 401, 501, 502, 601, 602]
    assert any("notes.txt" in w and "not DICOM" in w for w in study.warnings)
    assert not any("DS_Store" in w for w in study.warnings)
    t2 = identify(study).series("t2")
    vol, affine = load_series(t2)
    assert vol.shape == (8, 8, 12) and vol.dtype == np.float32
    np.testing.assert_allclose(affine, _affine("axial"), atol=1e-4)
    np.testing.assert_array_equal(vol, ((np.arange(768).reshape(8, 8, 12) % 400) + 301).astype(np.float32))
    # A missing slice in a mixed folder: the existing check, naming the study and the series.
    middle = sorted(t2.files, key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))[6]
    middle.unlink()
    t2 = identify(scan_study(root)).series("t2")
    with pytest.raises(DataError, match=r"series 301 'T2W_TSE'.*1 slice\(s\) missing") as err:
        load_series(t2)
    assert str(root) in str(err.value)


def test_nifti_with_dcm2niix_sidecars(tmp_path):
    root = tmp_path / "sub-01"
    root.mkdir()
    series = [
        (2, "t1_mprage_sag_p2", {"ScanningSequence": "GR_IR", "SequenceVariant": "SK_SP_MP", "MRAcquisitionType": "3D",
                                 "EchoTime": 0.00298, "RepetitionTime": 2.3, "InversionTime": 0.9}, 16),
        (3, "t2_tse_tra", {"ScanningSequence": "SE", "MRAcquisitionType": "2D", "EchoTime": 0.101,
                           "RepetitionTime": 6.0}, 12),
        (4, "t2_tirm_tra_dark-fluid", {"ScanningSequence": "SE_IR", "MRAcquisitionType": "2D", "EchoTime": 0.081,
                                       "RepetitionTime": 9.0, "InversionTime": 2.5}, 12),
        (5, "ep2d_diff_tra", {"ScanningSequence": "EP", "EchoTime": 0.089, "RepetitionTime": 4.8}, 12),
        (7, "t1_mprage_sag_p2_KM", {"ScanningSequence": "GR_IR", "MRAcquisitionType": "3D", "EchoTime": 0.00298,
                                    "RepetitionTime": 2.3, "InversionTime": 0.9, "ContrastBolusAgent": "Gadovist"}, 16),
    ]
    for number, desc, meta, slices in series:
        shape = (8, 8, slices, 3) if "diff" in desc else (8, 8, slices)
        stem = root / f"sub-01_{number}_{desc}"
        nib.save(nib.Nifti1Image(np.ones(shape, np.float32) * number, np.diag([1.0, 1.0, 2.0, 1.0])),
                 str(stem) + ".nii.gz")
        Path(str(stem) + ".json").write_text(json.dumps({
            "SeriesDescription": desc, "ProtocolName": desc, "SeriesNumber": number, "Manufacturer": "Siemens",
            "ImageType": ["ORIGINAL", "PRIMARY", "M", "ND", "NORM"], **meta}))
    study = scan_study(root)
    by = {s.series_number: s for s in study.series}
    assert all(s.source == "nifti" and s.sidecar for s in study.series)
    assert by[2].echo_time == pytest.approx(2.98) and by[2].repetition_time == pytest.approx(2300)
    assert by[2].inversion_time == pytest.approx(900) and by[2].scanning_sequence == ("GR", "IR")
    assert by[4].inversion_time == pytest.approx(2500) and by[2].orientation == "axial"
    assert "4D" in by[5].unusable
    ident = identify(study)
    assert _numbers(ident) == {"t1": 2, "t1ce": 7, "t2": 3, "flair": 4}
    vol, affine = load_series(ident.series("flair"))
    assert vol.shape == (8, 8, 12) and np.all(vol == 4) and affine[2, 2] == 2.0
    # Overridden by file name; without sidecars, the file names are the evidence.
    assert identify(study, {"t2": "sub-01_3_t2_tse_tra.nii.gz"}).choices["t2"].overridden
    for names in (("t1", "t1ce", "t2", "flair"), ("t1n", "t1c", "t2w", "t2f")):    # BraTS 2021, 2023
        bare = tmp_path / names[0]
        bare.mkdir()
        for name in names:
            nib.save(nib.Nifti1Image(np.zeros((8, 8, 12), np.float32), np.eye(4)), str(bare / f"c-{name}.nii.gz"))
        bare_study = scan_study(bare)
        got = {role: c.series.files[0].name for role, c in identify(bare_study).choices.items()}
        assert got == {role: f"c-{name}.nii.gz" for role, name in zip(("t1", "t1ce", "t2", "flair"), names)}
        assert any("no JSON sidecar" in w for w in bare_study.warnings)


def _info(description: str, seq=("SE",), te=None, tr=None, ti=None, acq="2D", **kw) -> SeriesInfo:
    return SeriesInfo("dicom", Path("study"), [], description, 1, description, "", "MR", "", ("ORIGINAL", "PRIMARY"),
                      tuple(seq), (), acq, te, tr, ti, n_images=20, n_slices=20, pixel_spacing=(1.0, 1.0),
                      slice_spacing=5.0, orientation="axial", **kw)


@pytest.mark.parametrize("info, good, bad", [
    (_info("t1_fl2d_tra", ("GR",), 2.5, 250), {"t1"}, {"t2", "flair"}),       # Siemens 2D FLASH T1
    (_info("t2_fl2d_tra_hemo", ("GR",), 20, 700), set(), {"t1", "t2"}),       # T2* is not T2
    (_info("Ax T1 FLAIR", ("SE", "IR"), 20, 2200, 800), {"t1"}, {"flair"}),   # GE: T1-weighted
    (_info("Sag CUBE FLAIR", ("SE", "IR"), 120, 6000, 1800, "3D"), {"flair"}, {"t2", "t1"}),
    (_info("T2W_FLAIR", ("IR",), 125, 11000, 2800), {"flair"}, {"t2"}),
    (_info("FLAIR_longTR", ("IR",), 125, 11000, 2800), {"flair"}, {"t2"}),
    (_info("Ax T2 PROPELLER", ("SE",), 110, 5000), {"t2"}, {"t1", "flair"}),
    (_info("T1 pre Gd", ("SE",), 10, 500), {"t1"}, {"t1ce"}),
    (_info("T1 W/O contrast", ("SE",), 10, 500), {"t1"}, {"t1ce"}),
    (_info("Ax T1 SE +C", ("SE",), 10, 500), {"t1ce"}, {"t1"}),
    (_info("T1W_SE", ("SE",), 10, 500, contrast_agent="Gadovist"), {"t1ce"}, {"t1"}),
    (_info("T1W_SE", ("SE",), 10, 500), {"t1"}, {"t1ce"}),                    # no sign of contrast
    (_info("PD_TSE", ("SE",), 12, 3000), set(), {"t1", "t2"}),
    (_info("t2_tirm_cor_STIR", ("SE", "IR"), 60, 5000, 150), set(), {"flair"}),
])
def test_name_and_timing_rules(info, good, bad):
    for role in good:
        assert score_series(info, role)[0] >= MIN_SCORE, (role, score_series(info, role))
    for role in bad:
        assert score_series(info, role)[0] < MIN_SCORE, (role, score_series(info, role))


# ------------------------------------------------------------ refusals
def test_ambiguous_is_refused_and_overrides_choose(tmp_path):
    root = basic(tmp_path / "amb", extra=[(5, "t2_tse_tra", _tags(["SE"], 101, 6000))])
    study = scan_study(root)
    with pytest.raises(DataError) as err:
        identify(study)
    msg = str(err.value)
    assert str(root) in msg and "t2: ambiguous" in msg and "series 3 't2_tse_tra'" in msg
    assert "series 5 't2_tse_tra'" in msg and "--series t2=" in msg
    by_number = identify(study, {"t2": "5"})
    assert by_number.choices["t2"].series.series_number == 5 and by_number.choices["t2"].overridden
    assert by_number.choices["t2"].reasons[0].startswith("chosen by --series t2=5")
    uid = next(s.series_uid for s in study.series if s.series_number == 3)
    by_uid = identify(study, {"t2": uid})
    assert by_uid.choices["t2"].series.series_number == 3
    assert by_uid.to_dict()["roles"]["t2"]["overridden"] is True
    with pytest.raises(DataError, match=r"t1ce=42: no series .*t2_tse_tra.*--series t1ce=") as err:
        identify(study, {"t1ce": "42", "t2": "3"})
    assert "t1_se_tra_KM" in str(err.value)


def test_missing_t1ce_has_its_own_message(tmp_path):
    study = scan_study(basic(tmp_path / "nocontrast", with_t1ce=False))
    with pytest.raises(DataError) as err:
        identify(study)
    msg = str(err.value)
    assert "no post-contrast T1 series" in msg and "series 2 't1_se_tra'" in msg and "--series t1ce=" in msg
    assert "t1:" not in msg and "t2:" not in msg          # the other roles are fine
    ident = identify(study, missing_ok={"t1ce"})
    assert ident.missing == ["t1ce"] and set(ident.choices) == {"t1", "t2", "flair"}


def test_missing_flair_allowed_or_refused(tmp_path):
    study = scan_study(basic(tmp_path / "noflair", with_flair=False))
    with pytest.raises(DataError, match="flair: no FLAIR series"):
        identify(study)
    ident = identify(study, missing_ok=("flair",))
    assert ident.missing == ["flair"] and "flair" not in ident.choices
    assert ident.to_dict()["missing"] == ["flair"] and "missing (allowed)" in ident.describe()
    assert identify(study, required=("t1", "t2")).choices.keys() == {"t1", "t2"}


def test_acquisition_order_is_the_last_resort(tmp_path):
    # Two 3D T1s, no contrast agent, no keyword: the later one is taken as post-contrast, and said so.
    root = tmp_path / "order"
    w = Writer(root, "SIEMENS")
    w.series(2, "T1 3D", MPRAGE, **ISO)
    w.series(3, "t2_tse_tra", _tags(["SE"], 101, 6000))
    w.series(4, "t2_tirm_tra_dark-fluid", _tags(["SE", "IR"], 81, 9000, 2500))
    w.series(9, "T1 3D", MPRAGE, **ISO)
    ident = identify(scan_study(root))
    assert _numbers(ident)["t1ce"] == 9 and _numbers(ident)["t1"] == 2
    assert any("last resort" in r and "acquired after series 2" in r for r in ident.choices["t1ce"].reasons)
    assert any("last resort" in r for r in ident.choices["t1"].reasons)
    assert ident.warnings and "acquisition order" in ident.warnings[0]


def test_two_patients_or_studies_in_one_folder(tmp_path):
    root = basic(tmp_path / "two")
    Writer(root / "other", "SIEMENS", patient="P2").series(11, "t2_tse_tra", _tags(["SE"], 101, 6000))
    with pytest.raises(DataError) as err:
        scan_study(root)
    msg = str(err.value)
    assert str(root) in msg and "2 patients" in msg and "PatientID 'P2': series 11 't2_tse_tra'" in msg
    assert "folder of its own" in msg or "folder of their own" in msg
    root2 = basic(tmp_path / "two_studies")
    Writer(root2 / "later", "SIEMENS").series(12, "t2_tse_tra", _tags(["SE"], 101, 6000))
    with pytest.raises(DataError, match="2 studies.*StudyInstanceUID"):
        scan_study(root2)


def _enhanced(path: Path, w: Writer, number: int, description: str) -> None:
    """One Enhanced MR file (16 frames) with its timing in the shared functional groups."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4.1"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = w.uids["StudyInstanceUID"], generate_uid()
    ds.PatientID, ds.Modality, ds.Manufacturer = w.patient, "MR", "SIEMENS"
    ds.SeriesNumber, ds.SeriesDescription, ds.ProtocolName = number, description, description
    ds.ImageType, ds.MRAcquisitionType, ds.ContrastBolusAgent = ["ORIGINAL", "PRIMARY", "M", "NONE"], "3D", "Gd"
    ds.NumberOfFrames, ds.Rows, ds.Columns = 16, 8, 8
    shared = Dataset()
    timing, echo, orient, measures, modifier = Dataset(), Dataset(), Dataset(), Dataset(), Dataset()
    timing.RepetitionTime, echo.EffectiveEchoTime, modifier.InversionTimes = 2300, 2.98, [900]
    orient.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    measures.PixelSpacing, measures.SliceThickness = [1, 1], 1
    shared.MRTimingAndRelatedParametersSequence, shared.MREchoSequence = [timing], [echo]
    shared.PlaneOrientationSequence, shared.PixelMeasuresSequence = [orient], [measures]
    shared.MRModifierSequence = [modifier]
    ds.SharedFunctionalGroupsSequence = [shared]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.PixelData = np.zeros(8 * 8 * 16, np.int16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def test_enhanced_mr_is_listed_unusable_and_named(tmp_path):
    root = basic(tmp_path / "enh", with_t1ce=False)
    w = Writer(root, "SIEMENS")
    w.uids["StudyInstanceUID"] = pydicom.dcmread(next(root.rglob("*.dcm"))).StudyInstanceUID
    _enhanced(root / "enhanced" / "MR000001", w, 12, "t1_mprage_sag_p2_KM")
    study = scan_study(root)
    enh = next(s for s in study.series if s.series_number == 12)
    assert "Enhanced MR Image Storage" in enh.unusable and "dcm2niix" in enh.unusable
    assert enh.n_slices == 16 and enh.repetition_time == 2300 and enh.inversion_time == 900
    assert enh.orientation == "sagittal"
    with pytest.raises(DataError) as err:
        identify(study)
    msg = str(err.value)
    assert "t1ce: the best post-contrast T1 candidate, series 12 't1_mprage_sag_p2_KM'" in msg
    assert "cannot be used" in msg and "dcm2niix" in msg and "single-frame" in msg
    with pytest.raises(DataError, match="cannot be used"):
        identify(study, {"t1ce": "12"})
    with pytest.raises(DataError, match="cannot be read as one volume"):
        load_series(enh)


def test_non_mr_series_are_skipped_with_a_warning(tmp_path):
    root = basic(tmp_path / "nonmr")
    w = Writer(root, "SIEMENS")
    w.uids["StudyInstanceUID"] = pydicom.dcmread(next(root.rglob("*.dcm"))).StudyInstanceUID
    w.series(99, "Head CT", {"Modality": "CT", "SOPClassUID": CTImageStorage})
    _sr(root / "sr" / "report", w)
    study = scan_study(root)
    assert sorted(s.modality for s in study.skipped) == ["CT", "SR"]
    assert all(s.modality == "MR" for s in study.series)
    assert any("series 99 'Head CT': CT" in w and "skipped" in w for w in study.warnings)
    assert _numbers(identify(study)) == {"t1": 2, "t1ce": 7, "t2": 3, "flair": 4}
    with pytest.raises(DataError, match="CT series .*skipped"):
        identify(study, {"t2": "99"})
    # Nothing but non-MR objects: refused.
    only = tmp_path / "only_ct"
    wc = Writer(only, "GE")
    wc.series(1, "Head CT", {"Modality": "CT", "SOPClassUID": CTImageStorage})
    _sr(only / "report.dcm", wc)
    with pytest.raises(DataError, match=r"no MR image series; found series 1 'Head CT' \(CT\), series 999 \(SR\)"):
        scan_study(only)


def _sr(path: Path, w: Writer) -> None:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = BasicTextSRStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID, ds.StudyInstanceUID = generate_uid(), w.uids["StudyInstanceUID"]
    ds.Modality, ds.PatientID, ds.SeriesNumber = "SR", w.patient, 999
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def test_localizer_only_study(tmp_path):
    root = tmp_path / "loc"
    Writer(root, "SIEMENS").localizer(1, "localizer")
    study = scan_study(root)
    assert len(study.series) == 1 and study.series[0].orientation == "mixed"
    with pytest.raises(DataError) as err:
        identify(study)
    msg = str(err.value)
    for what in ("no pre-contrast T1 series", "no post-contrast T1 series", "no T2 series", "no FLAIR series"):
        assert what in msg
    assert "series 1 'localizer' (score -" in msg


def test_rule_table_is_data(studies):
    assert len(RULES) > 30 and all(isinstance(r, Rule) for r in RULES)
    for r in RULES:
        assert r.roles and set(r.roles) <= {"t1", "t1ce", "t2", "flair"} and r.score != 0
        assert r.name and r.evidence and r.reason
    assert {r.name for r in RULES if r.score <= -300} >= {"localizer", "diffusion", "subtraction"}
    # Every contribution is a reason, and the reasons add up to the score.
    study = scan_study(studies["siemens"])
    for s in study.series:
        for role in ("t1", "t1ce", "t2", "flair"):
            score, reasons = score_series(s, role)
            assert score == sum(int(r.split()[0]) for r in reasons)
    assert parse_overrides(["t1c=7", "case2:flair=1.2.3"]) == {"": {"t1ce": "7"}, "case2": {"flair": "1.2.3"}}


# ------------------------------------------------------------------- CLI
def test_cli_study_table_json_and_exit_status(studies, tmp_path, capsys):
    assert main(["study", str(studies["siemens"])]) == 0
    out = capsys.readouterr().out
    assert "study siemens" in out and "t1_mprage_sag_p2_KM" in out and "t1ce (" in out
    assert "runner-up" in out and "UNUSABLE" in out and "1 study: 1 identified, 0 failed" in out
    # A root of studies (different StudyInstanceUIDs): each subfolder is one; one fails → exit 2.
    root = tmp_path / "root"
    shutil.copytree(studies["ge"], root / "ge")
    basic(root / "amb", extra=[(5, "t2_tse_tra", _tags(["SE"], 101, 6000))])
    assert find_studies(root) == [root / "amb", root / "ge"]
    assert [f for f, _ in scan_root(root / "ge")] == [root / "ge"]          # one study, nested
    assert main(["study", str(root)]) == 2
    out = capsys.readouterr().out
    assert "study amb" in out and "study ge" in out and "t2: ambiguous" in out and "1 failed" in out
    assert main(["study", str(root), "--series", "amb:t2=5", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and [s["case_id"] for s in report["studies"]] == ["amb", "ge"]
    amb = report["studies"][0]["identification"]["roles"]
    assert amb["t2"]["series_number"] == 5 and amb["t2"]["overridden"]
    assert main(["study", str(root), "--series", "t2"]) == 2
    assert "expected ROLE=ID" in capsys.readouterr().err
    assert main(["study", str(tmp_path / "nowhere")]) == 2
    assert "not found" in capsys.readouterr().err


def test_study_command_imports_neither_torch_nor_monai(studies):
    code = ("import sys; from medseg.cli import main; rc = main(['study', sys.argv[1], '--json']); "
            "bad = [m for m in ('torch', 'monai') if m in sys.modules]; "
            "print('IMPORTED', bad, file=sys.stderr); sys.exit(3 if bad else rc)")
    proc = subprocess.run([sys.executable, "-c", code, str(studies["philips"])], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "IMPORTED []" in proc.stderr
    assert json.loads(proc.stdout)["studies"][0]["identification"]["roles"]["t1ce"]["series_number"] == 601
