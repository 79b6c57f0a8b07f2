"""Synthetic raw scanner studies (`medseg.data.synth_raw`): what lands in the studies
folder, the geometry of every true series against its truth, the head around the
brain, the vendors' tags, and the truth API."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from scipy import ndimage as ndi

from medseg.data.dicom import read_series
from medseg.data.discover import discover
from medseg.data.synth_raw import (ROLES, STUDY_LAYOUTS, VENDORS, canonical_points_on_brain_surface, load_truth,
                                   synthesize_raw, transform_points)
from medseg.errors import MedsegError

N = 3


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    out = tmp_path_factory.mktemp("raw") / "data"
    seen = []
    studies = synthesize_raw(out, N, seed=0, scale="small", formats=("dicom", "nifti"),
                             progress=lambda i, n, sid: seen.append((i, n, sid)))
    assert seen == [(i + 1, N, s["study_id"]) for i, s in enumerate(studies)]
    return out, studies


def _series_dir(rec: dict, tmp: Path) -> Path:
    """The series' files linked into a folder of their own (the layout may mix them)."""
    tmp.mkdir(parents=True)
    for i, f in enumerate(rec["dicom_files"]):
        (tmp / f"{i:05d}.dcm").symlink_to(f)
    return tmp


def _headers(study: dict) -> list[pydicom.Dataset]:
    files = [p for p in Path(study["study_dir"]).rglob("*") if p.is_file()]
    return [pydicom.dcmread(p, stop_before_pixels=True) for p in files]


def test_studies_folder_holds_only_dicom(raw):
    out, studies = raw
    assert sorted(p.name for p in out.iterdir()) == ["studies", "studies_nifti", "truth"]
    assert sorted(p.name for p in (out / "studies").iterdir()) == [s["study_id"] for s in studies]
    for s in studies:
        files = [p for p in Path(s["study_dir"]).rglob("*") if p.is_file()]
        assert files and not any(p.name.startswith(".") for p in Path(s["study_dir"]).rglob("*"))
        for p in files:
            assert p.read_bytes()[128:132] == b"DICM", p
        nifti = sorted(Path(s["nifti_dir"]).iterdir())
        assert {p.name.split(".", 1)[1] for p in nifti} <= {"nii.gz", "json", "bval", "bvec"}
        stems = {p.name[: -len(".nii.gz")] for p in nifti if p.name.endswith(".nii.gz")}
        assert stems == {p.stem for p in nifti if p.suffix == ".json"}
        # every file of the study belongs to exactly one series of the truth
        listed = [f for r in [*s["roles"].values(), *s["distractors"]] for f in r["dicom_files"]]
        assert sorted(listed) == sorted(str(p) for p in files)


def test_layouts_and_vendors_cycle(raw):
    _, studies = raw
    assert {s["layout"] for s in studies} == set(STUDY_LAYOUTS)
    assert {s["vendor"] for s in studies} == set(VENDORS)
    for s in studies:
        root = Path(s["study_dir"])
        files = [p.relative_to(root) for p in root.rglob("*") if p.is_file()]
        if s["layout"] == "flat":
            assert all(len(p.parts) == 1 for p in files)
            assert len({p.name for p in files}) == len(files)
        elif s["layout"] == "nested":
            assert all(p.parts[:3] == ("DICOM", "PA000000", "ST000000") and p.parts[3].startswith("SE")
                       and p.name.startswith("IM") for p in files)
        else:
            assert all(len(p.parts) == 2 for p in files)
            for rec in [*s["roles"].values(), *s["distractors"]]:
                assert len({Path(f).parent for f in rec["files"]}) == 1


