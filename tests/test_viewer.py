"""Viewer files: the 3D Slicer .seg.nrrd read back (pynrrd, and Slicer's own
slicerio) holds the mask's voxels on the same physical points (RAS vs LPS) for
several orientations, thick slices and an oblique grid; the ITK-SNAP label file
parsed back names and colours every label; both use the report's colours."""

from __future__ import annotations

import shlex

import nibabel as nib
import nrrd
import numpy as np
import pytest
import slicerio

from medseg.data.discover import discover
from medseg.data.io import load_header
from medseg.errors import LabelError, MedsegError
from medseg.labels import CLASS_COLOURS, CONVENTIONS, get_convention
from medseg.report import REGION_COLOURS
from medseg.viewer import itksnap_text, viewer_paths, write_seg_nrrd, write_viewer_files


def _mask(shape=(14, 12, 10)) -> np.ndarray:
    """An asymmetric brats2023 mask, so that any flip or axis swap would show."""
    lab = np.zeros(shape, np.uint8)
    lab[2:9, 3:7, 2:6] = 2
    lab[3:6, 4:6, 3:5] = 1
    lab[4, 4, 3] = 3
    lab[11, 1, 8] = 2
    return lab


def _oblique() -> np.ndarray:
    a = np.eye(4)
    t = np.deg2rad(20)
    a[:3, :3] = np.array([[np.cos(t), 0, np.sin(t)], [0, 1, 0], [-np.sin(t), 0, np.cos(t)]]) @ np.diag([0.9, 1.2, 3.0])
    a[:3, 3] = (-100.0, 12.5, 40.0)
    return a


def _grids():
    base = np.diag([1.0, 1.0, 1.0, 1.0])
    base[:3, 3] = (-90.0, -126.0, -72.0)
    thick = np.diag([0.8, 0.8, 5.0, 1.0])
    thick[:3, 3] = (30.0, -40.0, 10.0)
    out = {}
    for name, aff, codes in (("ras", base, "RAS"), ("lps", base, "LPS"), ("pir", base, "PIR"),
                             ("asl", base, "ASL"), ("thick_lps", thick, "LPS")):
        img = nib.Nifti1Image(_mask(), aff)
        out[name] = img.as_reoriented(nib.orientations.ornt_transform(
            nib.io_orientation(aff), nib.orientations.axcodes2ornt(tuple(codes))))
    out["oblique"] = nib.Nifti1Image(_mask(), _oblique())
    return out


GRIDS = _grids()


def _check_round_trip(mask_path, seg_path, convention):
    mask = nib.load(mask_path)
    lab = np.asarray(mask.dataobj)
    data, head = nrrd.read(str(seg_path))
    np.testing.assert_array_equal(data, lab)
    assert head["space"] == "left-posterior-superior"
    # The same voxel indices → the same physical point: NRRD in LPS, NIfTI in RAS.
    rng = np.random.default_rng(0)
    ijk = np.vstack([rng.integers(0, s, 20) for s in lab.shape]).T
    lps = head["space origin"] + ijk @ head["space directions"]
    ras = nib.affines.apply_affine(mask.affine, ijk)
    np.testing.assert_allclose(lps * [-1, -1, 1], ras, atol=1e-6)
    # Slicer's own reader: geometry, segment names, values, colours, extents.
    seg = slicerio.read_segmentation(str(seg_path))
    np.testing.assert_allclose(seg["ijkToLPS"], np.diag([-1, -1, 1, 1]) @ mask.affine, atol=1e-6)
    np.testing.assert_array_equal(seg["voxels"], lab)
    conv = get_convention(convention)
    got = {s["labelValue"]: s for s in seg["segments"]}
    assert set(got) == set(conv.classes())
    for v, cls in conv.classes().items():
        s = got[v]
        assert s["name"] == conv.names[v] and s["layer"] == 0
        np.testing.assert_allclose(np.array(s["color"]) * 255, CLASS_COLOURS[cls], atol=0.01)
        where = np.argwhere(lab == v)
        want = [0, -1] * 3 if not len(where) else \
            [int(x) for pair in zip(where.min(0), where.max(0)) for x in pair]
        assert s["extent"] == want, (v, s["extent"], want)
    return head


@pytest.mark.parametrize("grid", list(GRIDS))
def test_seg_nrrd_round_trip(tmp_path, grid):
    img = GRIDS[grid]
    nib.save(img, tmp_path / "case.nii.gz")
    if grid != "oblique":
        assert "".join(nib.aff2axcodes(img.affine)) == grid.split("_")[-1].upper()
    lab = np.asarray(img.dataobj)
    targets = viewer_paths(tmp_path, "case")
    write_viewer_files(lab, load_header(tmp_path / "case.nii.gz").affine, "brats2023", targets)
    assert [p.name for p in targets] == ["case.seg.nrrd", "case.itksnap.txt"]
    _check_round_trip(tmp_path / "case.nii.gz", targets[0], "brats2023")


def test_synthetic_masks_round_trip(tmp_path, dataset):
    # Label maps the viewer code did not shape: the generator's (LPS, PIR, thick slices).
    for layout, conv in (("brats2021", "brats2021"), ("msd", "msd")):
        for case in discover(dataset(layout)).cases[:4]:
            img = nib.load(case.label)
            target = tmp_path / f"{case.case_id}.seg.nrrd"
            write_seg_nrrd(np.asarray(img.dataobj), img.affine, conv, target)
            _check_round_trip(case.label, target, conv)


def _parse_itksnap(text: str) -> dict[int, tuple]:
    out = {}
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        idx, r, g, b, a, vis, msh, label = shlex.split(line)
        out[int(idx)] = ((int(r), int(g), int(b)), float(a), int(vis), int(msh), label)
    return out


@pytest.mark.parametrize("name", list(CONVENTIONS))
def test_itksnap_label_file_round_trip(name):
    conv = get_convention(name)
    got = _parse_itksnap(itksnap_text(name))
    assert got.pop(0) == ((0, 0, 0), 0.0, 0, 0, "Clear Label")
    assert set(got) == set(conv.names) - {0}
    for v, cls in conv.classes().items():
        assert got[v] == (CLASS_COLOURS[cls], 1.0, 1, 1, conv.names[v])


def test_colours_match_the_report_overlays():
    # The report's overlays, its legend and the viewer files use one colour table.
    for cls, rgba in REGION_COLOURS.items():
        assert tuple(round(c * 255) for c in rgba[:3]) == CLASS_COLOURS[cls]
    assert get_convention("msd").classes() == {1: "ED", 2: "NCR", 3: "ET"}
    assert get_convention("brats2024").classes()[4] == "RC"


def test_bad_masks_are_refused(tmp_path):
    with pytest.raises(LabelError, match="x.seg.nrrd"):
        write_seg_nrrd(np.full((3, 3, 3), 4, np.uint8), np.eye(4), "brats2023", tmp_path / "x.seg.nrrd")
    with pytest.raises(MedsegError, match="integers 0-255"):
        write_seg_nrrd(np.full((3, 3, 3), 300, np.int16), np.eye(4), "brats2023", tmp_path / "x.seg.nrrd")
    assert not list(tmp_path.iterdir())            # nothing half-written
