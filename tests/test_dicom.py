"""DICOM in and out of `medseg predict`: series read onto the right grid in every
orientation (oblique and thick-slice too), DICOM Segmentations that read back with
highdicom as exactly the NIfTI mask on both engines, the input layouts, and bad
DICOM input named before anything is written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import BasicTextSRStorage, ExplicitVRLittleEndian, generate_uid

from medseg.cli import main
from medseg.data.dicom import dicom_cases, read_series, seg_segments, write_seg, write_series
from medseg.data.discover import discover
from medseg.errors import DataError
from medseg.labels import CHANNELS, get_convention

from conftest import tiny_cv_run, tree_fingerprint

_RAS = nib.orientations.axcodes2ornt(("R", "A", "S"))


def _rotation(deg_z: float, deg_x: float) -> np.ndarray:
    a, b = np.radians(deg_z), np.radians(deg_x)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return rz @ rx


def _stored(img: nib.Nifti1Image, geometry: str) -> nib.Nifti1Image:
    """The same voxels stored as `geometry`: axis codes (``"PIR"``), ``"LPS-thick"``
    (every other slice of LPS: 12 mm) or ``"oblique"`` (the grid rotated 20° about
    z and 10° about x around its centre: the anatomy turns with it)."""
    if geometry == "oblique":
        centre = img.affine @ [*(np.array(img.shape[:3]) - 1) / 2, 1]
        rot = np.eye(4)
        rot[:3, :3] = _rotation(20, 10)
        rot[:3, 3] = centre[:3] - rot[:3, :3] @ centre[:3]
        return nib.Nifti1Image(np.asarray(img.dataobj), rot @ img.affine)
    codes = geometry.split("-")[0]
    out = img.as_reoriented(nib.orientations.ornt_transform(nib.io_orientation(img.affine),
                                                            nib.orientations.axcodes2ornt(tuple(codes))))
    return out.slicer[:, :, ::2] if geometry.endswith("thick") else out


def _to_ras(img: nib.Nifti1Image) -> nib.Nifti1Image:
    return img.as_reoriented(nib.orientations.ornt_transform(nib.io_orientation(img.affine), _RAS))


def _dicom_case(case, dst: Path, geometry: str, patient: str = "P1", names=("t1", "t1ce", "t2", "flair"),
                shuffle: bool = True) -> Path:
    """A case's four NIfTI files → four DICOM series folders under `dst` (one study,
    one frame of reference); file names shuffled so that only positions order them."""
    uids = {"StudyInstanceUID": generate_uid(), "FrameOfReferenceUID": generate_uid()}
    rng = np.random.default_rng(0)
    for name, f in zip(names, case.images):
        files = write_series(_stored(nib.load(f), geometry), dst / name, name.upper(), uids, patient_id=patient)
        if shuffle:
            for p, k in zip(files, rng.permutation(len(files))):
                p.rename(p.with_name(f"x{k:04d}.tmp"))
            for p in (dst / name).glob("*.tmp"):
                p.rename(p.with_suffix(".dcm"))
    return dst


GEOMETRIES = ["RAS", "LPS", "PIR", "ASL", "RSA", "LPS-thick", "oblique"]


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_series_read_onto_the_nifti_grid(dataset, tmp_path, geometry):
    # Same voxels at the same place as the NIfTI the series were written from,
    # whatever the storage order (ASL comes back ASR: slices are sorted along the
    # normal), slice thickness or obliquity.
    case = discover(dataset("brats2023", 1)).cases[0]
    root = _dicom_case(case, tmp_path / "dcm" / "c1", geometry)
    (got,), where = dicom_cases(root)
    assert where == root and got.case_id == "c1" and got.channels == list(CHANNELS)
    assert got.images == [root / n for n in ("t1", "t1ce", "t2", "flair")]
    (tmp_path / "nii").mkdir()
    for path, src in zip(got.dicom.to_nifti(tmp_path / "nii"), case.images):
        a, b = _to_ras(nib.load(path)), _to_ras(_stored(nib.load(src), geometry))
        np.testing.assert_array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
        np.testing.assert_allclose(a.affine, b.affine, atol=1e-5)
        assert int(nib.load(path).header["sform_code"]) == int(nib.load(path).header["qform_code"]) == 1


def test_rescale_slope_and_intercept_are_applied(tmp_path):
    values = np.arange(4 * 5 * 3, dtype=np.float64).reshape(4, 5, 3) * 2.5 - 100
    img = nib.Nifti1Image(values, np.diag([0.9, 0.9, 3.0, 1.0]))
    write_series(img, tmp_path / "t1", rescale=(2.5, -100.0))
    s = read_series(tmp_path / "t1")
    assert s.shape == (4, 5, 3)
    np.testing.assert_array_equal(s.volume(), values.astype(np.float32))


def _seg_on_grid(seg_path: Path, ref: nib.Nifti1Image, convention: str) -> np.ndarray:
    """The Segmentation's frames placed by their own DICOM geometry (highdicom's
    `get_volume`, LPS) onto the grid of `ref` (RAS), as label values of
    `convention`; every placed voxel must land on a voxel centre of `ref`."""
    seg = hd.seg.segread(seg_path)
    vol = seg.get_volume(combine_segments=True)
    to_ref = np.linalg.inv(np.diag([-1.0, -1, 1, 1]) @ ref.affine) @ vol.affine    # seg index → ref index
    assert np.allclose(to_ref, np.round(to_ref), atol=1e-4), to_ref
    idx = np.indices(vol.spatial_shape).reshape(3, -1)
    dst = np.round(to_ref[:3, :3] @ idx + to_ref[:3, 3:]).astype(int)
    assert (dst >= 0).all() and (dst < np.array(ref.shape[:3])[:, None]).all()
    values = np.zeros(len(seg_segments(convention)) + 1, np.uint8)
    for number, (value, _, _) in enumerate(seg_segments(convention), 1):
        values[number] = value
    out = np.zeros(ref.shape[:3], np.uint8)
    out[tuple(dst)] = values[np.asarray(vol.array).reshape(-1)]
    return out


#: Segments 1, 2, 3 (necrosis, edema, enhancing tumour) by each convention's names and values.
SEGMENT_LABELS = {"brats2023": ["NETC (label 1)", "SNFH (label 2)", "ET (label 3)"],
                  "brats2021": ["NCR/NET (label 1)", "ED (label 2)", "ET (label 4)"],
                  "msd": ["non-enhancing tumour (label 2)", "edema (label 1)", "enhancing tumour (label 3)"]}


@pytest.mark.parametrize("convention", ["brats2023", "brats2021", "msd"])
def test_segmentation_round_trip_and_coding(dataset, tmp_path, convention):
    # A known label map (the synthetic truth, in each convention) written as a
    # Segmentation on an oblique PIR-like grid reads back exactly, by source
    # instance and by geometry, with the coded segments and the algorithm.
    case = discover(dataset("brats2023")).cases[-1]          # the one with all three labels
    root = _dicom_case(case, tmp_path / "dcm" / "c1", "oblique")
    (got,), _ = dicom_cases(root)
    truth = np.asarray(nib.load(case.label).dataobj).astype(np.uint8)     # brats2023 labels
    relabel = {"brats2023": [0, 1, 2, 3], "brats2021": [0, 1, 2, 4], "msd": [0, 2, 1, 3]}[convention]
    labels = np.asarray(relabel, np.uint8)[truth]
    assert set(np.unique(labels)) == {0, *relabel[1:]}
    seg_path = write_seg(labels, got.dicom, convention, tmp_path / "out" / "c1_seg.dcm", "unet3d, 1 checkpoint(s)",
                         "torch")
    ref = got.dicom.reference
    assert ref.folder.name == "t1ce"
    (tmp_path / "nii").mkdir()
    nifti = nib.load(got.dicom.to_nifti(tmp_path / "nii")[1])
    np.testing.assert_array_equal(_seg_on_grid(seg_path, nifti, convention), labels)
    seg = hd.seg.segread(seg_path)
    by_instance = seg.get_pixels_by_source_instance([str(h.SOPInstanceUID) for h in ref.headers],
                                                    combine_segments=True, assert_missing_frames_are_empty=True)
    numbers = np.zeros(5, np.uint8)
    for number, (value, _, _) in enumerate(seg_segments(convention), 1):
        numbers[value] = number
    np.testing.assert_array_equal(by_instance, numbers[labels].transpose(2, 1, 0))
    # References the T1ce series, same patient and study; coded segments.
    assert seg.SegmentationType == "BINARY" and seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == ref.uid
    assert seg.PatientID == "P1" and seg.StudyInstanceUID == ref.headers[0].StudyInstanceUID
    assert seg.FrameOfReferenceUID == ref.headers[0].FrameOfReferenceUID
    coded = [(s.SegmentLabel, s.SegmentedPropertyTypeCodeSequence[0].CodeValue,
              s.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator,
              s.SegmentedPropertyCategoryCodeSequence[0].CodeValue) for s in seg.SegmentSequence]
    assert [c[1:] for c in coded] == [("6574001", "SCT", "49755003"), ("79654002", "SCT", "49755003"),
                                      ("C113842", "NCIt", "49755003")]
    assert [c[0] for c in coded] == SEGMENT_LABELS[convention]
    algo = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    from medseg import __version__
    assert algo.AlgorithmName == "medseg" and algo.AlgorithmVersion == __version__
    assert "unet3d" in algo.AlgorithmParameters and convention in algo.AlgorithmParameters
    assert seg.SoftwareVersions == __version__


def test_empty_mask_gives_a_valid_segmentation(dataset, tmp_path):
    case = discover(dataset("brats2023", 1)).cases[0]
    (got,), _ = dicom_cases(_dicom_case(case, tmp_path / "c1", "LPS"))
    path = write_seg(np.zeros(got.dicom.reference.shape, np.uint8), got.dicom, "brats2023", tmp_path / "s.dcm",
                     "m", "torch")
    seg = hd.seg.segread(path)
    px = seg.get_pixels_by_source_instance([str(h.SOPInstanceUID) for h in got.dicom.reference.headers],
                                           combine_segments=True)
    assert not px.any() and len(seg.SegmentSequence) == 3


# ------------------------------------------------------------ with a model
@pytest.fixture(scope="module")
def model(_pristine, tmp_path_factory):
    """One fold trained on the tiny brats2023 data (long enough to predict tumour),
    and its ONNX export → (checkpoint, onnx file, data root)."""
    base = tmp_path_factory.mktemp("dicom_model")
    run, root = tiny_cv_run(_pristine, base, 2, ["train.epochs=12", "train.iters_per_epoch=4",
                                                 "train.val_every=12"], only=[0])
    assert main(["export", "--model", str(run / "fold_0"), "--out", str(base / "m.onnx")]) == 0
    return run / "fold_0" / "checkpoints" / "final.pt", base / "m.onnx", root


@pytest.mark.parametrize("geometry, engine", [
    ("RAS", "torch"), ("LPS", "torch"), ("PIR", "torch"), ("ASL", "torch"), ("RSA", "torch"),
    ("LPS-thick", "torch"), ("oblique", "torch"), ("PIR", "onnx"),
])
def test_segmentation_reads_back_as_the_nifti_mask(model, tmp_path, geometry, engine):
    ckpt, onnx, root = model
    case = discover(root).cases[-1]
    dcm = _dicom_case(case, tmp_path / "dcm" / case.case_id, geometry)
    nii = tmp_path / "nii" / case.case_id
    nii.mkdir(parents=True)
    for f in case.images:
        nib.save(_stored(nib.load(f), geometry), nii / f.name)
    args = ["predict", "--engine", engine, "--model", str(onnx if engine == "onnx" else ckpt)]
    assert main([*args, "--input", str(dcm.parent), "--out", str(tmp_path / "out")]) == 0
    assert main([*args, "--input", str(nii.parent), "--out", str(tmp_path / "ref")]) == 0
    mask = nib.load(tmp_path / "out" / f"{case.case_id}.nii.gz")
    labels = np.asarray(mask.dataobj)
    assert labels.any(), "the tiny model predicts no tumour: the test would prove nothing"
    # The Segmentation, placed by its own geometry, is exactly the NIfTI mask ...
    seg_path = tmp_path / "out" / f"{case.case_id}_seg.dcm"
    np.testing.assert_array_equal(_seg_on_grid(seg_path, mask, "brats2023"), labels)
    # ... and the mask from the DICOM series is the mask from the same NIfTI files.
    ref = nib.load(tmp_path / "ref" / f"{case.case_id}.nii.gz")
    np.testing.assert_allclose(_to_ras(mask).affine, _to_ras(ref).affine, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(_to_ras(mask).dataobj), np.asarray(_to_ras(ref).dataobj))
    record = json.loads((tmp_path / "out" / "predictions.json").read_text())["cases"][case.case_id]
    assert record["dicom_seg"]["file"] == seg_path.name
    assert record["dicom_seg"]["references"] == str(dcm / "t1ce")


@pytest.mark.slow   # over 10 s on 2 cores: `make test-slow`
def test_layouts_names_and_resume(model, tmp_path, capsys):
    ckpt, _, root = model
    cases = discover(root).cases[:2]
    data = tmp_path / "dcm"
    for c in cases:
        _dicom_case(c, data / c.case_id, "LPS", names=("T1n", "t1c", "T2W", "t2f"), shuffle=False)
    before = tree_fingerprint(data)
    args = ["predict", "--model", str(ckpt), "--input", str(data), "--out", str(tmp_path / "o")]
    assert main(args) == 0
    said = capsys.readouterr().out
    assert "labels: brats2023 (from the model's training data" in said
    for c in cases:
        assert (tmp_path / "o" / f"{c.case_id}_seg.dcm").is_file()
    # A rerun continues; a missing Segmentation makes its case predicted again.
    (tmp_path / "o" / f"{cases[1].case_id}_seg.dcm").unlink()
    assert main(args) == 0
    assert "1 of 2 cases already predicted" in capsys.readouterr().out
    assert (tmp_path / "o" / f"{cases[1].case_id}_seg.dcm").is_file()
    # One case folder as --input; loose series folders, case id from their folder or --case-id.
    one = data / cases[0].case_id
    assert main(["predict", "--model", str(ckpt), "--input", str(one), "--out", str(tmp_path / "p")]) == 0
    loose = ["--t1", str(one / "T1n"), "--t1ce", str(one / "t1c"), "--t2", str(one / "T2W"),
             "--flair", str(one / "t2f")]
    assert main(["predict", "--model", str(ckpt), *loose, "--out", str(tmp_path / "q")]) == 0
    assert main(["predict", "--model", str(ckpt), *loose, "--case-id", "x", "--out", str(tmp_path / "r")]) == 0
    a = np.asarray(nib.load(tmp_path / "o" / f"{cases[0].case_id}.nii.gz").dataobj)
    for out, name in (("p", cases[0].case_id), ("q", cases[0].case_id), ("r", "x")):
        np.testing.assert_array_equal(np.asarray(nib.load(tmp_path / out / f"{name}.nii.gz").dataobj), a)
        assert (tmp_path / out / f"{name}_seg.dcm").is_file()
    assert tree_fingerprint(data) == before                 # inputs never modified
    assert main(["predict", "--model", str(ckpt), "--input", str(data), "--out", str(one / "t1c" / "m")]) == 2
    assert "inside the input folder" in capsys.readouterr().err


# ------------------------------------------------------------- bad input
def _sr(path: Path) -> None:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = BasicTextSRStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.Modality, ds.PatientID = "SR", "P1"
    ds.save_as(path, enforce_file_format=True)


def _break(case_dir: Path, how: str, other: Path | None) -> tuple[Path, str]:
    """Damage one series of `case_dir` → (the folder the error must name, a word it must say)."""
    t2 = case_dir / "t2"
    files = sorted(t2.iterdir(), key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))
    if how == "two series":
        shutil.copy(sorted((other / "t2").iterdir())[0], t2 / "zz.dcm")
        return t2, "2 series"
    if how == "missing slice":
        files[len(files) // 2].unlink()
        return t2, "1 slice(s) missing"
    if how == "duplicate slice":
        ds = pydicom.dcmread(files[3])
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(t2 / "echo2.dcm")
        return t2, "same position"
    if how == "structured report":
        _sr(t2 / "report.dcm")
        return t2, "not an MR image"
    if how == "not dicom":
        (t2 / "notes.txt").write_text("scanner notes\n")
        return t2, "not a DICOM file"
    if how == "truncated":
        data = files[2].read_bytes()
        files[2].write_bytes(data[: len(data) // 2])
        return t2, "could not be decoded"
    if how == "empty":
        for f in files:
            f.unlink()
        return t2, "no DICOM files"
    if how == "other grid":
        shutil.rmtree(t2)
        shutil.copytree(other / "t2", t2)
        return t2, "co-registered"
    if how == "other patient":
        for f in files:
            ds = pydicom.dcmread(f)
            ds.PatientID = "P2"
            ds.save_as(f)
        return t2, "PatientID"
    raise AssertionError(how)


BAD = ["two series", "missing slice", "duplicate slice", "structured report", "not dicom", "truncated",
       "empty", "other grid", "other patient"]


@pytest.mark.parametrize("how", BAD)
def test_bad_series_named_before_anything_is_written(dataset, tmp_path, capsys, how):
    case = discover(dataset("brats2023", 1)).cases[0]
    data = tmp_path / "dcm"
    good = _dicom_case(case, data / "a_good", "LPS")
    bad_case = _dicom_case(case, data / "b_bad", "LPS")
    other = (_dicom_case(case, tmp_path / "other", "LPS-thick" if how == "other grid" else "LPS")
             if how in ("two series", "other grid") else None)
    folder, word = _break(bad_case, how, other)
    before = tree_fingerprint(data)
    out = tmp_path / "out"
    for source in (["--input", str(data)],
                   ["--t1", str(bad_case / "t1"), "--t1ce", str(bad_case / "t1ce"), "--t2", str(bad_case / "t2"),
                    "--flair", str(bad_case / "flair")]):
        # The model is never loaded: the input is refused first.
        assert main(["predict", "--model", str(tmp_path / "none.pt"), *source, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert str(folder) in err and word in err and "Traceback" not in err, err
        assert not out.exists()
    assert tree_fingerprint(data) == before
    assert good.is_dir()


def test_mixed_folders_and_files_are_refused(dataset, tmp_path, capsys):
    case = discover(dataset("brats2023", 1)).cases[0]
    dcm = _dicom_case(case, tmp_path / "c1", "RAS")
    assert main(["predict", "--model", str(tmp_path / "none.pt"), "--t1", str(dcm / "t1"),
                 "--t1ce", str(case.images[1]), "--t2", str(dcm / "t2"), "--flair", str(dcm / "flair"),
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "is a folder (a DICOM series)" in err and "--t1ce" in err
    with pytest.raises(DataError, match="no series folder named"):
        (tmp_path / "root" / "c1" / "dwi").mkdir(parents=True)
        dicom_cases(tmp_path / "root")


@pytest.mark.parametrize("convention, relabel, extra, code", [
    # brats2024: label 4 = resection cavity, coded as post-surgical anatomy
    ("brats2024", [0, 1, 2, 3], 4, ("245849007", "SCT", "91723000")),
    # brats2024-ped: 1 ET, 2 NET, 3 cystic component (coded as cyst), 4 ED
    ("brats2024-ped", [0, 2, 4, 1], 3, ("367643001", "SCT", "49755003")),
])
def test_segmentation_holds_the_resection_cavity_and_the_cystic_component(dataset, tmp_path, convention,
                                                                          relabel, extra, code):
    # The newer tasks' fourth class is a segment of its own (it used to be dropped):
    # the label map reads back exactly, the segment is coded and named.
    case = discover(dataset("brats2023")).cases[-1]
    root = _dicom_case(case, tmp_path / "dcm" / "c1", "oblique")
    (got,), _ = dicom_cases(root)
    truth = np.asarray(nib.load(case.label).dataobj).astype(np.uint8)
    labels = np.asarray(relabel, np.uint8)[truth]
    edema = np.argwhere(truth == 2)
    half = edema[edema[:, 0] < np.median(edema[:, 0])]
    labels[tuple(half.T)] = extra
    assert extra in np.unique(labels)
    seg_path = write_seg(labels, got.dicom, convention, tmp_path / "out" / "c1_seg.dcm", "unet3d", "torch")
    (tmp_path / "nii").mkdir()
    nifti = nib.load(got.dicom.to_nifti(tmp_path / "nii")[1])
    np.testing.assert_array_equal(_seg_on_grid(seg_path, nifti, convention), labels)
    seg = hd.seg.segread(seg_path)
    assert len(seg.SegmentSequence) == 4
    last = seg.SegmentSequence[3]
    assert (last.SegmentedPropertyTypeCodeSequence[0].CodeValue,
            last.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator,
            last.SegmentedPropertyCategoryCodeSequence[0].CodeValue) == code
    assert last.SegmentLabel == f"{get_convention(convention).names[extra]} (label {extra})"