def test_deterministic_for_a_seed(raw, tmp_path):
    out, studies = raw
    again = synthesize_raw(tmp_path / "again", 1, seed=0, scale="small")[0]
    first = studies[0]
    def recorded(study):     # the truth as written, less the NIfTI variant (not asked for again)
        t = json.loads((Path(study["truth_dir"]) / "truth.json").read_text())
        return [{k: v for k, v in r.items() if k != "nifti"} for r in [*t["roles"].values(), *t["distractors"]]]
    assert recorded(again) == recorded(first)
    for role in ROLES:
        for a, b in zip(first["roles"][role]["dicom_files"][::3], again["roles"][role]["dicom_files"][::3]):
            da, db = pydicom.dcmread(a), pydicom.dcmread(b)
            assert np.array_equal(da.pixel_array, db.pixel_array)
            assert da.ImagePositionPatient == db.ImagePositionPatient and da.SeriesInstanceUID == db.SeriesInstanceUID
        for name in ("labels", "brain"):
            x = np.asarray(nib.load(first["roles"][role][f"{name}_path"]).dataobj)
            y = np.asarray(nib.load(again["roles"][role][f"{name}_path"]).dataobj)
            assert np.array_equal(x, y)
    with pytest.raises(MedsegError, match="not empty"):
        synthesize_raw(tmp_path / "again", 1, seed=0, scale="small")


def test_true_series_read_back_on_the_truth_grid(raw, tmp_path):
    _, studies = raw
    for s in studies:
        for role, rec in s["roles"].items():
            series = read_series(_series_dir(rec, tmp_path / s["study_id"] / role))
            assert series.uid == rec["series_uid"]
            assert series.shape == tuple(rec["shape"])
            assert np.allclose(series.affine, rec["affine"], atol=1e-3)
            for name in ("labels", "brain"):
                img = nib.load(rec[f"{name}_path"])
                assert img.shape == tuple(rec["shape"]) and np.allclose(img.affine, rec["affine"], atol=1e-3)
            (nii,) = rec["nifti_files"]
            img = nib.load(nii)
            assert img.shape == tuple(rec["shape"]) and np.allclose(img.affine, rec["affine"], atol=1e-3)
            if role == "t2":    # same voxels as the DICOM series (Philips: through the rescale slope)
                assert np.allclose(np.asarray(img.dataobj), series.volume(), atol=1e-3)
            side = json.loads(Path(nii.replace(".nii.gz", ".json")).read_text())
            assert side["SeriesInstanceUID"] == rec["series_uid"] and side["SeriesNumber"] == rec["series_number"]
            assert side["SeriesDescription"] == rec["series_description"] and isinstance(side["ImageType"], list)
            assert 0 < side["EchoTime"] < 1 and 0 < side["RepetitionTime"] < 20     # seconds
            header = pydicom.dcmread(rec["dicom_files"][0], stop_before_pixels=True)
            assert ("InversionTime" in side) == ("InversionTime" in header)
            if "InversionTime" in side:
                assert side["InversionTime"] == pytest.approx(float(header.InversionTime) / 1000)


def test_truth_geometry_follows_the_poses(raw):
    _, studies = raw
    for s in studies:
        ph = s["phantom"]
        for role, rec in s["roles"].items():
            lab = np.asarray(nib.load(rec["labels_path"]).dataobj)
            brain = np.asarray(nib.load(rec["brain_path"]).dataobj) > 0
            assert set(np.unique(lab)) <= {0, 1, 2, 3} and (lab[~brain] == 0).all()
            # tumour centroid: world position = pose @ canonical centroid, within 2 voxels per axis
            world = transform_points(rec["affine"], np.argwhere(lab > 0).mean(0)[None])[0]
            expect = transform_points(rec["world_from_canonical"], np.array([ph["tumour_centroid_mm"]]))[0]
            in_voxels = np.linalg.solve(rec["affine"][:3, :3], world - expect)
            assert np.abs(in_voxels).max() < 2.0, (s["study_id"], role, in_voxels)
            # brain volume on the native grid (thick slices too) ≈ the phantom's
            ml = brain.sum() * np.prod(np.linalg.norm(rec["affine"][:3, :3], axis=0)) / 1000
            assert abs(ml / ph["brain_volume_ml"] - 1) < 0.05, (s["study_id"], role, ml)
        # the series moved between acquisitions: poses differ
        poses = [r["world_from_canonical"] for r in s["roles"].values()]
        assert not np.allclose(poses[0], poses[2])


