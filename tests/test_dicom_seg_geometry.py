"""DICOM Segmentations of series written by another writer (GDCM, through
SimpleITK) whose SliceThickness / SpacingBetweenSlices do not match the slice
positions: the Segmentation must carry the spacing measured from the positions,
so that highdicom reads it back as a volume on the source grid."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
import SimpleITK as sitk
from pydicom.uid import generate_uid

from medseg.data.dicom import MR_IMAGE_STORAGE, dicom_case, seg_segments, write_seg

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

#: (columns, rows, slices) voxel size in mm: non-square pixels, slices 2 mm apart.
SPACING = (0.8, 1.1, 2.0)
SHAPE = (7, 6, 5)


def _oblique() -> np.ndarray:
    """Direction cosines (columns of the matrix: column, row, slice axes in LPS) of
    a grid turned 20° about z and 10° about x."""
    a, b = np.radians(20), np.radians(10)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return rz @ rx


def _gdcm_series(folder: Path, how: str) -> tuple[np.ndarray, np.ndarray]:
    """An int16 MR series written slice by slice with SimpleITK's ImageFileWriter
    (GDCM), tagged as SimpleITK's DICOM series example does → (its `(columns, rows,
    slices)` values, its LPS affine). SliceThickness is a misleading 5 mm; and
    SpacingBetweenSlices is what GDCM writes itself: 1 mm for 2D slices
    (``how="2d"``), the image's third spacing for one-slice 3D images, set here to
    a misleading 5 mm (``how="3d-5mm"``)."""
    values = np.arange(np.prod(SHAPE), dtype=np.int16).reshape(SHAPE[::-1])        # (z, y, x)
    img = sitk.GetImageFromArray(values)
    img.SetSpacing(SPACING)
    direction = _oblique()
    img.SetDirection(tuple(direction.ravel()))
    img.SetOrigin((-10.0, 20.0, 5.0))
    tags = {"0008|0060": "MR", "0008|0016": MR_IMAGE_STORAGE, "0010|0020": "P1", "0010|0010": "Gdcm^Case",
            "0020|000d": generate_uid(), "0020|000e": generate_uid(), "0020|0052": generate_uid(),
            "0020|0011": "3", "0008|103e": "T1CE",
            "0020|0037": "\\".join(f"{v:.6f}" for v in (*direction[:, 0], *direction[:, 1])),
            "0018|0050": "5"}
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    folder.mkdir(parents=True)
    for k in range(SHAPE[2]):
        if how == "2d":
            one = img[:, :, k]
        else:
            one = img[:, :, k:k + 1]
            one.SetSpacing((*SPACING[:2], 5.0))
        for tag, value in tags.items():
            one.SetMetaData(tag, value)
        one.SetMetaData("0008|0018", generate_uid())
        one.SetMetaData("0020|0013", str(k + 1))
        corner = img.TransformIndexToPhysicalPoint((0, 0, k))
        one.SetMetaData("0020|0032", "\\".join(f"{v:.6f}" for v in corner))
        writer.SetFileName(str(folder / f"IM{k:04d}.dcm"))
        writer.Execute(one)
    lps = np.eye(4)
    lps[:3, :3] = direction * SPACING
    lps[:3, 3] = img.GetOrigin()
    return values.transpose(2, 1, 0), lps


def _labels() -> np.ndarray:
    """A mask with the three brats2023 labels, and an empty slice between two
    labelled ones (its frame is omitted: only the spacing places the next one)."""
    labels = np.zeros(SHAPE, np.uint8)
    labels[1:4, 2:5, 0] = 2
    labels[2, 3, 0] = 1
    labels[3:6, 1:3, 2:4] = 3
    labels[0, 0, 4] = 1
    return labels


@pytest.fixture(autouse=True)
def _keep_locale():
    """GDCM's writer resets the process locale to "C" (ASCII): every later
    `read_text()` of a UTF-8 file in this pytest process would then fail. Restore it."""
    import locale
    saved = locale.setlocale(locale.LC_ALL)
    yield
    locale.setlocale(locale.LC_ALL, saved)


@pytest.mark.parametrize("how", ["2d", "3d-5mm"])
def test_segmentation_of_a_gdcm_series_reads_back_on_its_grid(tmp_path, how):
    values, lps = _gdcm_series(tmp_path / "c1" / "t1ce", how)
    case = dicom_case({"t1ce": tmp_path / "c1" / "t1ce"})
    ref = case.dicom.reference
    # The series itself is read onto its own grid, whatever its thickness tags say.
    np.testing.assert_allclose(ref.affine, _LPS_TO_RAS @ lps, atol=1e-5)
    np.testing.assert_array_equal(ref.volume(), values)
    # The premise: its thickness tags are misleading (slices are 2 mm apart).
    tags = [(float(h.SliceThickness), float(h.SpacingBetweenSlices)) for h in ref.headers]
    assert set(tags) == {(5.0, 1.0 if how == "2d" else 5.0)}
    labels = _labels()
    path = write_seg(labels, case.dicom, "brats2023", tmp_path / "out" / "c1_seg.dcm", "m", "torch")
    # write_seg leaves the case's headers as read.
    assert [(float(h.SliceThickness), float(h.SpacingBetweenSlices)) for h in ref.headers] == tags

    seg = hd.seg.segread(path)
    vol = seg.get_volume(combine_segments=True)
    # highdicom's volume: (slices, rows, columns) indices → LPS mm (slices in
    # either direction). Mapped into the source's (columns, rows, slices) indices,
    # each of its axes must be one source axis at one voxel per step, every voxel
    # landing on a source voxel centre.
    np.testing.assert_allclose(vol.spacing, SPACING[::-1], rtol=1e-5)
    to_src = np.linalg.inv(lps) @ vol.affine
    np.testing.assert_allclose(np.abs(to_src[:3, :3]), np.eye(3)[::-1], atol=1e-4)
    assert np.allclose(to_src[:3, 3], np.round(to_src[:3, 3]), atol=1e-4), to_src
    # ... and the frames hold the mask, the omitted empty slice included.
    idx = np.indices(vol.spatial_shape).reshape(3, -1)
    dst = np.round(to_src[:3, :3] @ idx + to_src[:3, 3:]).astype(int)
    assert (dst >= 0).all() and (dst < np.array(SHAPE)[:, None]).all()
    values_of = np.zeros(4, np.uint8)
    for number, (value, _, _) in enumerate(seg_segments("brats2023"), 1):
        values_of[number] = value
    got = np.zeros(SHAPE, np.uint8)
    got[tuple(dst)] = values_of[np.asarray(vol.array).reshape(-1)]
    np.testing.assert_array_equal(got, labels)
    # The Segmentation's own header says the measured grid: 2 mm slices.
    measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert [float(v) for v in measures.PixelSpacing] == [SPACING[1], SPACING[0]]      # rows, columns
    np.testing.assert_allclose([float(measures.SpacingBetweenSlices), float(measures.SliceThickness)],
                               [SPACING[2]] * 2, rtol=1e-5)