def test_head_has_a_skull_around_the_brain(raw, tmp_path):
    """Along rays out of the brain on the T1 (in its slice plane when axial, else in
    the head's own axial plane): first a dark shell (CSF, bone), then bright
    subcutaneous fat."""
    _, studies = raw
    for s in studies:
        rec = s["roles"]["t1"]
        vol = read_series(_series_dir(rec, tmp_path / s["study_id"])).volume()
        brain = np.asarray(nib.load(rec["brain_path"]).dataobj) > 0
        ref = np.median(vol[brain])
        a, rot = rec["affine"], rec["world_from_canonical"][:3, :3]
        centre = transform_points(a, np.argwhere(brain).mean(0)[None])[0]
        u, v = rot[:, 0], rot[:, 1]
        if rec["plane"] == "tra":
            u, v = (a[:3, i] / np.linalg.norm(a[:3, i]) for i in (0, 1))
        good = 0
        for ang in np.radians(np.arange(0, 360, 45)):
            t = np.arange(0, 140, 0.5)
            ray = centre + t[:, None] * (np.cos(ang) * u + np.sin(ang) * v)
            idx = transform_points(np.linalg.inv(a), ray).T
            inside = ndi.map_coordinates(brain.astype(np.uint8), idx, order=0) > 0
            val = ndi.map_coordinates(vol, idx, order=1) / ref
            edge = t[np.flatnonzero(inside).max()]
            shell, fat = (t > edge) & (t <= edge + 10), (t > edge + 3) & (t <= edge + 30)
            dark, bright = val[shell].min(), val[fat].max()
            # (the bias field may dim the scalp against the brain by up to ~30 %)
            good += dark < 0.5 and bright > max(0.8, 2.5 * dark) and \
                t[fat][val[fat].argmax()] > t[shell][val[shell].argmin()]
        assert good >= 6, (s["study_id"], good)


def test_vendor_tags(raw):
    _, studies = raw
    expected = {"siemens": ("SIEMENS", (("t1_mprage",), ("t2_tse",), ("t2_tirm", "t2_space", "t2_spc"),
                                        ("ep2d_diff",))),
                "ge": ("GE MEDICAL SYSTEMS", (("BRAVO",), ("Ax T2", "AX T2"), ("FLAIR",), ("DWI",), ("Loc", "LOC"))),
                "philips": ("Philips", (("T1W_",), ("T2W_TSE",), ("FLAIR",), ("DWI", "Diffusion"),
                                        ("Survey", "SmartBrain")))}
    for s in studies:
        heads = _headers(s)
        maker, words = expected[s["vendor"]]
        assert all(h.Manufacturer.startswith(maker) for h in heads)
        assert len({h.StudyInstanceUID for h in heads}) == 1 and len({h.FrameOfReferenceUID for h in heads}) == 1
        assert len({h.PatientID for h in heads}) == 1
        descriptions = {str(h.SeriesDescription) for h in heads}
        assert all(any(w in d for w in alternatives for d in descriptions) for alternatives in words), descriptions
        roles = s["roles"]
        assert all(roles["t1ce"]["series_number"] > roles[r]["series_number"] for r in ("t1", "t2", "flair"))
        by_uid = {}
        for h in heads:
            by_uid.setdefault(h.SeriesInstanceUID, []).append(h)
        for role, rec in roles.items():
            h = by_uid[rec["series_uid"]][0]
            assert h.SeriesDescription == rec["series_description"] and h.SeriesNumber == rec["series_number"]
            assert h.MRAcquisitionType == rec["acquisition"] and h.ImageType[0] == "ORIGINAL"
            assert float(h.EchoTime) > 0 and float(h.RepetitionTime) > 0 and h.ScanningSequence
            if role == "flair":
                assert 1500 < float(h.InversionTime) < 3000
            if role == "t2":
                assert "InversionTime" not in h and float(h.EchoTime) > 60
            assert ("ContrastBolusAgent" in h) == (role == "t1ce" and s["contrast_agent_tag"])
        kinds = {d["kind"] for d in s["distractors"]}
        assert {"localizer", "dwi", "adc"} <= kinds
        for d in s["distractors"]:
            if d["kind"] == "localizer":
                assert len(d["files"]) < 10
            if d["kind"] in ("adc", "subtraction", "mpr"):
                assert by_uid[d["series_uid"]][0].ImageType[0] == "DERIVED"
            if d["kind"] == "dwi":
                assert "TRACEW" in {v for h in by_uid[d["series_uid"]] for v in h.ImageType}
        numbers = [h.SeriesNumber for h in heads]
        times = {h.SeriesNumber: str(h.SeriesTime) for h in heads}
        assert len(times) == len({h.SeriesInstanceUID for h in heads}) and numbers
        assert times[roles["t1ce"]["series_number"]] > max(times[roles[r]["series_number"]] for r in ("t2", "flair"))


def test_truth_api_and_atlas_case(raw, tmp_path):
    out, studies = raw
    s = studies[1]
    truth = load_truth(out, s["study_id"])
    assert set(truth["roles"]) == set(ROLES) and truth["roles"]["t1"]["affine"].shape == (4, 4)
    atlas = discover(Path(truth["atlas_dir"]).parent)
    assert [c.case_id for c in atlas.cases] == [s["study_id"]]
    seg = nib.load(Path(truth["atlas_dir"]) / f"{s['study_id']}-seg.nii.gz")
    assert seg.shape == tuple(truth["phantom"]["shape"])
    # surface points map onto the brain boundary of every native grid
    pts = canonical_points_on_brain_surface(out, s["study_id"], n=300, seed=1)
    assert pts.shape == (300, 3)
    for role, rec in truth["roles"].items():
        brain = np.asarray(nib.load(rec["brain_path"]).dataobj) > 0
        idx = transform_points(np.linalg.inv(rec["affine"]) @ rec["world_from_canonical"], pts)
        sp = np.linalg.norm(rec["affine"][:3, :3], axis=0)
        reach = np.ceil(3.0 / sp).astype(int)     # 3 mm (at least one voxel) around each point
        lo = np.clip(np.rint(idx).astype(int) - reach, 0, np.array(brain.shape) - 1)
        hi = np.clip(np.rint(idx).astype(int) + reach + 1, 1, np.array(brain.shape))
        mixed = [brain[a[0]:b[0], a[1]:b[1], a[2]:b[2]].any() and not brain[a[0]:b[0], a[1]:b[1], a[2]:b[2]].all()
                 for a, b in zip(lo, hi)]
        assert np.mean(mixed) > 0.9, (role, np.mean(mixed))
    with pytest.raises(MedsegError, match="no truth"):
        load_truth(out, "RAW-99999")
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_fast_series_writer_writes_what_write_series_writes(tmp_path):
    """The generator's fast path repeats write_series' per-slice changes: every
    element but the SOP instance UID is the same, and the series reads back alike."""
    from medseg.data.dicom import write_series
    from medseg.data.synth_raw import _rotation, _write_series_fast
    affine = np.eye(4)
    affine[:3, :3] = _rotation([10, -5, 3]) @ np.diag([0.449, 0.449, 5.5])
    affine[:3, 3] = [-100.123456789, 93.3333333, -60.5]
    stored = np.random.default_rng(0).integers(0, 1000, (30, 20, 7)).astype(np.int16)
    uids = {"StudyInstanceUID": "1.2.3", "FrameOfReferenceUID": "1.2.4"}
    tags = {"EchoTime": 2.5, "ImageType": ["ORIGINAL", "PRIMARY", "M", "ND"], "SeriesNumber": 5,
            "SeriesInstanceUID": "1.2.3.4", "DiffusionBValue": 1000.0}
    slow = write_series(nib.Nifti1Image(stored * 0.578125, affine), tmp_path / "slow", "d", uids, (0.578125, 0.0),
                        "P1", tags=tags)
    fast = _write_series_fast(stored, affine, tmp_path / "fast", "d", uids, 0.578125, "P1", tags, start=3)
    assert [p.name for p in fast] == [p.name for p in slow]
    for k, (a, b) in enumerate(zip(slow, fast)):
        da, db = pydicom.dcmread(a), pydicom.dcmread(b)
        assert len(da) == len(db) and len(da.file_meta) == len(db.file_meta)
        for el in da:
            if el.keyword not in ("SOPInstanceUID", "InstanceNumber"):
                assert db[el.tag].value == el.value, el.keyword
        assert db.InstanceNumber == k + 3 and db.file_meta.MediaStorageSOPInstanceUID == db.SOPInstanceUID
    ra, rb = read_series(tmp_path / "slow"), read_series(tmp_path / "fast")
    assert np.array_equal(ra.affine, rb.affine) and np.array_equal(ra.volume(), rb.volume())
